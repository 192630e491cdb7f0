"""What ``svp train --resume RUN key=value ...`` may change, and how a change is recorded.

A resumed run continues the saved configuration. An override is accepted only when it
takes effect exactly from the resume point on:

* ``train.lr`` / ``train.epochs`` / ``train.max_steps``: the learning-rate schedule is a
  pure function of the step (engine/sched.py), so the resumed run simply evaluates the
  schedule of the changed configuration from the resume point's step on (the scheduler
  state saved in the resume point is not reloaded; the optimizer's rate is set from the
  new schedule before every step). Steps before the resume point keep the rates they had.
* how the run is watched or saved (``run.progress``, ``run.log_every``, ``run.tensorboard``, ``run.wandb``,
  ``run.save_every_steps``), where the data lives and how it is read (``data.root``,
  ``data.num_workers``, ``data.cache_images``: the data order, the augmentation and the
  tensors do not depend on them), the device (``train.device``, unless the steps would compute in
  another precision there: refused by the resume point's record), activation checkpointing
  (``model.grad_checkpointing``: the same gradients, bit for bit; a run out of memory resumes
  with it on), and the fault injections (``debug.*``).

Anything else (the model, the method, the data, the optimizer, the batch, the seed, ...)
would leave a run whose saved state and record disagree, so it is refused with one line
listing the keys above. Each accepted change of the training keys is appended to
``run.changes`` in the run's ``config.yaml`` as ``{step, epoch, batch, changes: {key:
[old, new]}}``, and ``results.json`` lists the rate used in each phase (``lr_phases``).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

from ..errors import ResumeError

# keys whose change reshapes training from the resume point on (recorded in run.changes)
TRAINING_KEYS = ("train.lr", "train.epochs", "train.max_steps")
# keys that change nothing that is learned (not recorded)
WATCH_KEYS = ("train.device", "model.grad_checkpointing", "data.root", "data.num_workers", "data.cache_images",
              "run.progress", "run.log_every",
              "run.tensorboard", "run.wandb", "run.save_every_steps")
ACCEPTED = TRAINING_KEYS + WATCH_KEYS + ("debug.*",)


def accepted(key: str) -> bool:
    return key in TRAINING_KEYS or key in WATCH_KEYS or key.startswith("debug.")


_MISSING = object()


def _saved_value(saved: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(saved, dict) or part not in saved:
            return _MISSING
        saved = saved[part]
    return saved


def _same(a: Any, b: Any) -> bool:
    """The same value as the configuration means it: numbers by value (``train.clip_grad=1`` repeats
    a saved 1.0, a preset's ``mixup: 0.0`` is ``train.mixup=0``; both were refused), a boolean only
    as a boolean (``true`` is not 1), lists and mappings item by item."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def check_overrides(parsed: Iterable[Tuple[str, Any]], run_dir: str, saved: Any = None) -> None:
    """Refuse (one line) any override ``--resume`` cannot apply exactly; one that repeats the
    saved configuration's value (``saved``: its config.yaml) changes nothing and passes (the
    command that started the run, with ``--resume`` added)."""
    bad = [k for k, v in parsed if not accepted(k) and not (saved is not None and _same(_saved_value(saved, k), v))]
    if bad:
        raise ResumeError(f"svp train --resume {run_dir}: cannot change {', '.join(bad)} of a started run "
                          f"(its saved state was made with the old value); --resume accepts only "
                          f"{', '.join(ACCEPTED)}. Start a new run to change anything else")


def changes(saved: dict, cfg: dict) -> Dict[str, List[Any]]:
    """``{key: [old, new]}`` for the training keys whose value differs between the saved
    configuration and the one the resumed run uses."""
    out = {}
    for key in TRAINING_KEYS:
        sec, name = key.split(".", 1)
        old, new = saved.get(sec, {}).get(name), cfg[sec][name]
        if old != new:
            out[key] = [old, new]
    return out


def check_reachable(st: dict, epochs: int, max_steps, run_dir: str) -> None:
    """Refuse a resume whose (changed) end lies before its resume point: the run would stop at
    once and report the resume point's weights as those of an end it went past."""
    if st["epoch"] > epochs or (st["epoch"] == epochs and st["batch"] > 0):
        # (a point at an epoch's end needs that epoch, not the next: "0 batches into epoch 6")
        where, need = ((f"already {st['batch']} batches into epoch {st['epoch'] + 1}", st["epoch"] + 1)
                       if st["batch"] > 0 else (f"at the end of epoch {st['epoch']}", st["epoch"]))
        raise ResumeError(f"svp train --resume {run_dir}: train.epochs={epochs}, but the resume point is "
                          f"{where}; expected train.epochs >= {need}")
    if max_steps is not None and st["global_step"] > int(max_steps):
        raise ResumeError(f"svp train --resume {run_dir}: train.max_steps={max_steps}, but the resume point is "
                          f"at step {st['global_step']}; expected train.max_steps >= {st['global_step']} (or null)")


def training_values(cfg: dict) -> Dict[str, Any]:
    """The training keys' values a resume point is saved with (``st['training_values']``)."""
    return {key: cfg[key.split(".")[0]][key.split(".", 1)[1]] for key in TRAINING_KEYS}


def held_from_phases(st: dict, cfg: dict, lr_used: float) -> Any:
    """For a resume point written before svp saved ``training_values`` (2026-12-05): the values it
    was saved with, as its last learning-rate phase records them, so that a hand edit since is
    seen (it was taken unrecorded). ``train.lr`` from the phase's peak rate, which is the base
    rate times the batch's scaling (a resume keeps the batch: ``lr_used`` over the base now is that
    factor); ``train.epochs`` from the phase; ``train.max_steps``, which no phase holds, as it is
    now (an edit of it still goes unseen). None where the resume point has no phase."""
    phases = st.get("lr_phases") or []
    if not phases or not isinstance(phases[-1], dict):
        return None
    last, held = phases[-1], training_values(cfg)
    try:
        peak, base = float(last["peak_lr"]), float(held["train.lr"])
        held["train.epochs"] = int(last["epochs"])
    except (KeyError, TypeError, ValueError):
        return None
    if peak != lr_used and lr_used and base:
        held["train.lr"] = float(f"{peak * base / lr_used:.12g}")
    return held


def since_resume_point(held: Any, cfg: dict, overridden: Dict[str, List[Any]],
                       st: dict) -> Tuple[Dict[str, List[Any]], List[str], Dict[str, Any]]:
    """The training keys' changes that take effect at the resume point ``st``, and those of them
    made by editing config.yaml by hand. ``held``: the values the resume point was saved with
    (None in resume points written before 2026-12-05, where :func:`held_from_phases` cannot say
    them either: then the overrides' ``overridden``, and a hand edit goes unseen). Measured
    against ``held``, a value edited by hand since is a change from this step on, recorded as the
    override would have been (it was taken unrecorded, and the record said the run had used it
    from step 0); an override a --resume made at this same
    step before it was stopped (config.yaml rewritten, no resume point since) is not one. The third
    value: the keys' values before this step, what a resume point written at it, before any step
    ran under the change, is to hold (:meth:`Trainer.save_resume`)."""
    if not isinstance(held, dict):
        return overridden, [], {k: v[0] for k, v in overridden.items()}
    now = training_values(cfg)
    # what the keys were before this step: a change recorded at this very step says (the resume point
    # may have been written before it, or after it with no step in between: either way it is this
    # step's change, measured from the value before it)
    before, recorded = dict(held), {}
    for entry in cfg["run"].get("changes") or []:
        if isinstance(entry, dict) and entry.get("step") == int(st["global_step"]):
            for k, pair in (entry.get("changes") or {}).items():
                if k in before and isinstance(pair, list) and len(pair) == 2:
                    old = recorded[k][0] if k in recorded else pair[0]
                    recorded[k] = [old, pair[1]]
                    before[k] = old
    diff = {k: [before.get(k), now[k]] for k in TRAINING_KEYS if before.get(k) != now[k]}
    hand = [k for k in diff if k not in overridden and recorded.get(k) != diff[k]]
    return diff, hand, before


def record(cfg: dict, diff: Dict[str, List[Any]], st: dict, replace: bool = False) -> None:
    """Append a change made at the resume point ``st`` to ``cfg['run']['changes']``. With
    ``replace`` (``diff`` from :func:`since_resume_point`, which takes in a change recorded at
    the same step), an entry at the same step is replaced: no step trained under it is kept."""
    changes = list(cfg["run"].get("changes") or [])
    if replace:
        changes = [c for c in changes if not (isinstance(c, dict) and c.get("step") == int(st["global_step"]))]
    if diff:
        changes.append({"step": int(st["global_step"]), "epoch": int(st["epoch"]), "batch": int(st["batch"]),
                        "changes": diff})
    cfg["run"]["changes"] = changes


def start_phase(st: dict, lr: float, epochs: int) -> None:
    """Open a learning-rate phase at the current step (the first one at step 0)."""
    phases = st.setdefault("lr_phases", [])
    if phases and phases[-1]["peak_lr"] == lr and phases[-1]["epochs"] == epochs:
        return
    phases.append({"from_step": int(st["global_step"]), "peak_lr": float(lr), "epochs": int(epochs),
                   "lr_min": None, "lr_max": None})


def note_lr(st: dict, lr: float) -> None:
    """Track the range of rates the optimizer actually used in the current phase."""
    ph = st["lr_phases"][-1]
    ph["lr_min"] = lr if ph["lr_min"] is None else min(ph["lr_min"], lr)
    ph["lr_max"] = lr if ph["lr_max"] is None else max(ph["lr_max"], lr)
