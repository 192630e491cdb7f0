"""Learning-rate schedule: timm's CosineLRScheduler (or MultiStepLRScheduler) with linear warm-up.

Two stepping modes (``train.sched_step``):

* ``epoch`` (official): the rate is constant within an epoch. With
  ``train.official_epoch_offset`` (default) it reproduces the official loop, which
  calls ``scheduler.step(epoch)`` *after* epoch ``epoch``: epoch 0 and epoch 1 both run
  at ``warmup_lr`` and epoch ``e >= 1`` runs at ``lr(e - 1)``. Without the offset,
  epoch ``e`` runs at ``lr(e)``.
* ``step``: the same curve over optimizer steps (warm-up and cosine measured in steps).

The rate of an epoch/step is a pure function of its index, so resuming needs no
scheduler state (it is saved anyway).
"""
from __future__ import annotations

import functools
import logging
from typing import List

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler


@functools.lru_cache(maxsize=None)
def timm_milestone_shift() -> int:
    """What to add to a PyTorch-style milestone (the index from which the rate is decayed) for
    timm's MultiStepLRScheduler to decay at the same index: 1 with timm's convention (milestone m
    applied at index m - 1), 0 with PyTorch's. Measured on a one-parameter schedule."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    probe = MultiStepLRScheduler(opt, decay_t=[2], decay_rate=0.5, warmup_t=0, warmup_prefix=False)
    for index in range(4):
        probe.step(index)
        if opt.param_groups[0]["lr"] < 1.0:
            return 2 - index
    raise RuntimeError("timm's MultiStepLRScheduler did not decay at a milestone of 2 within 4 steps")


class Schedule:
    def __init__(self, optimizer: torch.optim.Optimizer, cfg: dict, steps_per_epoch: int):
        t = cfg["train"]
        self.mode = t["sched_step"]
        self.offset = bool(t["official_epoch_offset"])
        self.kind = t["sched"]
        self.optimizer = optimizer
        epochs = int(t["epochs"])
        per = 1 if self.mode == "epoch" else max(1, steps_per_epoch)
        if self.kind == "constant":
            # train.layer_decay's per-group factors (timm's "lr_scale"), which timm's schedulers apply
            # at each step: a constant rate is set once, here (and put back at --resume from base_lrs)
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * g.get("lr_scale", 1.0)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.sched = None
        if self.kind == "cosine":
            # a schedule of one step (one epoch stepped per epoch) is constant, as it should be:
            # timm's warning that the cosine "will have no effect" reached every such run's console
            quiet = logging.getLogger(CosineLRScheduler.__module__)
            level = quiet.level
            if epochs * per == 1:
                quiet.setLevel(logging.ERROR)
            try:
                self.sched = CosineLRScheduler(
                    optimizer, t_initial=epochs * per, lr_min=float(t["min_lr"]),
                    warmup_t=int(round(float(t["warmup_epochs"]) * per)), warmup_lr_init=float(t["warmup_lr"]),
                    warmup_prefix=False, cycle_limit=1, t_in_epochs=(self.mode == "epoch"))
            finally:
                quiet.setLevel(level)
        elif self.kind == "multistep":
            # timm applies a milestone m at index m - 1 (its documented convention); + 1 gives
            # PyTorch's MultiStepLR, which users' epochs mean: [30] decays from index 30, the 31st
            # epoch. Counted from the start, warm-up included (warmup_prefix=False, as the cosine).
            # The shift is measured on the installed timm, not assumed (a timm that took PyTorch's
            # convention would decay every run one epoch late, unsaid: retest 93)
            shift = timm_milestone_shift()
            self.sched = MultiStepLRScheduler(
                optimizer, decay_t=[int(m) * per + shift for m in t["decay_epochs"]],
                decay_rate=float(t["decay_rate"]),
                warmup_t=int(round(float(t["warmup_epochs"]) * per)), warmup_lr_init=float(t["warmup_lr"]),
                warmup_prefix=False, t_in_epochs=(self.mode == "epoch"))

    def start_epoch(self, epoch: int) -> None:
        if self.sched is not None and self.mode == "epoch":
            self.sched.step(max(epoch - 1, 0) if self.offset else epoch)

    def before_step(self, global_step: int) -> None:
        if self.sched is not None and self.mode == "step":
            self.sched.step_update(global_step)

    def lr(self) -> float:
        """The schedule's rate now: the head's (train.layer_decay scales the others' below it)."""
        g = max(self.optimizer.param_groups, key=lambda g: g.get("lr_scale", 1.0))
        return float(g["lr"] / g.get("lr_scale", 1.0))

    def state_dict(self):
        return {"mode": self.mode, "offset": self.offset,
                "timm": self.sched.state_dict() if self.sched is not None else {}}

    def load_state_dict(self, sd):
        if self.sched is not None and sd.get("timm"):
            self.sched.load_state_dict(sd["timm"])


def lr_at_epoch(cfg: dict, epoch: int, peak: float) -> float:
    """The official per-epoch rate (for docs/tests), without building an optimizer."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=peak)
    s = Schedule(opt, cfg, 1)
    s.start_epoch(epoch)
    return s.lr()


def schedule_notes(cfg: dict, peak: float) -> List[str]:
    """What a run's log should say of a schedule that does not do what its numbers suggest
    (each trained as asked, silently: a warm-up as long as the run stayed at train.warmup_lr,
    train.lr=0 stepped at the warm-up and floor rates)."""
    t, notes = cfg["train"], []
    if t["decay_epochs"] and t["sched"] != "multistep":   # (set for a --tune grid's multistep points, say)
        notes.append(f"train.decay_epochs {list(t['decay_epochs'])} is read only with train.sched=multistep: "
                     f"this run's {t['sched']} schedule does not use it")
    if t["sched"] == "constant":
        return notes
    epochs, warmup = int(t["epochs"]), float(t["warmup_epochs"])
    per_epoch = t["sched_step"] == "epoch"
    if per_epoch:
        # as Schedule steps it (whole epochs of warm-up: the config refuses fractions here): with
        # the official loop's offset epochs 0 and 1 both at index 0, so that a warm-up one epoch
        # shorter than the run never leaves the warm-up either (the digits preset at --epochs 2)
        whole = int(warmup)
        last = max(epochs - 1 - (1 if t["official_epoch_offset"] else 0), 0)   # the last epoch's index
        all_warmup = last < whole
    else:
        whole, all_warmup = warmup, warmup >= epochs
    if all_warmup:
        said = f"train.warmup_epochs={t['warmup_epochs']}"
        why = (f"{said} is not shorter than train.epochs={t['epochs']}" if whole >= epochs else
               f"{said} with train.epochs={t['epochs']} and the official loop's epoch offset "
               f"(train.official_epoch_offset: epochs 1 and 2 both run at train.warmup_lr)")
        highest = max(lr_at_epoch(cfg, e, peak) for e in range(epochs)) if per_epoch else None
        if highest is not None and highest <= float(t["warmup_lr"]) * (1 + 1e-6):
            what = f"every epoch trains at train.warmup_lr={t['warmup_lr']}, never near the peak {peak:.4g}"
        else:
            what = (f"the whole run is warm-up, its rate rising from train.warmup_lr={t['warmup_lr']}"
                    + (f" to {highest:.4g}" if highest is not None else "") + f", never reaching the peak {peak:.4g}")
        notes.append(f"{why}: {what}")
    if t["sched"] == "multistep":
        # the last epoch's index in the schedule (the official offset runs the last epoch at the
        # one before's rate); a milestone m first acts at index m
        last = max(epochs - 1 - (1 if per_epoch and t["official_epoch_offset"] else 0), 0)
        early = [int(m) for m in t["decay_epochs"] if int(m) < warmup]
        if early:   # (timm's schedule does not decay inside the warm-up: it rises to the peak, then decays)
            notes.append(f"train.decay_epochs {early}: inside the warm-up (train.warmup_epochs={t['warmup_epochs']}),"
                         f" where the rate still rises to the peak; their decay comes at the warm-up's end")
        late = [int(m) for m in t["decay_epochs"] if int(m) > last]
        if late:
            later = ", and the official epoch offset runs each change an epoch later" if (
                per_epoch and t["official_epoch_offset"]) else ""
            notes.append(f"train.decay_epochs {late}: the run ends before the rate decays there (train.epochs="
                         f"{epochs}{later})")
    floor = max(float(t["warmup_lr"]) if float(t["warmup_epochs"]) > 0 else 0.0,
                float(t["min_lr"]) if t["sched"] == "cosine" else 0.0)
    if peak < floor:
        notes.append(f"the peak rate {peak:.4g} is below train.warmup_lr/train.min_lr ({floor:.4g}): the schedule "
                     f"steps at those rates, higher than the peak")
    return notes
