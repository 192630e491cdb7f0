"""Compile the fused CPU kernels into numba's disk cache before pytest-xdist's workers start.

``python tests/kernel_warmup.py float32|bfloat16``; tests/conftest.py runs both parts side by
side when the suite runs on two or more workers. Without it each worker would compile every
kernel variant its tests reach (~2 min of one core for the whole set, numba 0.68), the two
workers mostly the same ones at the same time. The parts are what a training run compiles, split
so that they share few kernels: ``float32`` is svp doctor's two checks (a tiny Vim with an SVP
adapter, one training step: the scan with its time steps formed in the kernel, the conv, add +
RMSNorm and prompt kernels; then ``selective_scan`` with the time steps passed in), ``bfloat16``
the same step under CPU autocast (train.amp: the kernels' bfloat16 variants). A variant neither
part reaches is compiled by the test that needs it, as without the warm-up. Exits 0 where the
fused CPU kernels do not run (nothing to compile); any other failure exits non-zero, and the
tests that use the kernel report it.
"""
import sys


def main(part):
    import torch
    from svp.ops import available_backends, dispatch, set_backend
    if "cpu" not in available_backends():
        print(f"kernel warm-up: no fused CPU kernels here ({dispatch.unavailable_backends().get('cpu', '?')})")
        return 0
    from svp import doctor
    if part == "float32":
        doctor.check_fused_cpu_model()
        doctor.check_backend("cpu", torch.device("cpu"))
    elif part == "bfloat16":
        pm, x = doctor._tiny_svp_model()
        set_backend("cpu")
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                doctor._step(pm, x)
        finally:
            set_backend(None)
    else:
        raise SystemExit(f"kernel_warmup.py: part must be float32 or bfloat16, got {part!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
