"""Linear probing: only the classification head is trained."""
from __future__ import annotations

import dataclasses

from .base import PeftConfig, PeftMethod
from .registry import register_method


@dataclasses.dataclass
class LinearConfig(PeftConfig):
    method = "linear"


class LinearProbe(PeftMethod):
    """No parameters of its own; the harness makes the head the only trainable part."""
    serve_shared = True
    mergeable = True   # (trained in place)


register_method("linear", LinearConfig, LinearProbe)
