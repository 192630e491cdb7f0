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


class Fills:
    """Counts the zero-filled tensors made while it is entered (``zeros``, ``zero_``,
    ``fill_``, ``zeros_like``, ``new_zeros``), autograd's included: where a Function lets
    autograd materialise the gradient of an output nobody used, a zero tensor appears here."""

    NAMES = ("zeros", "zero_", "fill_", "zeros_like", "new_zeros")

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ in Fills.NAMES:
                    outer.count += 1
                return func(*args, **(kwargs or {}))

        self.count = 0
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)
