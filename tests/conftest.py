import json
import math
import os
import sys

import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
sys.path.insert(0, FIXTURES)


_COLD_TEST = "test_cpu_kernels_give_the_same_bits_compiled_or_loaded_from_cache"
_cold = []   # (temporary folder, the process)


def pytest_collection_finish(session):
    """The compiling process of test_scan_backends' cache test takes ~25 s of one core: where
    numba's cache already holds the kernels (so this process will load them, and the test needs
    a process that compiles), start it once the selected tests are known, so it overlaps the
    tests that run before it. In a fresh checkout this process compiles them itself."""
    for item in session.items:
        if item.name == _COLD_TEST and item.module.kernels_cached():
            import tempfile
            tmp = tempfile.mkdtemp(prefix="svp-cold-cache-")
            _cold.append((tmp, item.module.start_cold_process(tmp)))
            return


def pytest_sessionfinish(session):
    import shutil
    for tmp, proc in _cold:
        if proc.poll() is None:   # the test did not get to it (e.g. -x stopped the session first)
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


# what a test may not leave changed for the tests after it: numba's cache folder (a test that left
# NUMBA_CACHE_DIR set made every later test's process compile the kernels afresh, minutes of CI,
# and failed the compiled-or-cached test), and the scan backend forced
_KEPT_ENV = ("NUMBA_CACHE_DIR", "SVP_SCAN_BACKEND", "TRITON_INTERPRET")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    env = {k: os.environ.get(k) for k in _KEPT_ENV}
    yield
    changed = {k: (v, os.environ.get(k)) for k, v in env.items() if os.environ.get(k) != v}
    assert not changed, f"the test left the environment changed (before, after): {changed}"


@pytest.fixture
def logged():
    """``with logged(name, level) as messages:`` the messages logger ``name`` emits at ``level``
    and above, read by a handler on that logger itself, its level and ``disabled`` set for the
    block and put back after. Not caplog: a run earlier in the process leaves ``svp.engine`` not
    propagating to caplog's root handler, and pytest 8 then attaches its capture handlers to such
    loggers too, so caplog sees a record once or twice depending on what ran before."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def capture(name, level):
        log = logging.getLogger(name)
        messages = []
        handler = logging.Handler(level)
        handler.emit = lambda record: messages.append(record.getMessage())
        old_level, disabled = log.level, log.disabled
        log.addHandler(handler)
        log.setLevel(level)
        log.disabled = False
        try:
            yield messages
        finally:
            log.removeHandler(handler)
            log.setLevel(old_level)
            log.disabled = disabled
    return capture


@pytest.fixture
def predicted_test_metrics(tmp_path, capsys):
    """``f(adapter_dir, n) -> (top-1 %, top-5 %, mean cross-entropy)`` of an adapter folder on the
    first ``n`` digits test images, from `svp predict` on image files with every class's
    probability: a path independent of the training loop's evaluation, to check its numbers."""
    from svp.cli import main as svp_main
    from svp.data import build_dataset

    def metrics(adapter_dir, n):
        ds = build_dataset("digits", "test")
        paths, labels = [], []
        for i in range(n):
            img, label = ds[i]
            paths.append(str(tmp_path / f"predict_{i}.png"))
            img.save(paths[-1])
            labels.append(label)
        capsys.readouterr()
        assert svp_main(["predict", str(adapter_dir), *paths, "--topk", str(ds.num_classes), "--json"]) == 0
        preds = json.loads(capsys.readouterr().out)
        assert [p["image"] for p in preds] == paths
        ranks = [[t["index"] for t in p["top"]].index(y) for p, y in zip(preds, labels)]
        prob = [next(t["prob"] for t in p["top"] if t["index"] == y) for p, y in zip(preds, labels)]
        # predict reports float32 probabilities: a confident wrong answer (the demo's linear
        # head at lr 1) can underflow to exactly 0, whose loss is infinite, not an error
        return (100.0 * sum(r < 1 for r in ranks) / n, 100.0 * sum(r < 5 for r in ranks) / n,
                sum(-math.log(q) if q > 0 else math.inf for q in prob) / n)

    return metrics
