"""`svp serve` as a process: SIGTERM / Ctrl-C let the in-flight request finish, then exit 0."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("uvicorn")

import serve_helpers as H  # noqa: E402
from proc_helpers import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_serve_without_adapters_folder_is_one_clear_error(tmp_path, capsys):
    from svp.cli import main
    assert main(["serve", "--adapters", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err


@pytest.mark.parametrize("flags,words", [
    (["--window-ms", "inf"], "--window-ms inf: expected milliseconds in 0..60000"),   # never answered a lone request
    (["--window-ms", "nan"], "--window-ms nan: expected"),
    (["--max-upload-mb", "nan"], "--max-upload-mb nan: expected a size"),              # a traceback
    (["--max-upload-mb", "1e-9"], "--max-upload-mb 1e-09: expected a size in MB of at least one byte"),
    (["--max-batch", "0"], "--max-batch 0: expected >= 1"),
    (["--shutdown-timeout", "inf"], "--shutdown-timeout inf: expected seconds"),
])
def test_serve_refuses_each_bad_limit_by_name_before_loading_anything(tmp_path, capsys, monkeypatch, flags, words):
    import svp.serve.app as app
    from svp.cli import main
    monkeypatch.setattr(app, "build_app", lambda *a, **k: pytest.fail("built an app"))
    assert main(["serve", "--adapters", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("svp serve: error: ") and words in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("flags", [[], ["--amp"]], ids=["float32", "amp"])
def test_serve_amp_flag_reaches_the_model(tmp_path, capsys, monkeypatch, flags):
    """--amp is handed to build_app (whose model then runs under autocast: test_serve_app); the
    server is not started (the stand-in refuses, as a bad adapters folder would)."""
    import svp.serve.app as app
    from svp.cli import main
    from svp.errors import ConfigError
    seen = []

    def build_app(*a, amp=False, **k):
        seen.append(amp)
        raise ConfigError("stand-in")
    monkeypatch.setattr(app, "build_app", build_app)
    assert main(["serve", "--adapters", str(tmp_path), *flags]) == 2
    assert seen == [bool(flags)] and "stand-in" in capsys.readouterr().err


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "amp"])
def test_serve_notes_the_adapters_whose_runs_evaluated_in_another_precision(tmp_path, capsys, monkeypatch, amp):
    """An adapter of a train.amp run served in float32 (or a float32 one under --amp) answers other
    probabilities than its run's, a few images another class; eval and predict said so, the server
    did not (review 83). Older folders record no precision and are not named, nor are folders whose
    record is not one svp writes; a float16 run's (CUDA) is another precision either way (retest 84)."""
    import json

    import svp.serve.app as app
    import svp.serve.cli as scli
    from svp.cli import main
    for name, rec in (("a16", "bfloat16"), ("b32", None), ("c16", "float16"), ("old", ...), ("odd", "false")):
        (tmp_path / name).mkdir()
        info = {"model": "vim_mini_patch4_32"} if rec is ... else {"model": "vim_mini_patch4_32", "amp": rec}
        (tmp_path / name / "backbone.json").write_text(json.dumps(info))
    report = {"loaded": ["a16", "b32", "c16", "old", "odd"], "refused": {}, "backbone": {"model": "vim_mini_patch4_32",
                                                                          "checkpoint": None}}
    monkeypatch.setattr(app, "build_app", lambda *a, **k: (None, report))

    class Stop(Exception):
        pass

    class Server:
        def __init__(self, config):
            raise Stop()
    monkeypatch.setattr(scli, "_server_class", lambda: Server)
    with pytest.raises(Stop):
        main(["serve", "--adapters", str(tmp_path), *(["--amp"] if amp else [])])
    err = capsys.readouterr().err
    other = "b32, c16" if amp else "a16, c16"   # (a value edited by hand counts as no record)
    assert (f"svp serve: note: 2 adapter(s) ({other}) were evaluated by their runs "
            f"{'in float32 or float16 autocast' if amp else 'under train.amp'}, served here "
            f"{'under bfloat16 autocast (--amp)' if amp else 'in float32'}: their answers differ") in err, err


def test_a_max_pixels_above_pillows_limit_is_the_servers(tmp_path, capsys, monkeypatch):
    """A 225 M-pixel image under --max-pixels 400000000 was refused with Pillow's own limit
    (178956970, twice PIL.Image.MAX_IMAGE_PIXELS), a 100 M one accepted with its warning (review)."""
    from PIL import Image

    import svp.serve.app as app
    from svp.cli import main
    from svp.errors import ConfigError
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)   # (restored after the test)

    def build_app(*a, **k):
        raise ConfigError("stand-in")
    monkeypatch.setattr(app, "build_app", build_app)
    assert main(["serve", "--adapters", str(tmp_path), "--max-pixels", "1000"]) == 2
    assert Image.MAX_IMAGE_PIXELS == 89_478_485   # a lower limit is the server's own check
    assert main(["serve", "--adapters", str(tmp_path), "--max-pixels", "400000000"]) == 2
    assert Image.MAX_IMAGE_PIXELS == 400_000_000 and "stand-in" in capsys.readouterr().err


