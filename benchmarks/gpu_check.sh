#!/usr/bin/env bash
# GPU check (issue 11 parts a-c): correctness of the CUDA scan backends against the float64
# reference, scan speed beside the HBM-bandwidth bound, Vim-S SVP training/inference
# images/s and peak memory. Writes OUTDIR/gpu_check.json and OUTDIR/gpu_check.md.
#
#   benchmarks/gpu_check.sh OUTDIR              # one CUDA GPU; finishes in under 8 minutes
#   benchmarks/gpu_check.sh OUTDIR --dry-run    # no GPU: Triton interpreter on CPU, tiny shapes
#
# Runs from the source tree (PYTHONPATH=src) with torch (and the Triton it ships), timm and
# numpy; no network, no mamba_ssm needed (used when it imports). PYTHON=... picks the interpreter.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:?usage: benchmarks/gpu_check.sh OUTDIR [--dry-run]}"
shift
case " $* " in *" --dry-run "*) export TRITON_INTERPRET=1 ;; esac
mkdir -p "$out"
# 8-minute hard cap; the script itself stops measuring at 420 s and writes what it has
PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}" exec timeout 480 "${PYTHON:-python}" "$here/gpu_check.py" "$out" "$@"
