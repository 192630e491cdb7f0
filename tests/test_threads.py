"""svp's fused CPU kernels run on as many threads as torch's operators, in every thread: numba's
own count is per thread and starts at its whole pool, so a thread or a process limited to one
thread (torch.set_num_threads, OMP_NUM_THREADS, torchrun, svp serve --threads) ran its kernels on
every core."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("numba")

CHILD = """import json, threading
import torch
import svp
from svp.ops.norm_cpu import add_rms_norm_cpu
h, w = torch.randn(2, 9, 64), torch.ones(64)
def kernel_threads():
    add_rms_norm_cpu(h, None, w, 1e-5)
    import numba
    return numba.get_num_threads()
out = {}
import numba
from svp.ops import scan_cpu
out["pool"], out["picked"] = numba.config.NUMBA_NUM_THREADS, scan_cpu.THREADING_LAYER
for n in (1, 2):
    torch.set_num_threads(n)
    out[f"main_{n}"] = kernel_threads()
    t = threading.Thread(target=lambda: out.__setitem__(f"thread_{n}", kernel_threads()))
    t.start()
    t.join()
torch.set_num_threads(64)
out["asked_64"] = kernel_threads()
out["layer"] = numba.threading_layer()
print(json.dumps(out))
"""


@pytest.mark.slow  # starts a process
@pytest.mark.floor   # numba's per-thread count on its oldest release too
def test_the_kernels_follow_torchs_thread_count_in_every_thread():
    out = json.loads(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300,
                                    check=True).stdout.strip().splitlines()[-1])
    pool = out["pool"]
    assert out["main_1"] == 1 and out["thread_1"] == 1          # a new thread too (numba would give it the pool)
    assert out["main_2"] == min(2, pool) and out["thread_2"] == min(2, pool)
    assert out["asked_64"] == pool                               # never more than numba's pool
    assert out["layer"] == (out["picked"] or out["layer"])       # the layer svp picked


def test_a_kernel_launch_hands_out_tasks_one_at_a_time_and_puts_the_chunk_size_back(monkeypatch):
    """scan_cpu._dynamic_tasks (around every kernel launch) sets numba's chunk size to 1 and the
    thread count to torch's, and puts the chunk size back after; through numba's threading-layer
    functions (what svp uses: the public ones take a process-wide lock on every call) and
    through the public functions alike."""
    import numba
    import torch
    from svp.ops import scan_cpu
    fast, public = scan_cpu._thread_fns(), scan_cpu._public_thread_fns()
    assert fast != public   # this numba has them (else slower, not wrong)
    before = torch.get_num_threads()
    chunk = numba.set_parallel_chunksize(3)
    try:
        for fns in (fast, public):
            monkeypatch.setattr(scan_cpu, "_THREAD_FNS", [fns])
            for n in (1, 2):
                torch.set_num_threads(n)
                with scan_cpu._dynamic_tasks():
                    assert numba.get_parallel_chunksize() == 1
                    assert numba.get_num_threads() == min(n, numba.config.NUMBA_NUM_THREADS)
                assert numba.get_parallel_chunksize() == 3
    finally:
        numba.set_parallel_chunksize(chunk)
        torch.set_num_threads(before)


LIMITED = """import threading
import torch
import svp
import numba
from svp.errors import BackendError
from svp.ops.norm_cpu import add_rms_norm_cpu
def refuse(self):   # as under a limit on processes and threads (ulimit -u, non-root)
    raise RuntimeError("can't start new thread")
start, threading.Thread.start = threading.Thread.start, refuse
try:
    add_rms_norm_cpu(torch.randn(2, 9, 64), None, torch.ones(64), 1e-5)
except BackendError as e:
    print("refused:", e)
try:
    numba.threading_layer()
    print("layer started")
except ValueError:
    print("layer not started")
threading.Thread.start = start
print(add_rms_norm_cpu(torch.ones(2, 9, 64), None, torch.ones(64), 1e-5)[0].shape)
threading.Thread.start = refuse   # the layer runs: not checked again (SVP_CPU_DEDICATED started it at import)
from svp.ops import scan_cpu
scan_cpu._start_numba_threads()
print("checked once")
"""


@pytest.mark.slow  # starts a process
def test_threads_that_cannot_start_are_one_error_before_numba_starts_its_pool():
    """numba's threading layers cannot start their threads under a limit on processes (ulimit -u
    as non-root): TBB's aborted the process, the workqueue layer hung. svp checks first that a
    pool's worth of threads can start, and says so in a line naming the limit, before numba
    tries; where threads can start again, the kernels run."""
    out = subprocess.run([sys.executable, "-c", LIMITED], capture_output=True, text=True, timeout=300, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("refused: svp's CPU kernels cannot start numba's pool of ")
    assert "ulimit -u" in lines[0] and "SVP_SCAN_BACKEND=torch" in lines[0]
    assert lines[1] == "layer not started"
    assert lines[2] == "torch.Size([9, 64])" and lines[3] == "checked once"
