"""What the Triton test modules share (test_scan_triton, test_conv_triton, test_norm_triton):
the module skipped where the backend cannot load, and every test run under Triton's
interpreter, on CPU tensors, with no scan backend forced before or after it."""
from __future__ import annotations

import pytest

from dispatch_helpers import CountOps
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


FILLS = ("zeros", "zero_", "fill_", "zeros_like", "new_zeros")


def Fills() -> CountOps:   # noqa: N802  (used as ``with Fills() as fills``, like a class)
    """Counts the zero-filled tensors made while it is entered, autograd's included: where a
    Function lets autograd materialise the gradient of an output nobody used, a zero tensor
    appears here."""
    return CountOps(lambda func, args: func.overloadpacket.__name__ in FILLS)
