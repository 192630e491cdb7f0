#!/usr/bin/env bash
# svp under the newest releases a plain `pip install svp-vim[test,serve]` picks today, without
# constraints.txt, on a newer Python than CI's (CI runs the pins on 3.11 and the floors on 3.9).
# On 2026-12-06 such an install (Python 3.13: torch 2.15, Triton 3.9, NumPy 2.5) broke three
# things at once that CI could not see (README, "Supported versions"). For each Python given
# (default: the newest python3.N that pyenv or PATH has), in a copy of the tree (an editable
# install writes into the tree it installs from; numba caches its kernels beside the sources):
#   1. uv builds a virtual environment and installs the package with its test and serve extras,
#      every package at its newest release on the package index (a CUDA build of torch, ~5 GB;
#      it runs on the CPU)
#   2. the quick suite (`-m "not slow"`), then the slow suite (`-m slow`), one thread each
#   3. `svp doctor --no-timing` and `svp demo` (its table is in the log, to hold against the
#      README's by eye: the numbers may move with the releases)
#
#   benchmarks/newest.sh                       # the newest Python found
#   benchmarks/newest.sh 3.12 3.13             # these (pyenv's, else python3.N on PATH)
#   KEEP=1 WORK=/tmp benchmarks/newest.sh      # keep the copies and environments (default: deleted)
#
# Not part of `make test` or CI (several GB of downloads, ~12 minutes per Python on 2 vCPUs).
# Needs the package index and uv (UV=..., else `uv` on PATH, else pip installs it into the work
# folder). Exit status: non-zero if any step failed for any Python. `make newest` runs it.
set -uo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${WORK:-${TMPDIR:-/tmp}}"
OUT="${OUT:-$WORK/svp-newest}"
mkdir -p "$OUT"
pyenv_root="$(pyenv root 2>/dev/null || true)"
find_python() {  # 3.N -> an interpreter's path (pyenv's newest 3.N.x first), or nothing
    local p
    p=$(ls -d "$pyenv_root"/versions/"$1".*/bin/python"$1" 2>/dev/null | sort -V | tail -n 1)
    [ -n "$p" ] || p=$(command -v "python$1" || true)
    echo "$p"
}
versions=("$@")
if [ ${#versions[@]} -eq 0 ]; then
    for n in 20 19 18 17 16 15 14 13 12; do
        [ -z "$(find_python "3.$n")" ] || { versions=("3.$n"); break; }
    done
    [ ${#versions[@]} -gt 0 ] || { echo "no python3.12 or newer found: name one (benchmarks/newest.sh 3.N)"; exit 2; }
fi
uv="${UV:-$(command -v uv || true)}"
if [ -z "$uv" ]; then
    python3 -m pip install -q --target "$WORK/svp-newest-uv" "uv==0.13.9" || { echo "uv could not be installed"; exit 2; }
    uv="$WORK/svp-newest-uv/bin/uv"
fi
# uv reads no pip settings; the system's certificates, as pip trusts them (a TLS proxy's)
export UV_SYSTEM_CERTS=1 UV_CACHE_DIR="$WORK/svp-newest-uv-cache"
status=0
summary=()
for v in "${versions[@]}"; do
    py="$(find_python "$v")"
    tree="$WORK/svp-newest-$v"
    log="$OUT/python$v.log"
    echo "== Python $v (log: $log)"
    if [ -z "$py" ]; then echo "   no python$v"; status=1; summary+=("Python $v: not found"); continue; fi
    : >"$log"
    if [ ! -x "$tree/.venv/bin/python" ]; then
        rm -rf "$tree" && mkdir -p "$tree"
        (cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf -) \
            | tar -xf - -C "$tree"
        if ! { "$uv" venv -q --seed -p "$py" "$tree/.venv" \
               && "$uv" pip install -q -p "$tree/.venv/bin/python" -e "$tree[test,serve]"; } >>"$log" 2>&1; then
            echo "   install failed"; status=1; summary+=("Python $v: install failed"); continue
        fi
    fi
    vers="$("$tree/.venv/bin/python" -c 'import sys, torch, numpy, timm, numba
try:
    import triton; t = triton.__version__
except ImportError:
    t = "none"
print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, triton {t}, numpy {numpy.__version__}, "
      f"timm {timm.__version__}, numba {numba.__version__}")')"
    echo "   $vers"
    res=()
    run() {  # name, command...: in the copy, its output appended to the log
        local name="$1" t0=$SECONDS; shift
        echo "---- $name: $*" >>"$log"
        if (cd "$tree" && env -u PYTHONDONTWRITEBYTECODE OMP_NUM_THREADS=1 "$@") >>"$log" 2>&1; then
            res+=("$name ok ($((SECONDS - t0)) s)")
        else res+=("$name FAILED"); status=1; fi
        echo "   ${res[-1]}"
    }
    run quick .venv/bin/python -m pytest -q -p no:cacheprovider -m "not slow"
    run slow .venv/bin/python -m pytest -q -p no:cacheprovider -m slow
    run doctor .venv/bin/svp doctor --no-timing
    rm -rf "$OUT/demo-$v"   # (a demo folder of an earlier check would be reused)
    run demo .venv/bin/svp demo --out "$OUT/demo-$v" --no-figure
    summary+=("$vers: ${res[*]}")
    [ -n "${KEEP:-}" ] || rm -rf "$tree"
done
[ -n "${KEEP:-}" ] || rm -rf "$WORK/svp-newest-uv" "$UV_CACHE_DIR"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
exit $status
