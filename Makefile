# Everything a fresh machine needs: `make demo` and `make test` create the virtual
# environment on first use, install the package with its test extras under the
# pinned constraints, then run.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# extra flags for installing the package (.ci/run: --no-compile)
PIP_INSTALL_FLAGS ?=

.PHONY: install test test-oldest demo bench clean browser-deps triton-compat newest

# UV: a uv executable to build it with instead of pip (.ci/run does, for time: the same packages
# in ~10 s against pip's 70-100 s; pip's settings, such as a local index, passed as uv's: .ci/run).
# A user's `make install` uses pip. (uv is given the interpreter's path: a bare `python3` would
# let it take a Python of its own.)
UV ?=
$(STAMP): pyproject.toml constraints.txt
ifeq ($(UV),)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_INSTALL_FLAGS) -c constraints.txt -e ".[test]"
else
	$(UV) venv -q --seed --allow-existing -p "$$(command -v $(PY))" $(VENV)
	$(UV) pip install -q -p $(BIN)/python -c constraints.txt -e ".[test]"
endif
	touch $(STAMP)

install: $(STAMP)

# The declared floor (constraints-oldest.txt, Python 3.9) in a second environment: the quick
# suite and the slow tests marked `floor` (what the oldest releases change); the other slow,
# end-to-end tests start processes of the same library, and the tests that compile a CPU kernel
# in the form other CPUs take (AVX-512 or not) compare code paths, not releases: they run on the
# main environment only.
OLDEST ?= .venv-oldest
PY_OLDEST ?= $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.9*/bin/python3.9) python3.9)
# With UV (above) uv builds it instead of pip (`make test-oldest UV=uv`; .ci/run does).
# Every package of the floor comes from the package index (no wheel of torch 2.1.0 for Python 3.9
# lies on this project's machines; the environment is 5.1 GB, most of it torch's CUDA build), and
# uv downloads and unpacks them in parallel: the same packages in 25 s and 31 CPU-s against pip's
# 90 s and 87 CPU-s (docs/benchmarks.md, "The floor's environment with uv"). --seed: pip and
# setuptools, as `venv` gives (Triton 2.1 imports setuptools: without it the floor's Triton checks
# skip and the benchmark scripts' import test fails).
$(OLDEST)/.installed: pyproject.toml constraints-oldest.txt
ifeq ($(UV),)
	$(PY_OLDEST) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q --upgrade pip
	$(OLDEST)/bin/pip install -q $(PIP_INSTALL_FLAGS) -c constraints-oldest.txt -e ".[test]"
else
	$(UV) venv -q --seed --allow-existing -p "$$(command -v $(PY_OLDEST))" $(OLDEST)
	$(UV) pip install -q -p $(OLDEST)/bin/python -c constraints-oldest.txt -e ".[test]"
endif
	touch $@

# The web-page test of `svp serve` drives headless Chromium: install Debian's chromium and
# chromium-driver when they are missing and we are root with apt-get (about 35 s); anything
# else only prints a note (the test then skips, saying why) and never fails `make test`.
browser-deps:
	@if command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium + chromium-driver for the svp serve browser test"; \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) \
	    >/dev/null 2>&1 || echo "note: apt-get could not install chromium; the browser test will be skipped"; \
	else echo "note: no chromium (and not root with apt-get); the browser test will be skipped"; fi

# The suites write Python's bytecode even where PYTHONDONTWRITEBYTECODE is set (as on this
# project's machines): every process the slow tests start imports svp afresh, and compiled each of its
# modules from source every time (four subprocess-heavy test files 191 -> 168 s, one run each, on
# a 2-vCPU Zen 3; docs/benchmarks.md, thirty-fourth round). Only __pycache__ folders (git ignores them).
# PYTEST_ARGS: a part of the suite (CI runs it in two parts, one on each core: .ci/run).
test: $(STAMP) browser-deps
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-oldest: $(OLDEST)/.installed browser-deps
	env -u PYTHONDONTWRITEBYTECODE $(OLDEST)/bin/python -m pytest -q -m "not slow or floor"

demo: $(STAMP)
	$(BIN)/svp demo

bench: $(STAMP)
	$(BIN)/python benchmarks/scan.py
	$(BIN)/python benchmarks/model.py

# The Triton kernels under the Triton of torch 2.11, 2.12 and 2.15 (3.6, 3.7, 3.9) on the CPU: builds a
# venv per release from PyPI (~5 GB each, deleted after; KEEP=1 keeps them). Not part of `make test`.
triton-compat:
	benchmarks/triton_compat.sh $(TORCHES)

# The quick and slow suites, `svp doctor` and `svp demo` under the newest releases on the package
# index, without constraints, on the newest Python found (`make newest PYTHONS="3.12 3.13"` to
# choose; ~5 GB and ~12 minutes per Python, deleted after; KEEP=1 keeps them). Not part of `make test`.
newest:
	benchmarks/newest.sh $(PYTHONS)

clean:
	rm -rf $(VENV) $(OLDEST) .pytest_cache
