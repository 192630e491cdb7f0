"""Hooks the training loop calls at fixed points of a step. The only ones today are the
fault injections of the ``debug.*`` keys, used by the tests of resume and divergence."""
from __future__ import annotations

import os
import signal

import torch


class Hooks:
    """No-op hooks; subclass and override what you need."""

    def on_loss(self, step_no: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of step ``step_no`` (1-based) before it is checked and back-propagated."""
        return loss

    def after_optimizer_step(self, step_no: int, model) -> None:
        """Right after the optimizer step of step ``step_no``, before the divergence guard
        looks at the weights (tests break the weights here)."""

    def stop_requested(self, global_step: int) -> bool:
        """After step ``global_step``: stop here with a resume point (exit 75)?"""
        return False

    def after_step(self, global_step: int) -> None:
        """After the step and any resume point it wrote."""


class DebugHooks(Hooks):
    """``debug.nan_at_step`` (loss times NaN), ``debug.stop_at_step`` (clean stop),
    ``debug.kill_at_step`` (SIGKILL to this process, after the step's resume point)."""

    def __init__(self, debug: dict):
        self.nan_at = debug.get("nan_at_step")
        self.stop_at = debug.get("stop_at_step")
        self.kill_at = debug.get("kill_at_step")

    def on_loss(self, step_no, loss):
        if self.nan_at is not None and step_no == int(self.nan_at):
            return loss * float("nan")
        return loss

    def stop_requested(self, global_step):
        return self.stop_at is not None and global_step == int(self.stop_at)

    def after_step(self, global_step):
        if self.kill_at is not None and global_step == int(self.kill_at):
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))   # (Windows has no SIGKILL)


def hooks_for(cfg: dict) -> Hooks:
    dbg = cfg.get("debug") or {}
    return DebugHooks(dbg) if any(v is not None for v in dbg.values()) else Hooks()
