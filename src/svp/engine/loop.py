"""The training loop: ``train_one_epoch`` and the run driver ``train``.

``train(config)`` is the whole of ``svp train``: build data, backbone and method
(engine/setup.py), train with the official recipe, select on validation
(engine/select.py), report test accuracy, and keep a run folder that can be resumed
after any interruption (engine/rundir.py).

Determinism: the data order is a pure function of (seed, epoch), the augmentation of
a sample a pure function of (seed, epoch, sample index), and every global RNG is
re-seeded from (seed, step, rank) before each optimizer step (mixup draws, drop
path). Together with the saved optimizer/EMA/scaler state this makes a resumed
run bit-identical to an uninterrupted one on CPU, wherever it was stopped.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import runtime
from ..errors import ResumeError
from . import config as C
from . import progress as run_progress
from . import resume_overrides as RO
from . import select
from .distributed import all_reduce_sum, barrier, derive_seed, init_distributed, maybe_device, shutdown
from .divergence import DivergenceGuard, check_saved_state, finite_check_mode, stop_nonfinite
from .evaluate import chunk_count, evaluate
from .hooks import Hooks, hooks_for
from .optim import describe_optimizer
from .progress import Progress, log, log_done, log_epoch, log_start, scalar_sinks
from .rundir import check_checkpoint_there, load_run_config, load_trainable, run_session
from .sched import schedule_notes
from .seeds import seed_everything
from .setup import build_run, check_data, fill_kept, param_counts, pick_device
from .signals import (EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_STOPPED, NonFiniteLoss, Signals,  # noqa: F401
                      TrainingStopped, WorkersInterrupted, interrupted, resume_command)


def train(config: Optional[dict] = None, *, resume: Optional[str] = None,
          overrides: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train a method with a (partial) configuration dict; returns the results dict written
    to ``<run>/results.json``. ``resume``: a run folder to continue (its ``config.yaml`` is
    used; ``overrides`` may change only what engine/resume_overrides.py lists)."""
    if resume:
        notes: List[str] = []
        cfg = load_run_config(resume, overrides or [], notes)  # refuses what --resume cannot apply exactly
        check_checkpoint_there(cfg, resume)
        return Trainer(cfg, resume_dir=resume, changes=RO.changes(load_run_config(resume), cfg), notes=notes).run()
    cfg = C.absolute_paths(C.resolve(base=config or {}, overrides=overrides or []))
    replayed = len(cfg["run"]["changes"] or [])
    cfg["run"]["changes"] = []  # the record of a run's resumes starts empty, whatever config it came from
    return Trainer(cfg, replayed_changes=replayed).run()


def train_data_id(ds) -> dict:
    """What a resume point records of the training split: its size and a digest of its class
    names and labels in order. The data order of every epoch is drawn from the size, so a split
    that changed since would skip the wrong batches of a resumed epoch."""
    import hashlib
    h = hashlib.sha256(json.dumps([list(ds.classes), list(ds.targets)]).encode())
    out = {"samples": len(ds), "labels_sha256": h.hexdigest()[:16]}
    drawn = getattr(getattr(ds, "ds", ds), "few_shot_digest", None)   # (data.shots: the split drawn from too)
    if drawn:
        out["few_shot_sha256"] = drawn
    return out


def check_same_train_data(saved: Optional[dict], now: dict, run_dir: str) -> None:
    if saved is None:   # resume points written before the record: not checked
        return
    # what the resume point recorded (one written before data.shots's digest has no such key: its
    # few-shot runs were refused as changed, retest 92)
    now = {k: v for k, v in now.items() if k in saved}
    if saved == now:
        return
    what = (f"{saved.get('samples')} -> {now['samples']} images" if saved.get("samples") != now["samples"]
            else "the same number of images, other labels or classes in their order"
            if saved.get("labels_sha256") != now.get("labels_sha256") else
            "data.shots draws from a split whose images or labels changed, so its images are others")
    raise ResumeError(f"{run_dir}: the training split changed since the resume point ({what}); a resumed run "
                      f"must see the images it started with, in the same order. Restore them, or start a new run")


def device_loss_sum(dev: torch.device, dinfo) -> Optional[torch.Tensor]:
    """Where the epoch's losses are summed on the device (one CUDA process: read at the logging
    steps, no host sync a step), the zero to add them to; else None (the CPU, and DDP, whose
    every step's loss is reduced on the host: a device sum there, which nothing added to, made
    the logged loss 0 on several GPUs)."""
    if dev.type != "cuda" or dinfo.enabled:
        return None
    return torch.zeros((), dtype=torch.float64, device=dev)


