"""The run's random generators, seeded in one place by the run's setup, the training loop
(each step) and the per-sample transforms (a module of its own: each of those imports it, and
it imports none of them)."""
from __future__ import annotations

from ..compat import SEED_LIMIT


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators from one seed (numpy's takes it modulo 2**32:
    the per-step and per-sample seeds svp.engine.distributed.derive_seed draws are 64-bit)."""
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % SEED_LIMIT)
    torch.manual_seed(seed)
