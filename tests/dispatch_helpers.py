"""What tests that count a step's operators share: a dispatch mode counting the aten calls a
predicate picks while it is entered (autograd's own included, e.g. the zeros it fills)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """``with CountOps(match) as ops: ...``, then ``ops.count``: the calls for which
    ``match(func, args)`` was true."""

    def __init__(self, match):
        super().__init__()
        self.match = match
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.match(func, args):
            self.count += 1
        return func(*args, **(kwargs or {}))


def casts_of(shape) -> CountOps:
    """Counts the casts (``_to_copy``) of tensors of ``shape``."""
    return CountOps(lambda func, args: func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == tuple(shape))
