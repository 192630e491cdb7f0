#!/usr/bin/env bash
# The Triton kernels under other Triton releases, on a CPU (issue 11 item 6): for each torch
# release given (default: 2.11 2.12 2.15, which ship Triton 3.6, 3.7 and 3.9; the project's own
# environment has torch 2.14 / Triton 3.8), build a virtual environment with that torch from
# PyPI (a CUDA build, several GB; it runs on the CPU) plus timm, numba, safetensors and the test
# tools, then, from the source tree (PYTHONPATH=src, the package is not installed):
#   1. the Triton kernels' tests (scan, conv, add + RMSNorm, SVP prompts) and tests/test_doctor.py,
#      slow tests included: the float64 parity grids and the mini Vim through Triton's interpreter
#      (the tests set TRITON_INTERPRET=1 themselves), and every kernel compiled for sm_90 to a
#      cubin (no GPU needed; that test must not run with TRITON_INTERPRET=1 in the environment)
#   2. `svp doctor --no-timing` (checks the triton backend through the interpreter without a GPU)
#   3. `benchmarks/gpu_check.sh OUT --dry-run` (the GPU check's logic on tiny CPU shapes)
#
#   benchmarks/triton_compat.sh                  # torch 2.11, 2.12 and 2.15
#   benchmarks/triton_compat.sh 2.11             # one release
#   KEEP=1 VENVS=/tmp benchmarks/triton_compat.sh  # keep the environments (default: deleted after)
#
# Not part of `make test` or CI (minutes of downloads and a slow interpreter). Needs PyPI and a
# Python 3.11 (PY=...). Exit status: non-zero if any step failed for any release.
set -uo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
PY="${PY:-$(command -v python3.11 || echo python3)}"
VENVS="${VENVS:-${TMPDIR:-/tmp}}"
OUT="${OUT:-${TMPDIR:-/tmp}/svp-triton-compat}"
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(2.11 2.12 2.15)
unset TRITON_INTERPRET SVP_SCAN_BACKEND
mkdir -p "$OUT"
status=0
summary=()
for tv in "${versions[@]}"; do
    minor="${tv#2.}"; minor="${minor%%.*}"
    venv="$VENVS/svp-triton-torch$tv"
    log="$OUT/torch$tv.log"
    echo "== torch $tv (log: $log)"
    if [ ! -x "$venv/bin/python" ]; then
        "$PY" -m venv "$venv" && "$venv/bin/pip" install -q --upgrade pip &&
        # torchvision 0.(minor+15) pairs with torch 2.minor up to 2.14 (0.29.1); torch 2.15's is
        # 0.29.2: from there pip picks it. timm needs it
        tvpin="torchvision"; [ "$minor" -gt 14 ] || tvpin="torchvision==0.$((minor + 15)).*"
        "$venv/bin/pip" install -q "torch==$tv.*" "$tvpin" timm numba safetensors \
            numpy pyyaml tqdm pillow scikit-learn scikit-image matplotlib pytest \
            || { echo "   install failed"; status=1; summary+=("torch $tv: install failed"); continue; }
    fi
    vers="$("$venv/bin/python" -c 'import torch, triton, numpy; print(f"torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")')"
    echo "   $vers"
    res=()
    run() {  # name, command...
        local name="$1"; shift
        if (cd "$root" && PYTHONPATH=src "$@") >>"$log" 2>&1; then res+=("$name ok"); else res+=("$name FAILED"); status=1; fi
    }
    : >"$log"
    run pytest "$venv/bin/python" -m pytest -q -m "" -p no:cacheprovider tests/test_scan_triton.py \
        tests/test_conv_triton.py tests/test_norm_triton.py tests/test_prompt_triton.py tests/test_doctor.py
    run doctor "$venv/bin/python" -m svp doctor --no-timing
    run gpu_check-dry-run env PYTHON="$venv/bin/python" bash benchmarks/gpu_check.sh "$OUT/gpu_check-torch$tv" --dry-run
    summary+=("$vers: ${res[*]}")
    echo "   ${res[*]}"
    [ -n "${KEEP:-}" ] || rm -rf "$venv"
done
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
exit $status
