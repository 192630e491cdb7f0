# Everything a fresh machine needs: `make demo` and `make test` create the virtual
# environment on first use, install the package with its test extras under the
# pinned constraints, then run.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-oldest demo bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The declared floor (constraints-oldest.txt, Python 3.9) in a second environment, same suite.
OLDEST ?= .venv-oldest
PY_OLDEST ?= $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.9*/bin/python3.9) python3.9)
$(OLDEST)/.installed: pyproject.toml constraints-oldest.txt
	$(PY_OLDEST) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q --upgrade pip
	$(OLDEST)/bin/pip install -q -c constraints-oldest.txt -e ".[test]"
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pytest -q

demo: $(STAMP)
	$(BIN)/svp demo

bench: $(STAMP)
	$(BIN)/python benchmarks/scan.py
	$(BIN)/python benchmarks/model.py

clean:
	rm -rf $(VENV) $(OLDEST) .pytest_cache