@pytest.mark.slow  # starts processes
@pytest.mark.floor   # the oldest uvicorn's shutdown
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_in_flight_requests_then_exits_0(tmp_path, sig):
    H.make_adapters(str(tmp_path / "ad"), names=["svp", "lora"])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # a 1 s batching window keeps the request in flight while the signal arrives (0.5 s after it);
    # the shutdown timeout (2.5 s) then ends the stalled one, the predicted one answered before
    proc = subprocess.Popen([sys.executable, "-m", "svp", "serve", "--adapters", str(tmp_path / "ad"),
                             "--port", str(port), "--window-ms", "1000", "--shutdown-timeout", "2.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if H.http("GET", url + "/healthz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        result = []
        t = threading.Thread(target=lambda: result.append(H.predict(url, H.png_bytes(40), "lora", timeout=60)))
        t.start()
        # a client that stalls mid-upload: without --shutdown-timeout it held the server forever
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100000\r\n\r\n{\"adapter\": \"svp\", ")
        time.sleep(0.5)  # the request is waiting in the batcher now
        t0 = time.monotonic()
        proc.send_signal(sig)
        t.join(60)
        rc = proc.wait(60)
        took = time.monotonic() - t0
        out, err = proc.communicate()
        stalled.settimeout(10)
        answer = stalled.recv(4096)
        stalled.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert result and result[0][0] == 200, (result, err)
    assert rc == 0, err
    assert took < 30, (took, err)  # the shutdown timeout (2.5 s) ended the stalled request
    assert b" 503 " in answer.split(b"\r\n", 1)[0] and b"shutting down" in answer, answer
    assert "Traceback" not in err, err


THREADED = """import json, os, sys
sys.path.insert(0, {tests!r})
import numba
import serve_helpers as H
import torch
from svp.serve.app import build_app
from svp.serve.model import MultiAdapterModel
seen = []
forward = MultiAdapterModel.forward
def recording(self, *a, **k):
    out = forward(self, *a, **k)
    seen.append(numba.get_num_threads())   # what this thread's kernels ran on
    return out
MultiAdapterModel.forward = recording
torch.set_num_threads(1)                        # what `svp serve --threads 1` does first
app, _ = build_app(H.make_adapters({root!r}, names=["svp"]))
s = H.ServerThread(app).start()
status, _ = H.predict(s.url, H.png_bytes(40), "svp")
s.stop()
print(json.dumps({{"status": status, "seen": seen, "pool": numba.config.NUMBA_NUM_THREADS}}))
"""


@pytest.mark.slow  # starts a process
@pytest.mark.parametrize("dedicated", [False, True])
def test_serve_threads_reach_the_kernels_in_the_inference_thread(tmp_path, dedicated):
    """--threads sets torch's count; numba's is per thread, and the server's model thread never
    set it: the kernels must follow torch's there too (they ran on every core before). Also with
    SVP_CPU_DEDICATED, where numba's OpenMP layer shares torch's thread count: started lazily in
    the model thread, it set that thread's count to numba's pool size."""
    import json
    if dedicated:
        from svp.ops.scan_cpu import _torch_libgomp
        if _torch_libgomp() is None:
            pytest.skip("this torch has no bundled libgomp: SVP_CPU_DEDICATED changes only the spin count")
    code = THREADED.format(tests=os.path.join(ROOT, "tests"), root=str(tmp_path / "ad"))
    env = {k: v for k, v in _env().items() if k != "SVP_CPU_DEDICATED"}
    if dedicated:
        env["SVP_CPU_DEDICATED"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["status"] == 200 and res["seen"] and set(res["seen"]) == {1}, res


def test_a_second_ctrl_c_is_a_quiet_stop():
    """A second Ctrl-C makes uvicorn exit at once and cancel the tasks it did not wait for: the
    application's lifespan came out as a ~30-line CancelledError traceback (starlette sends it as
    text), and the batcher's stop raised the loop task's cancellation. (Timed by hand with two
    SIGINTs 0.02-1 s apart: exit 0, one line on stderr.)"""
    import asyncio
    import logging
    import traceback

    from svp.serve.app import Batcher, ServeConfig
    from svp.serve.cli import _forced_exit_cancellation

    def record(msg, exc=None):
        return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, msg, None,
                                 (type(exc), exc, None) if exc else None)

    try:
        raise asyncio.CancelledError()
    except asyncio.CancelledError as e:
        text = traceback.format_exc()
        assert not _forced_exit_cancellation(record(text))
        assert not _forced_exit_cancellation(record("Exception in 'lifespan' protocol\n", e))
    assert _forced_exit_cancellation(record("Traceback (most recent call last):\n ... ValueError: x\n"))
    assert _forced_exit_cancellation(record("Application shutdown failed. Exiting."))

    async def cancelled_loop():
        b = Batcher(lambda *a: None, None, ServeConfig(), metrics=None)
        b.start()
        await asyncio.sleep(0)
        b._task.cancel()          # what uvicorn's forced exit does to every task
        await b.stop()            # was: CancelledError
        return b._task.cancelled()

    assert asyncio.run(cancelled_loop())


def test_a_second_sigterm_stops_the_server_at_once_as_a_second_ctrl_c_does():
    """uvicorn forces its exit on a second SIGINT only: a second SIGTERM (`kill` twice, a
    supervisor) waited out the whole --shutdown-timeout (review49: 10.5 s with the default)."""
    import signal

    import uvicorn

    from svp.serve.cli import _server_class

    for first, second in [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGTERM),
                          (signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGINT)]:
        server = _server_class()(uvicorn.Config(app=None))
        server.handle_exit(first, None)
        assert server.should_exit and not server.force_exit, first   # the graceful shutdown
        server.handle_exit(second, None)
        assert server.force_exit, (first, second)


def test_the_start_line_names_the_first_ten_adapters_and_counts_the_rest():
    from svp.serve.cli import _some
    names = [f"a{k}" for k in range(12)]
    assert _some(names) == ", ".join(names[:10]) + ", and 2 more (GET /v1/adapters)"
    assert _some(names[:10]) == ", ".join(names[:10])