class Trainer:
    def __init__(self, cfg: dict, resume_dir: Optional[str] = None, hooks: Optional[Hooks] = None,
                 changes: Optional[dict] = None, replayed_changes: int = 0, notes: Sequence[str] = ()):
        self.cfg = cfg
        self.notes = list(notes)   # (load_run_config's, said once the run's log is open)
        self.resume_dir = os.path.abspath(resume_dir) if resume_dir else None
        self.hooks = hooks or hooks_for(cfg)
        self.changes = changes or {}
        self.resumed_at, self.values_before = None, {}   # (save_resume)
        self.replayed_changes = replayed_changes

    def _stopping(self, name: str) -> None:
        """Said as the first signal comes: the run went on silently until its step ended (25 s
        where the first step compiled the CPU kernels), and a second press, the usual answer to
        silence, stopped it at once without a new resume point (review 58). A sweep's worker
        leaves it to the sweep, which says it once for all its runs; other ranks to the main one."""
        if run_progress.worker_label is not None or not getattr(self, "dist", None) or not self.dist.is_main:
            return
        again = "Ctrl-C" if name == "SIGINT" else name
        bar = getattr(getattr(self, "progress", None), "bar", None)
        if bar is not None:   # (the line was glued onto a live bar: retest 59; it is drawn again at the next step)
            try:
                bar.clear()
            except Exception:
                pass
        log.warning("%s received: the run stops once its current step (or evaluation) ends, writing a resume "
                    "point; %s again stops it at once, without a new one", name, again)

    def run(self) -> Dict[str, Any]:
        # (before any work: a missing package was found after the data, the model and, at a resume,
        # the rewrite of config.yaml, so a plain --resume failed on it ever after: retest 94)
        run_progress.check_scalar_packages(self.cfg)
        device_kind = pick_device(self.cfg["train"]["device"])
        self.dist = init_distributed("cuda" if device_kind.startswith("cuda") else "cpu")
        self.device = maybe_device(device_kind, self.dist)
        self.signals = Signals(on_first=self._stopping)
        try:
            # on the CPU, buffers larger than glibc's mmap threshold reused from step to step
            # instead of page-faulted in again each time (svp.runtime.held_heap)
            with runtime.held_heap(self.device.type == "cpu"), run_session(self):
                # (run_session: the run folder locked, logged, cleaned up; engine/rundir.py)
                return self._run()
        finally:
            shutdown(self.dist)

    def save_resume(self, st) -> None:
        check_saved_state(self, st)  # never replace a finite resume point with a non-finite one
        # the training keys' values the steps before this point ran with: at the step a --resume
        # changed them, before any step ran, the values before the change (else a resume from this
        # point, with the change edited back, measured it from the new values and dropped its record)
        now = RO.training_values(self.cfg)
        st["training_values"] = ({**now, **self.values_before} if st["global_step"] == self.resumed_at else now)
        if self.dist.is_main:
            self.folder.save_resume(st, self.model, self.optimizer, self.sched, self.prec.scaler, self.ema)
        barrier(self.dist)

    def _eval_model(self):
        return self.ema.module if (self.ema is not None and self.cfg["train"]["ema_eval"]) else self.model

    def _evaluate(self, model, split, what: str):
        r = self._evaluate_once(model, split)
        if r["nonfinite"] and self.dist.is_main:   # (the loss alone said nan, the accuracies looked like numbers)
            log.warning("%s: %d of %d images gave non-finite outputs (nan or inf logits), counted as wrong",
                        what, r["nonfinite"], r["n"])
        return r

    def _evaluate_once(self, model, split):
        workers = int(self.cfg["data"]["num_workers"])
        args = (model, split[0], split[1], int(self.cfg["train"]["eval_batch_size"]), self.device,
                self.dist, self.prec.autocast)
        was_training = model.training
        try:
            return evaluate(*args, workers)
        except (WorkersInterrupted, RuntimeError):
            if not (workers and self.signals.received):
                raise
        # a stop signal took the workers down as they started (_batches): the run stops after this
        # evaluation, which is done again in this process (the same numbers). (Out of the except
        # block: the failed loader, freed with the exception, has ended its workers.)
        model.train(was_training)
        return evaluate(*args, 0)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> Dict[str, Any]:
        cfg, t, dinfo = self.cfg, self.cfg["train"], self.dist
        vars(self).update(vars(build_run(cfg, self.device, dinfo, bool(self.resume_dir))))  # data, model, ...
        self.folder.precision = self.prec.describe()
        check_data(self.train_ds, self.val, self.test, self.dist)
        fill_kept(cfg, [(self.train_ds, None), self.val, self.test])
        self.guard = DivergenceGuard(self.model, self.optimizer, self.ema,
                                     check_grads=not self.prec.scaler.is_enabled())
        self.check_each_step = finite_check_mode(t["finite_check"], self.device, dinfo.enabled) == "step"
        st = {"epoch": 0, "batch": 0, "global_step": 0, "history": [], "best": None,
              "epoch_loss_sum": 0.0, "epoch_steps": 0, "epoch_seconds": 0.0, "epoch_images": 0,
              "train_seconds": 0.0, "nonfinite": None, "lr_phases": [], "train_data": None,
              "training_values": None, "init_from_weights": None}
        epochs = int(t["epochs"])
        data_id = train_data_id(self.train_ds)
        if self.resume_dir:
            st = self.folder.load_resume(st, self.model, self.optimizer, self.sched, self.prec.scaler, self.ema)
            check_same_train_data(st.get("train_data"), data_id, self.folder.path)
            if st["epoch"] >= epochs and not st["batch"]:   # ("at epoch 5" of a 4-epoch run: review 58)
                log.info("resumed %s after its last epoch (%d of %d, global step %d): the final evaluation runs",
                         self.folder.path, st["epoch"], epochs, st["global_step"])
            elif t["max_steps"] is not None and st["global_step"] >= int(t["max_steps"]):   # (retest 59)
                log.info("resumed %s after its last step (train.max_steps=%d, global step %d): the final "
                         "evaluation runs", self.folder.path, int(t["max_steps"]), st["global_step"])
            else:
                log.info("resumed %s at epoch %d, batch %d (global step %d)", self.folder.path, st["epoch"] + 1,
                         st["batch"], st["global_step"])
            if dinfo.is_main:
                for note in self.notes + self.folder.resume_notes:
                    log.warning("%s", note)
            RO.check_reachable(st, epochs, t["max_steps"], self.folder.path)
            held = st["training_values"]
            if held is None:   # a resume point written before it was saved
                held = RO.held_from_phases(st, cfg, self.lr)
            diff, hand, self.values_before = RO.since_resume_point(held, cfg, self.changes, st)
            self.resumed_at = st["global_step"]
            RO.record(cfg, diff, st, replace=isinstance(held, dict))
            if hand:
                log.warning("config.yaml's %s changed since the resume point (edited by hand): taken from global "
                            "step %d on, as `svp train --resume %s %s` would", ", ".join(hand), st["global_step"],
                            self.folder.path, " ".join(f"{k}={diff[k][1]}" for k in hand))
            if diff:
                log.info("from global step %d on: %s (recorded in config.yaml run.changes)", st["global_step"],
                         ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items()))
            # every rank has read config.yaml for the resume point's check (load_resume) before
            # the main rank rewrites it: a rank that read the new file refused the resume
            barrier(dinfo)
            if dinfo.is_main:  # drop metric lines written after the resume point
                self.folder.rewrite_metrics(st["history"])
                self.folder.write_config()
        st["train_data"] = data_id
        # what method.init_from started the run from (setup.init_from; a sweep's reuse check): a
        # resume does not read the folder again, so the resume point carries it to the adapters saved
        if self.resume_dir:
            if st.get("init_from_weights"):
                self.spec.extra["init_from_weights"] = st["init_from_weights"]
        elif self.spec.extra.get("init_from_weights"):
            st["init_from_weights"] = self.spec.extra["init_from_weights"]
        if not self.check_each_step:   # the state the first interval check falls back on
            self.guard.snapshot()
            self.checked_step = st["global_step"]
        RO.start_phase(st, self.lr, epochs)
        if dinfo.is_main:
            log_start(cfg, self.folder.path, self.model, self.spec, len(self.train_ds), self.device,
                      dinfo.world_size, self.lr, self.steps_per_epoch)
            for note in schedule_notes(cfg, self.lr):
                log.warning("%s", note)
            if self.replayed_changes:
                # (svp train --config <run>/config.yaml of a run an earlier --resume changed)
                log.warning("the configuration records %d change(s) a --resume made mid-run (run.changes): this "
                            "run trains one schedule with the last values from step 0, not the run that made them",
                            self.replayed_changes)
        self.tb = scalar_sinks(cfg, self.folder.path, dinfo.is_main, st["global_step"])
        self.progress = Progress(cfg["run"]["progress"], dinfo.is_main, int(cfg["run"]["log_every"]))
        # resumed at an epoch's end exactly at a (lowered) train.max_steps: nothing left to run
        stop = t["max_steps"] is not None and st["global_step"] >= int(t["max_steps"]) and st["batch"] == 0
        try:
            while st["epoch"] < epochs and not stop:
                try:
                    stop = self.train_one_epoch(st, epochs)
                finally:
                    # an error mid-epoch (a non-finite loss, a second signal) is said on a line of
                    # its own: it was printed after the bar's last frame, on the same line
                    self.progress.close()
                self._end_epoch(st, epochs, stop)
            res = self._finish(st, stop)
            if self.tb is not None:
                self.tb.summarise(res)
        except BaseException as e:
            # (a stop on request or by a signal, with its resume point, is no failure; a non-finite loss
            # or any other error marks wandb's run failed. Not sys.exc_info() in the finally: inside a
            # caller's except block it named the caller's error, and a finished run was failed: retest 94)
            failed = getattr(e, "code", None) not in (EXIT_STOPPED, EXIT_INTERRUPTED)
            raise
        else:
            failed = False
        finally:
            if self.tb is not None:
                self.tb.close(failed=failed)   # (what a stopped run logged is flushed too)
        return res

    def train_one_epoch(self, st: dict, epochs: int) -> bool:
        """Run the rest of epoch ``st['epoch']``; True when training must end (max_steps)."""
        t, dinfo, dev = self.cfg["train"], self.dist, self.device
        cuda = dev.type == "cuda"
        seed, max_steps = int(t["seed"]), t["max_steps"]
        save_every = int(self.cfg["run"]["save_every_steps"] or 0)
        self.sampler.set_epoch(st["epoch"], st["batch"])
        self.sched.start_epoch(st["epoch"])
        # the steps this epoch runs: a train.max_steps within it ends it early (the bar and its ETA
        # counted to the epoch's end: "12/25 <00:12" at the run's last step, QA 16e)
        total = self.steps_per_epoch if max_steps is None else max(
            st["batch"], min(self.steps_per_epoch, st["batch"] + int(max_steps) - st["global_step"]))
        self.progress.start(st["epoch"], epochs, total, st["batch"])
        t_epoch, seconds_before = time.time(), st["epoch_seconds"]
        # on CUDA the loss sum stays on the device and is read at the logging interval
        dev_loss = device_loss_sum(dev, dinfo)
        if max_steps is not None and st["global_step"] >= int(max_steps):
            return True  # resumed mid-epoch exactly at a (lowered) train.max_steps: the epoch ends here
        for x, y in self._batches(st):
            step_no = st["global_step"] + 1  # 1-based number of the step being run
            self.stepped = True
            self.sched.before_step(st["global_step"])
            RO.note_lr(st, self.sched.lr())
            s = derive_seed(seed, st["global_step"], dinfo.rank, 3)
            seed_everything(s)
            x, y = x.to(dev, non_blocking=cuda), y.to(dev, non_blocking=cuda)
            x_in, y_in = self.mixup(x, y) if self.mixup is not None else (x, y)
            chunks = chunk_count(x_in.shape[0], t["micro_batch"])
            if chunks == 1:
                with self.prec.autocast():
                    out = self.ddp_model(x_in)
                loss = self.hooks.on_loss(step_no, self.criterion(out.float(), y_in))
            else:   # train.micro_batch: the backward runs here, chunk by chunk
                loss = self.hooks.on_loss(step_no, self._accumulate(x_in, y_in, chunks))
            if cuda and not dinfo.enabled:
                loss_val, flag = None, 0.0
                dev_loss += loss.detach().double()
            else:
                loss_val = float(loss.item())
                flag = 0.0 if np.isfinite(loss_val) else 1.0
            sig = self.signals.flags()
            # one flag per rank after the signals': which rank's loss it was (rank 0 reported another
            # rank's NaN as its own finite value, and saved its own finite batch: review)
            mine = [0.0] * dinfo.world_size if dinfo.world_size > 1 else []
            if mine:
                mine[dinfo.rank] = flag
            red = all_reduce_sum([loss_val if not flag and loss_val is not None else 0.0, flag, *sig, *mine],
                                 dinfo, self.comm_dev)
            if red[1] > 0:
                bad = [r for r, f in enumerate(red[2 + len(sig):]) if f > 0] or [dinfo.rank]
                what = f"non-finite loss ({loss_val})" if flag else "non-finite loss"
                if mine:
                    what += f" on rank {', '.join(map(str, bad))} of {dinfo.world_size}"
                self._nonfinite(st, step_no, what, x_in, y, dump_rank=bad[0])
            self._step(loss, st, step_no, loss_val, x_in, y, accumulated=chunks > 1)
            if self.ema is not None:  # no step: the decay from the first update, as the official
                self.ema.update(self.model)  # ModelEma (given a step, ModelEmaV3 copies the weights twice)
            st["global_step"] += 1
            st["batch"] += 1
            st["epoch_steps"] += 1
            st["epoch_images"] += x.shape[0] * dinfo.world_size
            st["epoch_seconds"] = seconds_before + (time.time() - t_epoch)
            reached_max = max_steps is not None and st["global_step"] >= int(max_steps)
            stop_req = red[2] + red[3] > 0 or self.hooks.stop_requested(st["global_step"])
            save_now = save_every and st["global_step"] % save_every == 0 and st["batch"] < self.steps_per_epoch
            mean_loss = red[0] / dinfo.world_size
            if not self.check_each_step and (st["batch"] % self.progress.log_every == 0 or stop_req or save_now
                                             or reached_max or st["batch"] == self.steps_per_epoch):
                self._check_interval(st, x_in, y)
            if dev_loss is None:
                st["epoch_loss_sum"] += mean_loss
                # shown and logged: the epoch's mean loss so far, as on one CUDA device, where the
                # losses are summed on the device and read at the logging steps (the CPU showed
                # the last step's loss, the same key meaning another thing: QA 15e)
                mean_loss = st["epoch_loss_sum"] / max(st["epoch_steps"], 1)
            elif (self.progress.wants(st["batch"]) or stop_req or save_now or reached_max
                  or st["batch"] == self.steps_per_epoch):
                mean_loss = self._drain(st, dev_loss, step_no, x_in, y)
            else:
                mean_loss = None  # on the device until the next logging step
            self.progress.update(st["batch"], mean_loss, self.sched.lr(), x.shape[0] * dinfo.world_size)
            if self.tb is not None and mean_loss is not None:
                self.tb.add_scalar("train/loss", mean_loss, st["global_step"])
                self.tb.add_scalar("train/lr", self.sched.lr(), st["global_step"])
            if stop_req:
                self.progress.close()
                self.save_resume(st)
                if red[2] + red[3] > 0:
                    raise interrupted(self.folder.path, self.signals.name_of(red[2:]), f"step {st['global_step']}")
                raise TrainingStopped(f"stopped after step {st['global_step']} (debug.stop_at_step); "
                                      f"continue with: {resume_command(self.folder.path)}",
                                      EXIT_STOPPED, self.folder.path)
            if save_now:
                self.save_resume(st)
            self.hooks.after_step(st["global_step"])
            if reached_max:
                self.progress.close()
                return True
        self.progress.close()
        return False

    def _batches(self, st):
        """The loader's batches. A stop signal that took its workers down anyway (spawned
        workers start with the signals ignored where they are started by fork + exec; elsewhere,
        e.g. on Windows, they have Python's default handler while they start:
        engine.signals.starting_workers) stops the run here, between two steps, as a signal after
        the last step does: resume point, exit 130 (the run crashed with no resume point)."""
        batches = None
        try:
            batches = iter(self.loader)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                yield batch
        except (WorkersInterrupted, RuntimeError) as e:
            if not (self.signals.received and (isinstance(e, WorkersInterrupted) or self.loader.num_workers)):
                raise
            # its other workers ended first: torch's SIGCHLD handler raises for each worker that
            # dies while the loader is alive, wherever this process then is (the save below)
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self.progress.close()
            self.save_resume(st)
            raise interrupted(self.folder.path, self.signals.name, f"step {st['global_step']}") from None

    def _check_interval(self, st, x, y) -> None:
        """train.finite_check=interval: is the state finite after ``st['global_step']`` steps?
        Yes: it becomes the state a later failed check puts back. No: put back the last
        checked state and stop (engine/divergence.py)."""
        bad = self.guard.bad_state()
        if bad:
            self._nonfinite(st, st["global_step"], f"non-finite weights/optimizer state ({', '.join(bad)})", x, y,
                            batch=st["batch"])
        self.guard.snapshot()
        self.checked_step = st["global_step"]

    def _nonfinite(self, st, step_no, what, x, y, batch=None, dump_rank: int = 0):
        """Stop for non-finite numbers (engine/divergence.py); with interval checks the state of
        the last check is put back first. ``dump_rank``: the rank whose batch is saved."""
        if not self.check_each_step:
            self.guard.restore()
            stop_nonfinite(self, st, step_no, what, x, y, checked=self.checked_step, batch=batch,
                           dump_rank=dump_rank)
        stop_nonfinite(self, st, step_no, what, x, y, batch=batch, dump_rank=dump_rank)

    def _drain(self, st, dev_loss, step_no, x, y) -> float:
        """CUDA: add the device-side loss sum to the epoch's (one host sync); a non-finite
        sum stops the run like a non-finite step does."""
        total = float(dev_loss.item())
        dev_loss.zero_()
        if not np.isfinite(total):
            self._nonfinite(st, step_no, f"non-finite loss ({total})", x, y, batch=st["batch"])
        st["epoch_loss_sum"] += total
        return st["epoch_loss_sum"] / max(st["epoch_steps"], 1)

    def _accumulate(self, x, y, chunks: int) -> torch.Tensor:
        """Forward and backward over ``chunks`` near-equal chunks of the batch (train.micro_batch),
        each chunk's mean loss weighted by its share of the batch, so the accumulated gradients are
        the whole batch's up to rounding; DDP averages them across ranks once, with the last chunk.
        Returns the batch's mean loss (detached)."""
        scaler, n = self.prec.scaler, x.shape[0]
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        xs, ys = x.tensor_split(chunks), y.tensor_split(chunks)
        for i, (xc, yc) in enumerate(zip(xs, ys)):
            last = i == chunks - 1
            sync = contextlib.nullcontext() if last or self.ddp_model is self.model else self.ddp_model.no_sync()
            with sync:
                with self.prec.autocast():
                    out = self.ddp_model(xc)
                loss = self.criterion(out.float(), yc) * (xc.shape[0] / n)
                scaler.scale(loss).backward()
            total += loss.detach()
        return total

    def _step(self, loss, st, step_no, loss_val, x, y, accumulated: bool = False) -> None:
        """Backward and optimizer step, guarded: a step that makes the gradients, the weights or
        the optimizer state non-finite is undone and stops the run (engine/divergence.py). With
        ``accumulated`` the gradients are already there (train.micro_batch)."""
        t, scaler, guard = self.cfg["train"], self.prec.scaler, self.guard
        if not accumulated:
            self.optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
        if t["clip_grad"]:
            scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           float(t["clip_grad"]))
        if self.check_each_step:
            bad = guard.bad_gradients()
            if bad:
                stop_nonfinite(self, st, step_no, f"non-finite gradient ({', '.join(bad)})", x, y)
            guard.snapshot()
        scaler.step(self.optimizer)
        self.hooks.after_optimizer_step(step_no, self.model)
        bad = guard.bad_state() if self.check_each_step else None
        if bad:
            guard.restore()
            loss_txt = "" if loss_val is None else f"; the step's loss was finite ({loss_val:.4g})"
            stop_nonfinite(self, st, step_no, f"the step made the weights/optimizer state non-finite "
                                         f"({', '.join(bad)}{loss_txt})", x, y)
        scaler.update()

    def _end_epoch(self, st: dict, epochs: int, stop: bool) -> None:
        cfg, dinfo, epoch = self.cfg, self.dist, st["epoch"]
        check_saved_state(self, st)  # before best/ or a resume point is written
        st["train_seconds"] += st["epoch_seconds"]
        record = {"epoch": epoch + 1, "step": st["global_step"],
                  "train_loss": st["epoch_loss_sum"] / max(st["epoch_steps"], 1), "lr": self.sched.lr(),
                  "images_per_s": st["epoch_images"] / max(st["epoch_seconds"], 1e-9),
                  "train_seconds": st["epoch_seconds"]}
        t_eval = time.time()
        eval_model = self._eval_model()
        if self.val is not None and ((epoch + 1) % int(cfg["eval"]["every"]) == 0 or epoch == epochs - 1 or stop):
            r = self._evaluate(eval_model, self.val, f"epoch {epoch + 1} validation")
            record.update({"val_top1": r["top1"], "val_top5": r["top5"], "val_loss": r["loss"]})
        if self.test is not None and cfg["eval"]["test_every_epoch"]:
            r = self._evaluate(eval_model, self.test, f"epoch {epoch + 1} test")
            record.update({"test_top1": r["top1"], "test_top5": r["top5"], "test_loss": r["loss"]})
        record["eval_seconds"] = time.time() - t_eval
        st["history"].append(record)
        score = select.selection_score(record, cfg["eval"]["metric"], self.val is not None)
        improved = select.improves(score, st["best"])
        if improved:
            st["best"] = {"epoch": record["epoch"], "score": score,
                          "state": {k: v.clone() for k, v in eval_model.adapter_state_dict().items()}}
        if dinfo.is_main:
            self.folder.append_metrics(record)
            log_epoch(record, epochs, improved, self.tb, cfg["eval"]["metric"])
            if improved:
                self.folder.save_adapter(eval_model, "best", self.spec, epoch + 1)
        st.update({"epoch": epoch + 1, "batch": 0, "epoch_loss_sum": 0.0, "epoch_steps": 0,
                   "epoch_seconds": 0.0, "epoch_images": 0})
        self.save_resume(st)
        # a signal that arrived during evaluation: the epoch's resume point is written. After the
        # last epoch too: the final test evaluations can take minutes (a scheduler's grace period
        # ran out on them), and --resume from this point runs them
        self._stop_if_signalled(f"epoch {st['epoch']}")

    def _stop_if_signalled(self, where: str) -> None:
        sig = all_reduce_sum(self.signals.flags(), self.dist, self.comm_dev)
        if sum(sig) > 0:
            raise interrupted(self.folder.path, self.signals.name_of(sig), where)

    def _finish(self, st, stopped_early) -> Dict[str, Any]:
        cfg, dinfo, hist = self.cfg, self.dist, st["history"]
        if not hist:
            raise TrainingStopped("training ended before the first epoch finished", 1, self.folder.path)
        eval_model, best = self._eval_model(), st["best"]
        last_state = {k: v.clone() for k, v in eval_model.adapter_state_dict().items()}
        final_test = best_test = None
        if self.test is not None:
            final_test = self._evaluate(eval_model, self.test, "final test")
            if best is not None:
                if best["epoch"] == hist[-1]["epoch"]:
                    best_test = final_test
                else:
                    load_trainable(eval_model, best["state"], "best weights")
                    best_test = self._evaluate(eval_model, self.test, "val-selected test")
                    load_trainable(eval_model, last_state, "last weights")
            # a signal during them: stopped before anything of the end is written, at the last resume point
            self._stop_if_signalled(f"epoch {hist[-1]['epoch']}")
        if stopped_early and dinfo.is_main:   # (only results.json said so)
            log.info("stopped at train.max_steps=%s (step %d), in epoch %d of %d", cfg["train"]["max_steps"],
                     st["global_step"], hist[-1]["epoch"], int(cfg["train"]["epochs"]))
        res = select.results(cfg, hist, best["epoch"] if best else None, final_test, best_test,
                             st["global_step"], stopped_early, self.val is not None)
        res.update(param_counts(eval_model))
        res.update({"lr_used": self.lr, "lr_phases": st["lr_phases"], "global_batch": int(cfg["train"]["batch_size"]) * dinfo.world_size,
                    "world_size": dinfo.world_size, **select.throughput(hist), "device": str(self.device),
                    "optimizer": describe_optimizer(self.optimizer)})
        if dinfo.is_main:
            self.folder.save_adapter(eval_model, "last", self.spec, hist[-1]["epoch"])
            # best/ is written before its epoch's resume point: a run killed between the two and
            # resumed with other settings (or not bit-identically) left the killed attempt's
            # epoch there, one the finished run never selected (review)
            if best is not None and self.folder.saved_epoch("best") != best["epoch"]:
                load_trainable(eval_model, best["state"], "best weights")
                self.folder.save_adapter(eval_model, "best", self.spec, best["epoch"])
                load_trainable(eval_model, last_state, "last weights")
            self.folder.finish(res)
            log_done(res, self.val is not None)
        barrier(dinfo)
        res["run_dir"] = self.folder.path
        return res
