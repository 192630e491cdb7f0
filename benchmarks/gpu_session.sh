#!/usr/bin/env bash
# Everything issue 11 measures on a GPU, in one call (a lent GPU machine's session is short):
# the environment, benchmarks/gpu_check.sh (parts a-d), benchmarks/triton_sweep.py (the scan's
# launch geometries and the exp-only floor, the conv's tiles, the tiled scan kernels last),
# gpu_check.py --graph (a Vim-S SVP step eager and captured whole in a CUDA graph),
# benchmarks/triton_asm.py (the kernels' registers and occupancy as this Triton compiles them),
# benchmarks/gpu_profile.py (a Vim-S step's kernels: as it runs, with the operators grouped by
# input shape; with the joint nodes off (the mixer's per direction, the prompters as modules); and
# with the conv, add + RMSNorm and prompt
# step in PyTorch) and `svp doctor`,
# each under its own time limit, all output under OUTDIR (about 5 minutes on an H200; at most
# 10). Ten files: log.txt, prof.txt, gc/gpu_check.{json,md}, graph/gpu_check.{json,md},
# sw/triton_sweep.{json,md}, asm.{json,md}.
#
#   benchmarks/gpu_session.sh OUTDIR      # PYTHON=... picks the interpreter (default python3)
set -u
case "${1:-}" in -h|--help) sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:?usage: benchmarks/gpu_session.sh OUTDIR}"
py="${PYTHON:-python3}"
# every part but the doctor needs a CUDA GPU: say so once, up front, instead of one failure a part
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "benchmarks/gpu_session.sh: no CUDA GPU here (torch.cuda.is_available() is false); it measures on a GPU" >&2
  exit 2
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
L="$out/log.txt"
t0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - t0 )) s" | tee -a "$L"; }
stamp env
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,memory.total --format=csv; nproc
  "$py" -c "import sys, torch, triton, timm, numba, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)"
} >> "$L" 2>&1
stamp gpu_check
PYTHON="$py" timeout 270 bash "$here/gpu_check.sh" "$out/gc" --budget-s "${GC_BUDGET:-150}" >> "$L" 2>&1
echo "gpu_check rc $?" >> "$L"
stamp graph
# the step captured whole in a CUDA graph, beside the same step eager: a process of its own (a failed
# capture can leave the CUDA context unusable)
PYTHON="$py" timeout 90 bash "$here/gpu_check.sh" "$out/graph" --parts c --graph --budget-s 60 >> "$L" 2>&1
echo "graph rc $?" >> "$L"
stamp sweep
timeout 150 "$py" "$here/triton_sweep.py" "$out/sw" --budget-s "${SW_BUDGET:-110}" >> "$L" 2>&1
echo "sweep rc $?" >> "$L"
stamp profile
{ timeout 60 "$py" "$here/gpu_profile.py" --shapes 45; timeout 60 "$py" "$here/gpu_profile.py" --nodes per-direction
  timeout 60 "$py" "$here/gpu_profile.py" --around torch
} > "$out/prof.txt" 2>&1
echo "profile rc $?" >> "$L"
stamp asm
# the kernels' registers, spills and occupancy as this machine's Triton compiles a step's launches
# (benchmarks/triton_asm.py: no GPU needed, but the Triton here may not be the one the docs used)
timeout 90 "$py" "$here/triton_asm.py" --json "$out/asm.json" > "$out/asm.md" 2>> "$L"
echo "asm rc $?" >> "$L"
stamp doctor
# the fused CPU kernels compile cold on a fresh machine (numba): longer than the GPU checks
timeout "${DOCTOR_S:-120}" "$py" -m svp doctor >> "$L" 2>&1
echo "doctor rc $?" >> "$L"
stamp end
