"""The divergence guard: a run stops at the first step that makes its numbers non-finite,
before any of them reaches a resume point, an adapter or ``best/``.

A finite loss does not mean finite weights: with a huge learning rate one step can turn
the weights (or AdamW's moments, or the EMA copy) into inf/NaN while the loss of that
step was ~1e11. So, besides the loss, the loop asks the guard about

* the gradients, after ``backward`` and before ``optimizer.step`` (nothing has changed
  yet, so a resume point written then is finite), unless a float16 GradScaler is on
  (it skips steps with inf gradients by design); and
* the trainable weights, the optimizer state and the EMA weights, after the step.

For the second check the guard keeps a copy of the trainable weights and their optimizer
state from before the step (:meth:`DivergenceGuard.snapshot`) and puts it back when the
step broke them (:meth:`DivergenceGuard.restore`): the ``nonfinite/`` dump then holds the
last finite weights and the batch that broke them, and the resume point written is the
one before the step, finite, from which a run continues with a lower ``train.lr``. The
copy costs the trainable weights and their optimizer state once more in memory (small
for the PEFT methods; about three times the model for full fine-tuning with AdamW), a
copy per step and one device sync per step.

On one CUDA device that sync per step is what train.finite_check=interval (its ``auto``
there) avoids: the loop then asks the guard about the state only every ``run.log_every``
steps and before every save, where it reads the loss sum anyway; the copy is taken at each
check that passes, and a check that fails puts it back and stops, naming the steps between
the two checks (a non-finite gradient always reaches the weights or the optimizer's moments, so
checking the state finds it too).
"""
from __future__ import annotations

import copy
import os
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from . import checkpoint as ck
from .distributed import barrier
from .signals import NonFiniteLoss, resume_command

Named = Iterable[Tuple[str, torch.Tensor]]


