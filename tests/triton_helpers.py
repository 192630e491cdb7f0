"""What the Triton test modules share (test_scan_triton, test_conv_triton, test_norm_triton):
the module skipped where the backend cannot load, and every test run under Triton's
interpreter, on CPU tensors, with no scan backend forced before or after it."""
from __future__ import annotations

import pytest

from svp.ops import dispatch, set_backend


def require_triton():
    """Triton, or the calling module skipped: not installed, or too old for the backend
    (Triton 2, torch < 2.4)."""
    triton = pytest.importorskip("triton", reason="Triton is not installed (it ships with Linux CUDA torch wheels)")
    if dispatch._load("triton") is None:
        pytest.skip(dispatch.unavailable_backends()["triton"], allow_module_level=True)
    return triton


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SVP_SCAN_BACKEND", raising=False)
    set_backend(None)
    yield
    set_backend(None)
