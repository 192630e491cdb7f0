"""svp.runtime: the OpenMP wait policy is set before torch loads libgomp, never over the user's."""
import os
import subprocess
import sys

import pytest

CODE = "import svp, os, torch; print(os.environ.get('OMP_WAIT_POLICY'), svp.runtime.status()['applied_before_torch'])"


def _run(code, **env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "SVP_NO_RUNTIME_DEFAULTS")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.slow  # starts processes
def test_passive_wait_policy_when_svp_comes_first():
    assert _run(CODE) == ["PASSIVE", "True"]


@pytest.mark.slow  # starts processes
def test_user_choice_and_opt_out_are_kept():
    assert _run(CODE, OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "True"]
    assert _run(CODE, GOMP_SPINCOUNT="1000")[0] == "None"
    assert _run(CODE, SVP_NO_RUNTIME_DEFAULTS="1")[0] == "None"
    # torch first: too late for libgomp, so svp leaves the environment alone and says so
    assert _run("import torch, os, svp; print(os.environ.get('OMP_WAIT_POLICY'), "
                "svp.runtime.status()['applied_before_torch'])") == ["None", "False"]


FAULTS = """
import ctypes, resource, svp
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for i in range(6):
    f0 = faults()
    size = (30 - 2 * i) << 20
    bufs = [libc.malloc(size) for _ in range(3)]     # three (30 - 2i) MiB blocks, touched
    for p in bufs:
        ctypes.memset(p, 1, size)
    for p in bufs:
        libc.free(p)
    counts.append(faults() - f0)
print(str(svp.runtime.status()['malloc']).split()[0], sum(counts[2:]))
"""


@pytest.mark.slow  # starts processes
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_buffers_are_reused_without_page_faults():
    """Three buffers of 30, 28, ..., 20 MiB allocated, touched and freed, round after round: with
    svp's malloc settings the later rounds reuse the heap (almost no page faults); with glibc's
    defaults (opt-out) each round's memory goes back to the kernel when freed (more than twice
    the adaptive mmap threshold at the top of the heap) and the next round faults it in again."""
    mine = _run(FAULTS)
    theirs = _run(FAULTS, SVP_NO_RUNTIME_DEFAULTS="1")
    assert mine[0] == "mmap" and int(mine[1]) < 2000, mine
    assert theirs[0] == "None" and int(theirs[1]) > 20000, theirs
    assert _run(FAULTS, MALLOC_TRIM_THRESHOLD_="1000000")[0] == "left"
