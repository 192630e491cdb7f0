"""The run folder: creating it, its config, adapters (best/, last/), the resume point,
the non-finite dump and the final files. Only the main rank writes."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import signal
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import checkpoint as ck
from . import config as C
from . import resume_overrides as RO
from ..errors import ConfigError, OutputError, PeerError, ResumeError, SVPError
from ..io import DISK_ERRNOS, remove_stale_temps, shell_word, sigterm_as_interrupt
from .distributed import DistInfo, arithmetic, arithmetic_words, on_main_rank, unwrap
from .resume_overrides import check_overrides
from .signals import EXIT_INTERRUPTED, TrainingStopped, resume_command
from .progress import log_fatal, setup_logging, teardown_logging
from .runlock import (RunLock, claim_run_dir, default_run_name,  # noqa: F401 (default_run_name re-exported)
                      lock_for_resume, remove_made_folders)


def prepare_run_dir(cfg: dict, dist_info: DistInfo) -> Tuple[str, Optional[RunLock], List[str]]:
    """Claim and lock a fresh run folder on the main rank; every rank gets its path (so a
    generated name is the main rank's). Returns ``(run_dir, lock or None, created)``:
    ``created`` lists the folders made for it (``claim_run_dir``; empty on other ranks)."""
    claimed = on_main_rank(lambda: claim_run_dir(cfg), dist_info, shared=lambda c: c[0])
    return claimed if dist_info.is_main else (claimed, None, [])


def load_run_config(run_dir: str, overrides=(), notes: Optional[List[str]] = None) -> dict:
    """The saved ``config.yaml`` of a run with ``debug.*`` reset and ``overrides`` applied
    (only those ``--resume`` can apply exactly: engine/resume_overrides.py). Keys added since
    the run started are filled in with the behaviour it had; ``notes`` gets a line for each
    such value that is not the new default's."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isdir(run_dir):   # a typo, or a run killed before it made its folder
        raise ResumeError(f"{run_dir}: no such folder (--resume takes the folder of a run: runs/NAME)")
    if not os.path.isfile(path):  # first: what to change matters only in a run folder
        raise ResumeError(f"{run_dir} is not a run folder (no config.yaml)")
    saved = C.load_yaml(path)
    overrides = list(overrides or ())
    parsed = C.parse_overrides(overrides)
    # a new run keeps model.checkpoint absolute (C.absolute_paths): the relative --checkpoint of the
    # command that started it, repeated with --resume from the same folder, was "cannot change"
    parsed = [(k, os.path.abspath(v) if k == "model.checkpoint" and isinstance(v, str) else v)
              for k, v in ((k, C.path_value(k, v)) for k, v in parsed)]
    check_overrides(parsed, run_dir, saved)
    # what remains of the refused keys repeats the saved values: applied as given, it would write
    # them back in their new spelling (a relative path, 1 for 1.0)
    overrides = [o for o, (k, _) in zip(overrides, parsed) if RO.accepted(k)]
    notes = [] if notes is None else notes
    if isinstance(saved, dict):
        saved.pop("debug", None)  # fault injections never carry over to a resumed run
        _pin_old_behaviour(saved, run_dir, notes)
    return C.resolve(overrides=overrides, base=saved, use_presets=False, check_blocks=False, base_source=path)


def _pin_old_behaviour(saved: dict, run_dir: str, notes: List[str]) -> None:
    """What a run started by an older svp did where that svp had no key for it (QA 16c: each
    resumed silently with the new behaviour, unlike the uninterrupted run)."""
    train = saved.get("train")
    if isinstance(train, dict) and "opt_fused" not in train:
        # a run started before the key existed stepped with torch's per-tensor loop: keep it,
        # so the resumed steps are the ones the uninterrupted run would have taken
        train["opt_fused"] = False
        if str(train.get("opt", "adamw")).lower() in ("adam", "adamw"):   # (the others have no fused kernel)
            notes.append("the run started before train.opt_fused existed, when Adam/AdamW stepped with torch's "
                         "per-tensor loop: resumed so (train.opt_fused=false recorded)")
    if isinstance(train, dict) and "amp_cpu" not in train:
        # likewise: train.amp was ignored on the CPU before the key existed
        train["amp_cpu"] = False
        if train.get("amp") is True:
            notes.append("the run started before train.amp_cpu existed, when train.amp was CUDA only: resumed so, "
                         "in float32 on a CPU (train.amp_cpu=false recorded)")
    model = saved.get("model")
    if isinstance(model, dict) and "random_init" not in model:
        # before model.random_init (2026-11-29) a model without weights given was random, the
        # bundled mini Vim too: a resume loaded the bundled weights under the run's adapters
        model["random_init"] = not (model.get("checkpoint") or model.get("pretrained"))
        if model["random_init"]:
            notes.append("the run started (before 2026-11-29) on a randomly initialised backbone: resumed on one "
                         "(model.random_init=true recorded)")
    method = saved.get("method")
    settings = method.get("settings") if isinstance(method, dict) else None
    if isinstance(method, dict) and method.get("name") == "svp" and (settings is None or isinstance(settings, dict)):
        settings = dict(settings or {})
        block = settings.get("svp") if isinstance(settings.get("svp"), dict) else {}
        # (the resume point's names; a finished run's, from its final state)
        names = ck.saved_names(os.path.join(run_dir, ck.RESUME_FILE))
        if names is None:
            names = ck.saved_names(os.path.join(run_dir, "final_state.safetensors"))
        if "backbone_train_mode" not in block and "backbone_train_mode" not in settings and names is not None \
                and "train_data" not in names:
            # SVP trained its frozen backbone in eval mode (DropPath off) until 2026-12-05 05:21 UTC, but
            # with compat='official'. A state without train_data was written before 07:37 that day: in
            # the two hours between, the new default is taken for the old (runs of those hours resume
            # with DropPath off unless method.settings.backbone_train_mode=true is set in config.yaml)
            official = block.get("compat", settings.get("compat", "paper")) == "official"
            settings["backbone_train_mode"] = official
            method["settings"] = settings
            if not official:
                notes.append("the run's resume point predates 2026-12-05 07:37 UTC, and SVP kept its frozen backbone "
                             "in eval mode (DropPath off) until that day's 05:21: resumed so "
                             "(method.settings.backbone_train_mode=false recorded)")


def check_checkpoint_there(cfg: dict, run_dir: str) -> None:
    """Before a --resume builds the backbone: a checkpoint that moved said only "file not found",
    and model.checkpoint cannot change at --resume (the run's state was made on those weights)."""
    ckpt = cfg["model"]["checkpoint"]
    if isinstance(ckpt, str) and not os.path.exists(ckpt):
        where = "" if os.path.isabs(ckpt) else f" (relative to this folder, {os.getcwd()}: the run kept it as given)"
        raise ResumeError(f"{run_dir}: its backbone checkpoint model.checkpoint={ckpt!r} is not there{where}; "
                          f"if the file moved, put it, or a link to it, back at that path to resume the run")


def check_resumable(run_dir: str) -> None:
    if os.path.isfile(os.path.join(run_dir, ck.RESUME_FILE)):
        return
    why = "the run finished or never saved a resume point"
    try:
        with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
            done = json.load(f)
        if isinstance(done, dict) and done.get("stopped_early"):
            # train.max_steps ends a run as finished: --resume's train.max_steps is for a run
            # interrupted before it (a kill, a signal, debug.stop_at_step)
            why = (f"the run finished at train.max_steps (step {done.get('steps', '?')}); a finished "
                   f"run is not extended: train a new run with the larger train.max_steps")
        elif isinstance(done, dict):
            why = "the run finished"
    except (OSError, ValueError):
        pass
    raise ResumeError(f"{run_dir}: nothing to resume (no {ck.RESUME_FILE}; {why})")


def _lock_resumable(run_dir: str) -> RunLock:
    lock = lock_for_resume(run_dir)
    try:
        check_resumable(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def load_trainable(model, state: Dict[str, torch.Tensor], what: str) -> None:
    try:
        unwrap(model).load_adapter_state(state, what)
    except ValueError as e:
        raise ResumeError(f"{e}\nwas the method or model changed since the run started?") from None


class RunFolder:
    def __init__(self, run_dir: str, cfg: dict, dist_info: DistInfo):
        self.path, self.cfg, self.dist = run_dir, cfg, dist_info
        self.precision: Optional[str] = None   # Precision.describe() of the run, set by the trainer
        self.resume_notes: List[str] = []   # what load_resume found worth a warning in the run's log

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def start(self, fresh: bool) -> None:
        if self.dist.is_main:
            # temporaries of writes killed in an earlier process (the lock says none is running)
            remove_stale_temps(self.path)
            if fresh:  # a fresh run never appends to stale metric lines
                self.write_config()
                ck.rewrite_jsonl(self.file("metrics.jsonl"), [])
            # a resumed run writes its config (overrides, run.changes) once its resume point is
            # loaded and checked: a refused or failed resume leaves the run's record as it was

    def write_config(self) -> None:
        ck.atomic_write_text(self.file("config.yaml"), C.dump(self.cfg))

    def append_metrics(self, record: dict) -> None:
        ck.append_jsonl(self.file("metrics.jsonl"), record)

    def rewrite_metrics(self, history) -> None:
        ck.rewrite_jsonl(self.file("metrics.jsonl"), history)

    def save_adapter(self, model, name: str, spec, epoch: int) -> None:
        base = unwrap(model)
        record = dict(spec.to_dict(), epoch=epoch)

        def write(d):
            base.save(d, base_model_name=self.cfg["model"]["name"], class_names=spec.class_names)
            ck.atomic_write_json(os.path.join(d, "backbone.json"), record)

        ck.atomic_replace_dir(write, self.file(name))

    def saved_epoch(self, name: str) -> Optional[int]:
        """The epoch the adapter folder ``name`` (best/, last/) was saved at, per its backbone.json;
        None when it is missing or unreadable."""
        from ..build import read_backbone_spec
        try:
            epoch = read_backbone_spec(os.path.join(self.file(name), "backbone.json")).extra.get("epoch")
        except (OSError, ValueError):   # (AdapterError: unreadable)
            return None
        return epoch if isinstance(epoch, int) else None

    def save_resume(self, st: dict, model, optimizer, sched, scaler, ema, path: Optional[str] = None) -> None:
        state: Dict[str, Any] = dict(st)
        state["model"] = unwrap(model).adapter_state_dict()
        state["optimizer"] = optimizer.state_dict()
        state["scheduler"] = sched.state_dict()
        state["scaler"] = scaler.state_dict()
        state["ema"] = ({n: p.detach().cpu().clone() for n, p in ema.module.named_parameters()
                         if n in state["model"]} if ema is not None else None)
        state["rng"] = ck.rng_state()
        state["world_size"] = self.dist.world_size
        state["batch_size"] = int(self.cfg["train"]["batch_size"])
        state["time"] = time.time()
        state["config_fixed_sha256"] = self._config_digest(fixed=True)
        # the backbone the run trains on (its weights as loaded, before any training): a --resume
        # reads model.checkpoint again, and a file changed at that path was trained on unseen
        state["base_model_hash"] = unwrap(model).base_hash
        if self.precision:
            state["precision"] = self.precision
        state["arithmetic"] = arithmetic(model)
        ck.save_state(path or self.file(ck.RESUME_FILE), state)

    def _config_digest(self, fixed: bool) -> Optional[str]:
        """The digest of the run's config.yaml as it stands, its values (not its comments or
        layout): a resume point binds to its run (a resume.safetensors copied from another run
        of the same method was taken, and trained on with this run's configuration). With
        ``fixed``, of the values a --resume cannot change: a resume that changed what it may
        (train.epochs, run.changes, debug.* dropped, ...) rewrites config.yaml before its first
        resume point, and killed before that point, the run could not be resumed again (the
        digest of the whole file, kept by resume points written before 2026-12-05, changed)."""
        try:
            values = C.load_yaml(self.file("config.yaml"))
        except ConfigError:   # missing or not YAML: what resume says of it is said elsewhere
            return None
        if fixed and isinstance(values, dict):
            values = copy.deepcopy(values)
            values.pop("debug", None)
            for key in RO.TRAINING_KEYS + RO.WATCH_KEYS + ("run.changes",):
                sec, name = key.split(".", 1)
                if isinstance(values.get(sec), dict):
                    values[sec].pop(name, None)
        text = json.dumps(values, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def load_resume(self, st: dict, model, optimizer, sched, scaler, ema) -> dict:
        state = ck.load_state(self.file(ck.RESUME_FILE))
        missing = [k for k in ("model", "optimizer", "rng", "world_size", "batch_size")
                   if not isinstance(state, dict) or k not in state]
        if missing:   # (every resume point svp train wrote holds them)
            raise ResumeError(f"{self.file(ck.RESUME_FILE)}: damaged resume state (no {', '.join(missing)}); the "
                              f"file is not as `svp train` wrote it")
        for k in ("epoch", "batch", "global_step", "world_size", "batch_size"):   # read as counts below
            v = state.get(k, 0)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**53:
                raise ResumeError(f"{self.file(ck.RESUME_FILE)}: damaged resume state ({k}={v!r}, expected a count); "
                                  f"the file is not as `svp train` wrote it")
        # (resume points from before the record: not checked; before 2026-12-05: the whole file's)
        fixed = "config_fixed_sha256" in state
        saved = state.get("config_fixed_sha256" if fixed else "config_sha256")
        if saved is not None and saved != self._config_digest(fixed):
            # (a resume point written before 2026-12-05 binds the whole file, which a --resume with
            # changes rewrote before its first resume point)
            older = "" if fixed else (
                "; or, as this resume point is older than svp's record of the values --resume may change, "
                "an interrupted `svp train --resume ... key=value` rewrote config.yaml before its first resume "
                "point: put back the values it changed (run.changes lists them; a debug: block it dropped)")
            raise ResumeError(f"{self.file(ck.RESUME_FILE)} was not saved with this run's config.yaml (copied "
                              f"from another run, or a value in config.yaml edited since{older}); resume the run it "
                              f"came from, or restore config.yaml. --resume takes the changes that apply exactly "
                              f"from a resume point (`svp train --resume {shell_word(self.path)} train.lr=...`; "
                              f"docs/training.md)")
        saved_base, base = state.get("base_model_hash"), unwrap(model).base_hash
        if isinstance(saved_base, str) and saved_base != base:   # (resume points before 2026-12-06: not checked)
            m = self.cfg["model"]
            if m.get("checkpoint"):
                why = (f"{m['checkpoint']} now gives {base}: the file changed since the run started (replaced, "
                       f"re-downloaded, edited). Put the file the run started from back at that path to resume")
            elif m.get("pretrained"):
                why = (f"{m['name']}'s pretrained weights now give {base}: the hub cache holds another file than "
                       f"the run started from (re-downloaded, another version). Put that file back in the cache "
                       f"to resume")
            else:
                why = (f"{m['name']}'s {'random' if m.get('random_init') else 'bundled'} weights now give {base}: "
                       f"another svp, torch or timm made them (an upgrade since the run started). Resume with "
                       f"the versions the run started with")
            raise ResumeError(f"{self.file(ck.RESUME_FILE)}: the run trained on a backbone with weight hash "
                              f"{saved_base}, and {why}; its adapters are bound to those weights")
        bs = int(self.cfg["train"]["batch_size"])
        if state["world_size"] != self.dist.world_size or state["batch_size"] != bs:
            raise ResumeError(
                f"{self.path}: the run used world size {state['world_size']} x batch {state['batch_size']}; "
                f"resume it with the same (now {self.dist.world_size} x {bs})")
        # train.device may change at --resume (the same numbers on another device), but not what the
        # steps compute in: train.amp resolves per device (amp_cpu=false: float32 on the CPU, bfloat16
        # on CUDA; float16 with a scaler on a CUDA device without bfloat16), and a CPU run's disabled
        # scaler left an empty state that a CUDA scaler refused in a traceback (review)
        now, was = self.precision, state.get("precision")
        if isinstance(was, str) and now and was != now:
            raise ResumeError(f"{self.path}: the run trained in {was}, and on {self.cfg['train']['device']!r} "
                              f"it would train in {now}; resume it on the kind of device it trained on (its "
                              f"train.device), or start a new run")
        if scaler.is_enabled() and not state.get("scaler"):   # (resume points without the record)
            raise ResumeError(f"{self.path}: the run trained without a gradient scaler, and on "
                              f"{self.cfg['train']['device']!r} it would train in float16 with one; resume it on "
                              f"the kind of device it trained on, or start a new run")
        load_trainable(model, state["model"], self.file(ck.RESUME_FILE))
        optimizer.load_state_dict(state["optimizer"])
        # the schedule is NOT reloaded: the rate is a pure function of the step (sched.py), and
        # the one built from this run's configuration is the one to follow (a --resume with a
        # new train.lr/train.epochs takes effect exactly from here); the optimizer's groups get
        # this configuration's rate back (a constant schedule never sets it again)
        for group, lr in zip(optimizer.param_groups, sched.base_lrs):
            group["lr"] = group["initial_lr"] = lr
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            params = dict(ema.module.named_parameters())
            with torch.no_grad():
                for n, v in state["ema"].items():
                    params[n].copy_(v.to(params[n].device))
        ck.set_rng_state(state["rng"])
        # another thread count (torch's CPU products sum in another order) or scan backend: the
        # resume goes on, as a run started so would, but its last bits are not those of the run
        # never stopped, and a resume with other threads said nothing of it (review 79)
        was, now = state.get("arithmetic"), arithmetic(model)
        if isinstance(was, dict) and any(was.get(k) is not None and now[k] is not None and was.get(k) != now[k]
                                         for k in now):
            threads, backend = was.get("threads"), was.get("scan_backend")
            same = []
            if isinstance(threads, int) and now["threads"] not in (None, threads):
                same.append(f"OMP_NUM_THREADS={threads}")
            # (another backend on the same kind of device: the recorded one is there to choose)
            if (isinstance(backend, str) and now["scan_backend"] and backend != now["scan_backend"]
                    and was.get("device", now["device"]) == now["device"]):
                same.append(f"SVP_SCAN_BACKEND={backend}")
            hint = f"; resume with {' and '.join(same)} for the same bits" if same else ""
            self.resume_notes.append(
                f"the steps so far ran on {arithmetic_words(was)}, these run on {arithmetic_words(now)}: the "
                f"weights will differ in their last bits from a run that never stopped (the sums' order "
                f"changes){hint}")
        return {k: state.get(k, v) for k, v in st.items()}

    def dump_nonfinite(self, info: dict, x, y, model) -> str:
        out_dir = self.file("nonfinite")
        os.makedirs(out_dir, exist_ok=True)
        ck.atomic_write_json(os.path.join(out_dir, "nonfinite.json"), info)
        tensors = {"inputs": x.detach().cpu().float().contiguous(), "targets": y.detach().cpu().contiguous()}
        tensors.update({f"param/{k}": v for k, v in unwrap(model).adapter_state_dict().items()})
        ck.atomic_save_tensors(os.path.join(out_dir, "batch_and_weights.safetensors"), tensors,
                               {"what": "inputs/targets of the failing step and the weights before it"})
        return out_dir

    def finish(self, res: dict) -> None:
        res["adapter_bytes"] = ck.dir_size(self.file("last"))
        res["run_dir"] = self.path
        ck.atomic_write_json(self.file("results.json"), res)
        # the run is complete: the resume point is no longer needed
        if os.path.exists(self.file(ck.RESUME_FILE)):
            os.replace(self.file(ck.RESUME_FILE), self.file("final_state.safetensors"))
        remove_stale_temps(self.path)


def interrupted_at_once(path, again: bool = True) -> TrainingStopped:
    """A second Ctrl-C (or one before the handler was in place, ``again=False``: a single press
    while the run was starting read "interrupted again": review): stop now, saying where to resume."""
    if path and os.path.isfile(os.path.join(path, ck.RESUME_FILE)):
        hint = (f"without a new resume point; continue from the last one with: "
                f"{resume_command(path)}")
    else:
        hint = "before any resume point was written; start the run again"
    what = "interrupted again: stopped at once" if again else "interrupted while the run was starting"
    return TrainingStopped(f"{what}, {hint}", EXIT_INTERRUPTED, path)




def user_io_error(e: OSError, path) -> Exception:
    """An unwritable run folder (read-only, full, removed) is the user's to fix: one line."""
    name = e.filename if isinstance(e.filename, str) else None
    if isinstance(e, SVPError) or not path:
        return e
    # (the resume point is written whole or not at all: a full disk stopped the run without saying
    # that the last one can be continued from: review 58)
    later = (f"; its last resume point is whole: once the folder can be written, continue with: "
             f"{resume_command(path)}" if os.path.isfile(os.path.join(path, ck.RESUME_FILE)) else "")
    if name and os.path.abspath(name).startswith(path):
        return OutputError(f"run folder {path}: cannot write {name} ({e.strerror or e}){later}")
    if e.errno in DISK_ERRNOS:
        return OutputError(f"run folder {path}: cannot write{' ' + name if name else ''} ({e.strerror or e}){later}")
    return e


# what gloo (and NCCL) raise in a collective whose peer process is gone
_PEER_GONE = re.compile(r"Connection (?:reset|closed) by peer|Broken pipe|NCCL communicator was aborted")


def lost_peer(e: BaseException, dist: DistInfo, path) -> Optional[PeerError]:
    """Under torchrun, a collective whose peer process died (killed, out of memory): one line
    naming what happened and the resume command, instead of gloo's traceback in train.log."""
    found = _PEER_GONE.search(str(e)) if dist.enabled and not isinstance(e, SVPError) else None
    if found is None:
        return None
    # (a folder with no resume point yet was told to resume, which then found nothing: review 65)
    then = (f"The run folder keeps its last resume point: {resume_command(path)}"
            if path and os.path.isfile(os.path.join(path, ck.RESUME_FILE))
            else "It stopped before any resume point was written; start the run again")
    return PeerError(f"rank {dist.rank} lost its connection to another process of this torchrun job "
                     f"({found.group(0)}): that process stopped, and its own output says why. {then}",
                     exit_code=1)


_ATTEMPT_FILES = ("train.log", "nonfinite", "tb", "wandb", "wandb_run_id")


def _set_aside_earlier_log(run_dir: str) -> None:
    """A fresh run in a folder earlier attempts left without a resume point (killed before its
    first, then trained again, e.g. by a restarted sweep; or diverged before it, as the message
    then advises) starts its own ``train.log``: the earlier attempts' are ``train.log.1``, ``.2``,
    ... in the order they ran, and with the same number their divergence dump (``nonfinite.N``: a
    finished run looked as if it had diverged, review), TensorBoard files (``tb.N``) and wandb's
    (``wandb.N``, and its run id ``wandb_run_id.N``: the fresh run is a new wandb run, where it had
    continued the killed attempt's, its steps logged twice).
    metrics.jsonl and config.yaml are rewritten."""
    present = [f for f in _ATTEMPT_FILES if os.path.exists(os.path.join(run_dir, f))]
    if not present:
        return
    n = 1
    while any(os.path.exists(os.path.join(run_dir, f"{f}.{n}")) for f in _ATTEMPT_FILES):
        n += 1
    for f in present:
        os.replace(os.path.join(run_dir, f), os.path.join(run_dir, f"{f}.{n}"))


@contextlib.contextmanager
def run_session(run):
    """The run folder for the whole of a run (``run`` is the loop's Trainer): claimed and
    locked (one process per folder), logged to, and on the way out unlocked; a fresh folder
    that never saw a training step is removed when the run fails, any other failure is
    written to train.log. A second Ctrl-C and an unwritable folder become one-line errors."""
    handlers, lock, created, discard, run_dir = [], None, [], False, run.resume_dir
    run.folder, run.stepped = None, False
    # (a SIGTERM while the folder is set up stops the run as Ctrl-C does: review 58)
    term = sigterm_as_interrupt()
    try:
        try:
            if run.resume_dir:
                # the folder locked and checked by the main rank first: another rank checking on
                # its own said "nothing to resume" of a folder another job was still training
                lock = on_main_rank(lambda: _lock_resumable(run_dir), run.dist, shared=lambda _: None)
                check_resumable(run_dir)
            else:
                run_dir, lock, created = prepare_run_dir(run.cfg, run.dist)
                if run.dist.is_main and not created:
                    _set_aside_earlier_log(run_dir)
            handlers = setup_logging(run_dir if run.dist.is_main else None, run.dist.is_main)
            run.folder = RunFolder(run_dir, run.cfg, run.dist)
            run.folder.start(fresh=not run.resume_dir)
            run.signals.install()
            yield run.folder
        except KeyboardInterrupt:  # a second Ctrl-C (or a first one before the handler was in place)
            raise interrupted_at_once(run.folder.path if run.folder else run_dir,
                                      again=run.signals.received is not None) from None
        except OSError as e:
            raise user_io_error(e, run.folder.path if run.folder else run_dir) from None
        except RuntimeError as e:
            lost = lost_peer(e, run.dist, run.folder.path if run.folder else run_dir)
            if lost is None:
                raise
            raise lost from None
    except BaseException as e:
        # a stop before any step and any resume point leaves nothing to continue: no stub either
        # (a Ctrl-C while the folder was set up left one: review 58)
        where = run.folder.path if run.folder else run_dir
        discard = bool(created) and not run.stepped and (
            not isinstance(e, TrainingStopped) or not os.path.isfile(os.path.join(where, ck.RESUME_FILE)))
        if not discard:
            log_fatal(handlers, e)
        raise
    finally:
        run.signals.restore()
        if term is not None:
            signal.signal(signal.SIGTERM, term)
        teardown_logging(handlers)
        if discard:
            shutil.rmtree(run.folder.path if run.folder else run_dir, ignore_errors=True)
        if lock is not None:
            lock.release()
            if discard and lock.file_outlives_hold():   # (Windows: removed once closed: review45)
                shutil.rmtree(run.folder.path if run.folder else run_dir, ignore_errors=True)
        if discard:   # the folders made for it too (run.output, a run.name's "a/b"), when empty
            remove_made_folders(created[:-1])
