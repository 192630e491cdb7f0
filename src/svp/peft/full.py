"""Full fine-tuning: every backbone parameter and the head are trained.

The backbone runs in training mode while training (its DropPath schedule active),
unless the config sets ``backbone_train_mode=False``."""
from __future__ import annotations

import dataclasses

from .base import PeftConfig, PeftMethod
from .registry import register_method


@dataclasses.dataclass
class FullConfig(PeftConfig):
    method = "full"


class FullFineTune(PeftMethod):
    default_backbone_train_mode = True
    mergeable = True   # (trained in place)

    def trainable_base_names(self, model):
        return [n for n, _ in model.named_parameters()]


register_method("full", FullConfig, FullFineTune)