def nonfinite_names(named: Named, limit: int = 5) -> List[str]:
    """Names of the (floating-point) tensors holding inf/NaN, at most ``limit`` of them;
    one host sync for the whole set."""
    items = [(n, t) for n, t in named if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not items:
        return []
    # one float64 sum per tensor: finite float32/16 values cannot overflow it, and any inf/NaN
    # makes it non-finite (one kernel per tensor instead of isfinite + all)
    sums = torch.stack([t.sum(dtype=torch.float64).to(items[0][1].device) for _, t in items])
    flags = torch.isfinite(sums)
    if bool(flags.all()):
        return []
    bad = (~flags).nonzero().flatten().tolist()
    return [items[i][0] for i in bad[:limit]]


def finite_check_mode(setting: str, device: torch.device, distributed: bool) -> str:
    """train.finite_check resolved: "step" or "interval". ``auto`` is "interval" on one CUDA
    device, where each per-step check is a host sync (a distributed run reads every step's
    loss on the host anyway), and "step" elsewhere, where a check costs no sync."""
    if setting != "auto":
        return setting
    return "interval" if device.type == "cuda" and not distributed else "step"


def trainable(model: torch.nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    for n, p in model.named_parameters():
        if p.requires_grad:
            yield n, p


def gradients(model: torch.nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    for n, p in trainable(model):
        if p.grad is not None:
            yield f"grad/{n}", p.grad


def optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                yield f"optimizer/{names.get(id(p), '?')}/{k}", v


class DivergenceGuard:
    """Per-step finiteness checks of one model/optimizer (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema=None,
                 check_grads: bool = True):
        self.model, self.optimizer, self.ema = model, optimizer, ema
        self.check_grads = check_grads
        self._before: Optional[Dict[str, torch.Tensor]] = None
        self._opt_before: Dict[str, Optional[dict]] = {}

    def snapshot(self) -> None:
        """Remember the trainable weights and their optimizer state before the step (the
        buffers are reused from step to step)."""
        with torch.no_grad():
            weights = list(trainable(self.model))
            if self._before is None:
                self._before = {n: p.detach().clone() for n, p in weights}
            else:
                dst, src = [self._before[n] for n, _ in weights], [p for _, p in weights]
                if hasattr(torch, "_foreach_copy_"):  # one fused call (torch >= 2.2)
                    torch._foreach_copy_(dst, src)
                else:  # pragma: no cover - older torch
                    for d, q in zip(dst, src):
                        d.copy_(q)
            old, self._opt_before = self._opt_before, {}
            for n, p in weights:
                st = self.optimizer.state.get(p)
                self._opt_before[n] = None if not st else {
                    k: _keep(v, (old.get(n) or {}).get(k)) for k, v in st.items()}

    def restore(self) -> None:
        """Put back what :meth:`snapshot` kept: the model and optimizer are as before the step."""
        with torch.no_grad():
            weights = dict(trainable(self.model))
            for n, p in weights.items():
                p.copy_(self._before[n])
            for n, kept in self._opt_before.items():
                if kept is None:
                    self.optimizer.state.pop(weights[n], None)  # the step created the state
                else:
                    self.optimizer.state[weights[n]] = {k: _keep(v, None) for k, v in kept.items()}

    def bad_gradients(self) -> List[str]:
        return nonfinite_names(gradients(self.model)) if self.check_grads else []

    def bad_state(self) -> List[str]:
        """Non-finite tensors among the weights, the optimizer state and the EMA weights."""
        weights = dict(trainable(self.model))
        named = list(weights.items()) + list(optimizer_state(self.optimizer, self.model))
        if self.ema is not None:
            named += [(f"ema/{n}", p) for n, p in self.ema.module.named_parameters() if n in weights]
        return nonfinite_names(named)


def _keep(v, buf):
    """A copy of ``v`` (into ``buf`` when it fits)."""
    if not torch.is_tensor(v):
        return copy.deepcopy(v)
    if buf is not None and buf.shape == v.shape and buf.dtype == v.dtype and buf.device == v.device:
        return buf.copy_(v)
    return v.detach().clone()


# The two ways a run stops on non-finite numbers; ``run`` is the loop's Trainer.
def check_saved_state(run, st) -> None:
    """Before a resume point, an adapter or best/ is written: the state must be finite
    (not reached when the per-step checks hold; the last line of defence)."""
    bad = run.guard.bad_state()
    if bad:
        msg = (f"non-finite state ({', '.join(bad)}) at step {st['global_step']}; nothing was saved (the "
               f"last resume point is kept in {run.folder.file('resume.safetensors')})")
        raise NonFiniteLoss(msg, run.folder.path, st["global_step"])


def stop_nonfinite(run, st, step_no, what, x, y, checked: Optional[int] = None, batch: Optional[int] = None,
                   dump_rank: int = 0):
    """Stop at step ``step_no`` whose ``what`` went non-finite. The model and optimizer
    are as before the step (finite): they go to the dump with the batch. The last resume
    point is kept (the state before the step may already be spoilt by a too-high rate,
    finite but useless): the state before the step becomes the resume point only when
    there is none yet and it is the run's start (step 0), else it is kept in the dump.
    ``batch``: the step's place in its epoch (default: the one after ``st['batch']``, the
    step not yet counted). ``dump_rank``: the rank that writes the dump, its own batch (the one
    whose loss was not finite; the weights are every rank's).

    ``checked``: with train.finite_check=interval the loop has put back the state as after
    step ``checked``, the last check that found it finite. That state goes to the dump with
    the last batch; it never becomes a resume point (the run's counters, data order and
    schedule are at ``step_no``)."""
    sched, folder = run.sched, run.folder
    batch = st["batch"] + 1 if batch is None else batch
    info = {"step": step_no, "epoch": st["epoch"] + 1, "batch_in_epoch": batch,
            "batches_per_epoch": run.steps_per_epoch, "what": what, "lr": sched.lr(), "rank": int(dump_rank)}
    if checked is not None:
        info["weights_as_after_step"] = checked
    out_dir = folder.file("nonfinite")
    resume = folder.file(ck.RESUME_FILE)
    kept = os.path.isfile(resume)
    # with no resume point yet, the state before the step becomes one only when it is the run's
    # start: after steps at the diverging rate it was often spoilt while still finite (QA 16b: a
    # full fine-tune at lr 1e3 broke at step 2; resumed from the state after step 1, |w| ~ 1e3, it
    # broke again at any rate, train.lr=0 too), so the advice to resume with a lower rate failed
    start = st["global_step"] == 0
    before = resume if not kept and start else os.path.join(out_dir, "resume_before_step.safetensors")
    finite = not run.guard.bad_state()
    if run.dist.rank == dump_rank:
        folder.dump_nonfinite(info, x, y, run.model)
    if run.dist.is_main:
        if finite and checked is None:
            os.makedirs(out_dir, exist_ok=True)   # (another rank may be the one writing the dump)
            folder.save_resume(st, run.model, run.optimizer, sched, run.prec.scaler, run.ema, path=before)
    barrier(run.dist)
    where_at = f"at step {step_no} (epoch {st['epoch'] + 1}, batch {batch}/{run.steps_per_epoch}, lr {sched.lr():.3e})"
    if checked is not None:
        where = (f"the last resume point ({resume}) is kept: continue from it with a lower rate, "
                 f"{resume_command(folder.path)} train.lr=..." if kept else
                 "no resume point was written (the run's counters are past those weights): start again with a "
                 "lower train.lr")
        msg = (f"{what} {where_at}; training stopped. train.finite_check=interval checks the state every "
               f"run.log_every steps and last found it finite after step {checked}: that state is put back, steps "
               f"{checked + 1}-{step_no} undone (train.finite_check=step finds the step that broke it, at a host "
               f"sync per step). The last batch and the weights as after step {checked} are in {out_dir}; {where}")
        raise NonFiniteLoss(msg, folder.path, step_no)
    if kept:
        where = (f"the last resume point ({resume}) is kept: continue from it with a lower rate, "
                 f"{resume_command(folder.path)} train.lr=...")
        if finite:
            where += f" (the state just before the step is in {before})"
    elif finite and start:
        where = (f"a resume point before the step is in {resume} (continue with a lower rate: "
                 f"{resume_command(folder.path)} train.lr=...)")
    elif finite:
        where = (f"the run had no resume point yet, and the state before the step, after {st['global_step']} "
                 f"step(s) at this rate, may already be spoilt (it is in {before}; moved to {resume}, a --resume "
                 f"continues from it): start the run again with a lower train.lr (the folder holds nothing to "
                 f"resume: its run.name can train again)")
    else:
        where = "the state was not finite before the step, so no resume point was written"
    msg = (f"{what} {where_at}; training stopped. The batch and the weights before the step are in "
           f"{out_dir}; {where}")
    raise NonFiniteLoss(msg, folder.path, step_no)
