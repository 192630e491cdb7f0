"""Training and evaluation loops (one process or several under torchrun).

``train(config)`` is the whole of ``svp train``: build data, backbone and method,
train with the official recipe, select on validation, report test accuracy, and keep
a run folder that can be resumed after any interruption.

Determinism: the data order is a pure function of (seed, epoch), the augmentation of
a sample a pure function of (seed, epoch, sample index), and every global RNG is
re-seeded from (seed, step, rank) before each optimizer step (mixup draws, drop
path). Together with the saved optimizer/EMA/scaler state this makes a resumed
run bit-identical to an uninterrupted one on CPU, wherever it was stopped.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ck
from . import config as C
from .distributed import (DistInfo, EpochSampler, SeededDataset, ShardSampler, all_reduce_sum, barrier,
                          derive_seed, init_distributed, maybe_device, shutdown, unwrap)
from .optim import build_optimizer, scaled_lr
from .sched import Schedule

log = logging.getLogger("svp.engine")

EXIT_STOPPED = 75       # stopped on request (debug.stop_at_step), resume point written
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM, resume point written
EXIT_NONFINITE = 3


class TrainingStopped(Exception):
    """Raised when the run stops early on purpose (signal, debug stop); ``code`` is the exit code."""

    def __init__(self, message: str, code: int, run_dir: str):
        super().__init__(message)
        self.code, self.run_dir = code, run_dir


class NonFiniteLoss(TrainingStopped):
    def __init__(self, message: str, run_dir: str, step: int):
        super().__init__(message, EXIT_NONFINITE, run_dir)
        self.step = step


# ====================================================================== building blocks
def pick_device(kind: str) -> str:
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind.startswith("cuda") and not torch.cuda.is_available():
        raise C.ConfigError(f"train.device={kind!r} but CUDA is not available on this machine")
    if kind != "cpu" and not kind.startswith("cuda"):
        raise C.ConfigError(f"train.device={kind!r}: expected auto, cpu, cuda or cuda:N")
    return kind


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def build_datasets(cfg: dict):
    import svp.data as data

    d = cfg["data"]
    img = int(d["img_size"])
    opts = dict(d["options"] or {})

    def make(split, training):
        if split is None:
            return None
        ds = data.build_dataset(d["dataset"], split, root=d["root"], transform=None, **opts)
        limit = d["max_train_samples"] if training else d["max_eval_samples"]
        tf = data.build_transform(d["recipe"], training, img_size=img)
        return _Limited(ds, limit), tf

    train = make(d["train_split"], True)
    val = make(d["val_split"], False)
    test = make(d["test_split"], False)
    return train, val, test


class _Limited(torch.utils.data.Dataset):
    """The first ``limit`` items of a dataset (all when ``limit`` is None)."""

    def __init__(self, ds, limit):
        self.ds = ds
        self.n = len(ds) if not limit else min(len(ds), int(limit))
        self.classes = list(getattr(ds, "classes", []))
        self.num_classes = int(getattr(ds, "num_classes", len(self.classes)))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i >= self.n:
            raise IndexError(i)
        return self.ds[i]


def backbone_spec(cfg: dict, num_classes: int, class_names: List[str]) -> Dict[str, Any]:
    """Everything needed to rebuild the frozen backbone for ``svp eval``/``svp predict``."""
    m, d = cfg["model"], cfg["data"]
    ckpt = m["checkpoint"]
    return {"model": m["name"], "checkpoint": os.path.abspath(ckpt) if ckpt else None,
            "pretrained": bool(m["pretrained"]), "kwargs": dict(m["kwargs"] or {}),
            "init_seed": int(m["init_seed"]), "img_size": int(d["img_size"]), "recipe": d["recipe"],
            "dataset": d["dataset"], "method": cfg["method"]["name"], "num_classes": num_classes,
            "class_names": list(class_names)}


def create_backbone(spec: Dict[str, Any], drop_path_rate: Optional[float] = None) -> nn.Module:
    """timm model + optional official checkpoint. Random parts are initialised under
    ``init_seed`` so the same spec always gives the same weights."""
    import timm

    import svp  # noqa: F401  (registers vim_* with timm)

    kwargs = dict(spec.get("kwargs") or {})
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = float(drop_path_rate)
    kwargs.setdefault("img_size", spec.get("img_size", 224))
    state = torch.get_rng_state()
    torch.manual_seed(int(spec.get("init_seed", 0)))
    try:
        model = timm.create_model(spec["model"], pretrained=bool(spec.get("pretrained")),
                                  num_classes=int(spec["num_classes"]), **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise C.ConfigError(f"model.name={spec['model']!r}: {e}") from None
        raise
    finally:
        torch.set_rng_state(state)
    if spec.get("checkpoint"):
        from svp.models import load_checkpoint_into
        path = spec["checkpoint"]
        if not os.path.isfile(path):
            raise C.ConfigError(f"model.checkpoint={path!r}: file not found")
        load_checkpoint_into(model, path)
    return model


def build_method(backbone: nn.Module, cfg: dict, num_classes: int) -> nn.Module:
    import svp.peft as peft

    name = cfg["method"]["name"]
    raw = dict(cfg["method"]["settings"] or {})
    # per-method blocks (method.settings.<method>.<key>) apply only to that method, so one
    # configuration can drive a sweep over several methods
    known = set(peft.list_methods())
    settings = {k: v for k, v in raw.items() if not (k in known and isinstance(v, dict))}
    if isinstance(raw.get(name), dict):
        settings.update(raw[name])
    settings.setdefault("num_classes", num_classes)
    try:
        mc = peft.make_config(name, **settings)
    except (ValueError, TypeError) as e:
        raise C.ConfigError(f"method.name={name!r} / method.settings={settings}: {e}") from None
    return peft.get_peft_model(backbone, mc)


def param_counts(model: nn.Module) -> Dict[str, int]:
    total = trainable = head = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            if any(part == "head" or part.startswith("head") for part in name.split(".")):
                head += p.numel()
    return {"all_params": total, "trainable_params": trainable,
            "trainable_params_without_head": trainable - head, "head_params": head}


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: Dict[str, torch.Tensor], what: str) -> None:
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    missing = wanted - set(state)
    extra = set(state) - wanted
    if missing or extra:
        raise ck.ResumeError(f"{what}: trainable parameters differ from the model "
                             f"(missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}); "
                             f"was the method or model changed since the run started?")
    with torch.no_grad():
        for n in wanted:
            if params[n].shape != state[n].shape:
                raise ck.ResumeError(f"{what}: {n} has shape {tuple(state[n].shape)}, "
                                     f"model has {tuple(params[n].shape)}")
            params[n].copy_(state[n].to(params[n].device, params[n].dtype))


def build_loss(cfg: dict, mixup_active: bool) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active:
        return SoftTargetCrossEntropy()  # smoothing is applied by Mixup to the targets
    if float(cfg["train"]["smoothing"]) > 0:
        return LabelSmoothingCrossEntropy(smoothing=float(cfg["train"]["smoothing"]))
    return nn.CrossEntropyLoss()


def build_mixup(cfg: dict, num_classes: int):
    t = cfg["train"]
    if float(t["mixup"]) <= 0 and float(t["cutmix"]) <= 0:
        return None
    from timm.data import Mixup

    if t["mixup_mode"] in ("pair", "elem") and int(t["batch_size"]) % 2:
        raise C.ConfigError(f"train.mixup_mode={t['mixup_mode']!r} needs an even train.batch_size, "
                            f"got {t['batch_size']}")
    return Mixup(mixup_alpha=float(t["mixup"]), cutmix_alpha=float(t["cutmix"]), prob=float(t["mixup_prob"]),
                 switch_prob=float(t["mixup_switch_prob"]), mode=t["mixup_mode"],
                 label_smoothing=float(t["smoothing"]), num_classes=num_classes)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, transform, batch_size: int, device, dist_info: DistInfo,
             amp_ctx=None, num_workers: int = 0) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of ``model`` on ``dataset``,
    summed over ranks (each rank evaluates a disjoint shard)."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(
        SeededDataset(dataset, transform), batch_size=batch_size,
        sampler=ShardSampler(len(dataset), dist_info.rank, dist_info.world_size), num_workers=num_workers)
    correct1 = correct5 = loss_sum = n = 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with (amp_ctx() if amp_ctx else _null()):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        n += y.numel()
    correct1, correct5, loss_sum, n = all_reduce_sum([correct1, correct5, loss_sum, n], dist_info,
                                                     device=_comm_device(device, dist_info))
    model.train(was_training)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "n": 0}
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "n": int(n)}


def _grad_scaler(enabled: bool):
    """A GradScaler (float16 AMP only; a no-op otherwise). torch >= 2.3 has torch.amp.GradScaler."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _comm_device(device, dist_info: DistInfo):
    if not dist_info.enabled:
        return None
    import torch.distributed as dist
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


# ====================================================================== progress display
class Progress:
    def __init__(self, mode: str, enabled: bool, log_every: int):
        self.enabled = enabled
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.log_every = log_every
        self.bar = None

    def start(self, epoch: int, epochs: int, total: int, done: int):
        self.epoch, self.epochs, self.total, self.t0, self.done0 = epoch, epochs, total, time.time(), done
        self.images = 0
        if self.mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                            dynamic_ncols=True, leave=False)

    def update(self, step_in_epoch: int, loss: float, lr: float, images: int):
        self.images += images
        dt = max(time.time() - self.t0, 1e-9)
        ips = self.images / dt
        if self.mode == "bar" and self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
        elif self.mode == "lines" and (step_in_epoch % self.log_every == 0 or step_in_epoch == self.total):
            left = (self.total - step_in_epoch) * dt / max(step_in_epoch - self.done0, 1)
            log.info("epoch %d/%d step %d/%d loss %.4f lr %.3e %.1f img/s eta %s", self.epoch + 1, self.epochs,
                     step_in_epoch, self.total, loss, lr, ips, _fmt_time(left))

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{(s % 3600) // 60:02d}:{s % 60:02d}"


# ====================================================================== logging
def _setup_logging(run_dir: Optional[str], is_main: bool) -> List[logging.Handler]:
    handlers: List[logging.Handler] = []
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    if is_main:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(sh)
        if run_dir:
            fh = logging.FileHandler(os.path.join(run_dir, "train.log"), encoding="utf-8")
            fh.setFormatter(fmt)
            handlers.append(fh)
    for h in handlers:
        log.addHandler(h)
    return handlers


def _teardown_logging(handlers):
    for h in handlers:
        log.removeHandler(h)
        h.close()


# ====================================================================== run folder
def default_run_name(cfg: dict) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg['data']['dataset']}-{cfg['method']['name']}-s{cfg['train']['seed']}-{stamp}"


def prepare_run_dir(cfg: dict, dist_info: DistInfo) -> str:
    name = cfg["run"]["name"]
    if dist_info.is_main:
        name = name or default_run_name(cfg)
        run_dir = os.path.abspath(os.path.join(cfg["run"]["output"], name))
        if os.path.exists(os.path.join(run_dir, ck.RESUME_FILE)) or os.path.exists(
                os.path.join(run_dir, "results.json")):
            raise C.ConfigError(f"run folder {run_dir} already holds a run; use `svp train --resume {run_dir}` "
                                f"or choose another run.name")
        os.makedirs(run_dir, exist_ok=True)
    else:
        run_dir = None
    from .distributed import broadcast_object
    return broadcast_object(run_dir, dist_info)


def load_run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ck.ResumeError(f"{run_dir} is not a run folder (no config.yaml)")
    saved = C.load_yaml(path)
    cfg = C.defaults()
    C.merge(cfg, saved, path)
    return cfg


# ====================================================================== the trainer
class _Signals:
    def __init__(self):
        self.received: Optional[int] = None
        self.old = {}

    def install(self):
        import threading
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self.old[s] = signal.getsignal(s)
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.received = signum

    def restore(self):
        for s, h in self.old.items():
            signal.signal(s, h)
        self.old = {}


def train(config: Optional[dict] = None, *, resume: Optional[str] = None,
          overrides: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train a method with a resolved (or partial) configuration dict; returns the
    results dict written to ``<run>/results.json``.

    ``resume``: a run folder to continue (its ``config.yaml`` is used; ``overrides``
    may change ``run.*``/``debug.*`` and, at your own risk, other keys).
    """
    if resume:
        cfg = load_run_config(resume)
        cfg["debug"] = C.defaults()["debug"]
        for k, v in C.parse_overrides(overrides or []):
            C.set_key(cfg, k, v)
        C.validate(cfg)
    else:
        if config is not None and all(isinstance(v, dict) for v in config.values()) and \
                set(config) <= set(C.SECTIONS) and _is_complete(config):
            cfg = C.defaults()
            C.merge(cfg, config, "config dict")
            for k, v in C.parse_overrides(overrides or []):
                C.set_key(cfg, k, v)
            C.validate(cfg)
        else:
            cfg = C.resolve(base=config or {}, overrides=overrides or [])
    trainer = Trainer(cfg, resume_dir=resume)
    return trainer.run()


def _is_complete(config: dict) -> bool:
    return all(set(C.defaults()[s]) <= set(config.get(s, {})) for s in C.SECTIONS)


class Trainer:
    def __init__(self, cfg: dict, resume_dir: Optional[str] = None):
        self.cfg = cfg
        self.resume_dir = os.path.abspath(resume_dir) if resume_dir else None

    # ------------------------------------------------------------------ setup
    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        t = cfg["train"]
        device_kind = pick_device(t["device"])
        self.dist = init_distributed("cuda" if device_kind.startswith("cuda") else "cpu")
        self.device = maybe_device(device_kind, self.dist)
        handlers: List[logging.Handler] = []
        signals = _Signals()
        try:
            self.run_dir = self.resume_dir or prepare_run_dir(cfg, self.dist)
            if self.resume_dir and not os.path.isfile(os.path.join(self.run_dir, ck.RESUME_FILE)):
                raise ck.ResumeError(f"{self.run_dir}: nothing to resume (no {ck.RESUME_FILE}; "
                                     f"the run finished or never saved a resume point)")
            handlers = _setup_logging(self.run_dir if self.dist.is_main else None, self.dist.is_main)
            if self.dist.is_main:
                ck.atomic_write_text(os.path.join(self.run_dir, "config.yaml"), C.dump(cfg))
                if not self.resume_dir:  # a fresh run never appends to stale metric lines
                    ck.rewrite_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), [])
            signals.install()
            self.signals = signals
            return self._run()
        finally:
            signals.restore()
            _teardown_logging(handlers)
            shutdown(self.dist)

    def _run(self) -> Dict[str, Any]:
        cfg, t, dinfo = self.cfg, self.cfg["train"], self.dist
        set_deterministic(bool(t["deterministic"]))
        seed = int(t["seed"])
        seed_everything(seed)

        (train_ds, train_tf), val, test = build_datasets(cfg)
        self.classes = list(train_ds.classes)
        num_classes = train_ds.num_classes
        spec = backbone_spec(cfg, num_classes, self.classes)
        self.spec = spec
        backbone = create_backbone(spec, drop_path_rate=cfg["model"]["drop_path_rate"])
        model = build_method(backbone, cfg, num_classes).to(self.device)
        model.train()
        self.model = model
        counts = param_counts(model)

        sampler = EpochSampler(len(train_ds), int(t["batch_size"]), seed, dinfo.rank, dinfo.world_size)
        steps_per_epoch = sampler.batches_per_epoch()
        if steps_per_epoch == 0:
            raise C.ConfigError(f"train.batch_size={t['batch_size']} x world size {dinfo.world_size} is larger "
                                f"than the training set ({len(train_ds)} samples of {cfg['data']['dataset']!r})")
        loader = torch.utils.data.DataLoader(
            SeededDataset(train_ds, train_tf), batch_size=int(t["batch_size"]), sampler=sampler,
            num_workers=int(cfg["data"]["num_workers"]), pin_memory=self.device.type == "cuda",
            persistent_workers=False)

        lr = scaled_lr(cfg, dinfo.world_size)
        optimizer = build_optimizer(model, cfg, lr)
        sched = Schedule(optimizer, cfg, steps_per_epoch)
        use_amp = bool(t["amp"]) and self.device.type == "cuda"
        amp_dtype = torch.float16 if t["amp_dtype"] == "float16" else torch.bfloat16
        scaler = _grad_scaler(use_amp and amp_dtype == torch.float16)
        amp_ctx = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if use_amp else None
        ema = None
        if t["ema"]:
            from timm.utils import ModelEmaV3
            ema = ModelEmaV3(model, decay=float(t["ema_decay"]))
        mixup = build_mixup(cfg, num_classes)
        criterion = build_loss(cfg, mixup is not None)

        ddp_model = model
        if dinfo.enabled:
            ddp_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(t["ddp_find_unused"]))

        # -------------------------------------------------------------- state
        st = {"epoch": 0, "batch": 0, "global_step": 0, "history": [], "best": None,
              "epoch_loss_sum": 0.0, "epoch_steps": 0, "epoch_seconds": 0.0, "epoch_images": 0,
              "train_seconds": 0.0, "nonfinite": None}
        if self.resume_dir:
            st = self._load_resume(st, model, optimizer, sched, scaler, ema)
            log.info("resumed %s at epoch %d, batch %d (global step %d)", self.run_dir, st["epoch"] + 1,
                     st["batch"], st["global_step"])
            if dinfo.is_main:  # drop metric lines written after the resume point
                ck.rewrite_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), st["history"])
        epochs = int(t["epochs"])
        if dinfo.is_main:
            log.info("run folder: %s", self.run_dir)
            log.info("%s on %s (%d classes, %d train samples), backbone %s, device %s, world size %d",
                     cfg["method"]["name"], cfg["data"]["dataset"], num_classes, len(train_ds), cfg["model"]["name"],
                     self.device, dinfo.world_size)
            if not (cfg["model"]["checkpoint"] or cfg["model"]["pretrained"]):
                log.warning("WARNING: the backbone %s is randomly initialised (no model.checkpoint, "
                            "model.pretrained=false): fine for tests, meaningless for results. Use --checkpoint "
                            "<official .pth> or the bundled --model vim_mini_patch4_32 model.pretrained=true",
                            cfg["model"]["name"])
            report = getattr(model, "trainable_report", None)
            log.info("%s", report() if callable(report) else counts)
            log.info("lr used %.4g (base %.4g, batch %d x world %d%s), %d steps/epoch, %d epochs", lr,
                     float(t["lr"]), int(t["batch_size"]), dinfo.world_size,
                     f" / {t['lr_scale_base']}" if t["lr_scale"] else ", unscaled", steps_per_epoch, epochs)
        tb = self._tensorboard()
        progress = Progress(cfg["run"]["progress"], dinfo.is_main, int(cfg["run"]["log_every"]))
        comm_dev = _comm_device(self.device, dinfo)
        max_steps = t["max_steps"]
        dbg = cfg["debug"]
        save_every = int(cfg["run"]["save_every_steps"] or 0)
        stop_training = False

        def save_resume():
            if dinfo.is_main:
                self._save_resume(st, model, optimizer, sched, scaler, ema)
            barrier(dinfo)

        # -------------------------------------------------------------- epochs
        while st["epoch"] < epochs and not stop_training:
            epoch = st["epoch"]
            sampler.set_epoch(epoch, st["batch"])
            sched.start_epoch(epoch)
            progress.start(epoch, epochs, steps_per_epoch, st["batch"])
            t_epoch = time.time()
            seconds_before = st["epoch_seconds"]
            for x, y in loader:
                step_no = st["global_step"] + 1  # 1-based number of the step being run
                sched.before_step(st["global_step"])
                s = derive_seed(seed, st["global_step"], dinfo.rank, 3)
                random.seed(s)
                np.random.seed(s % (2 ** 32))
                torch.manual_seed(s)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                y_in = y
                if mixup is not None:
                    x, y_in = mixup(x, y)
                with (amp_ctx() if amp_ctx else _null()):
                    out = ddp_model(x)
                loss = criterion(out.float(), y_in)
                if dbg["nan_at_step"] is not None and step_no == int(dbg["nan_at_step"]):
                    loss = loss * float("nan")
                finite = bool(torch.isfinite(loss).item())
                loss_val = float(loss.item()) if finite else float(loss.item())
                red = all_reduce_sum([loss_val if finite else 0.0, 0.0 if finite else 1.0,
                                      1.0 if self.signals.received else 0.0], dinfo, comm_dev)
                if red[1] > 0:
                    self._nonfinite(st, step_no, loss_val, x, y, sched.lr(), model, optimizer, sched, scaler, ema,
                                    steps_per_epoch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if t["clip_grad"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   float(t["clip_grad"]))
                scaler.step(optimizer)
                scaler.update()
                if ema is not None:
                    ema.update(model, step=st["global_step"])
                st["global_step"] += 1
                st["batch"] += 1
                mean_loss = red[0] / dinfo.world_size
                st["epoch_loss_sum"] += mean_loss
                st["epoch_steps"] += 1
                st["epoch_images"] += x.shape[0] * dinfo.world_size
                st["epoch_seconds"] = seconds_before + (time.time() - t_epoch)
                progress.update(st["batch"], mean_loss, sched.lr(), x.shape[0] * dinfo.world_size)
                if tb is not None:
                    tb.add_scalar("train/loss", mean_loss, st["global_step"])
                    tb.add_scalar("train/lr", sched.lr(), st["global_step"])
                reached_max = max_steps is not None and st["global_step"] >= int(max_steps)
                stop_req = dbg["stop_at_step"] is not None and st["global_step"] == int(dbg["stop_at_step"])
                if red[2] > 0 or stop_req:
                    progress.close()
                    save_resume()
                    if red[2] > 0:
                        name = signal.Signals(self.signals.received).name if self.signals.received else "signal"
                        msg = (f"{name} received: stopped after step {st['global_step']}; resume point saved. "
                               f"Continue with: svp train --resume {self.run_dir}")
                        raise TrainingStopped(msg, EXIT_INTERRUPTED, self.run_dir)
                    raise TrainingStopped(f"stopped after step {st['global_step']} (debug.stop_at_step); "
                                          f"continue with: svp train --resume {self.run_dir}",
                                          EXIT_STOPPED, self.run_dir)
                if save_every and st["global_step"] % save_every == 0 and st["batch"] < steps_per_epoch:
                    save_resume()
                if dbg["kill_at_step"] is not None and st["global_step"] == int(dbg["kill_at_step"]):
                    os.kill(os.getpid(), signal.SIGKILL)
                if reached_max:
                    stop_training = True
                    break
            progress.close()
            # ---------------------------------------------------------- end of epoch
            epoch_done = st["batch"] >= steps_per_epoch or stop_training
            if not epoch_done:
                continue
            st["train_seconds"] += st["epoch_seconds"]
            last_epoch = epoch == epochs - 1 or stop_training
            record = {"epoch": epoch + 1, "step": st["global_step"],
                      "train_loss": st["epoch_loss_sum"] / max(st["epoch_steps"], 1), "lr": sched.lr(),
                      "images_per_s": st["epoch_images"] / max(st["epoch_seconds"], 1e-9),
                      "train_seconds": st["epoch_seconds"]}
            t_eval = time.time()
            eval_model = ema.module if (ema is not None and t["ema_eval"]) else model
            if val is not None and ((epoch + 1) % int(cfg["eval"]["every"]) == 0 or last_epoch):
                r = evaluate(eval_model, val[0], val[1], int(t["eval_batch_size"]), self.device, dinfo, amp_ctx,
                             int(cfg["data"]["num_workers"]))
                record.update({"val_top1": r["top1"], "val_top5": r["top5"], "val_loss": r["loss"]})
            if test is not None and cfg["eval"]["test_every_epoch"]:
                r = evaluate(eval_model, test[0], test[1], int(t["eval_batch_size"]), self.device, dinfo, amp_ctx,
                             int(cfg["data"]["num_workers"]))
                record.update({"test_top1": r["top1"], "test_top5": r["top5"], "test_loss": r["loss"]})
            record["eval_seconds"] = time.time() - t_eval
            st["history"].append(record)
            improved = self._update_best(st, record, eval_model, val is not None)
            if dinfo.is_main:
                ck.append_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), record)
                msg = (f"epoch {epoch + 1}/{epochs}: loss {record['train_loss']:.4f} lr {record['lr']:.3e} "
                       f"{record['images_per_s']:.1f} img/s {record['train_seconds']:.1f}s")
                if "val_top1" in record:
                    msg += f" | val top1 {record['val_top1']:.2f}"
                if "test_top1" in record:
                    msg += f" | test top1 {record['test_top1']:.2f}"
                log.info(msg + (" (best)" if improved else ""))
                if tb is not None:
                    for k, v in record.items():
                        if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                            tb.add_scalar(f"epoch/{k}", v, epoch + 1)
                if improved:
                    self._save_adapter(eval_model, "best", epoch + 1)
            st.update({"epoch": epoch + 1, "batch": 0, "epoch_loss_sum": 0.0, "epoch_steps": 0,
                       "epoch_seconds": 0.0, "epoch_images": 0})
            save_resume()
            # a signal that arrived during evaluation: the epoch's resume point is written
            if all_reduce_sum([1.0 if self.signals.received else 0.0], dinfo, comm_dev)[0] > 0 \
                    and st["epoch"] < epochs and not stop_training:
                name = signal.Signals(self.signals.received).name if self.signals.received else "signal"
                raise TrainingStopped(f"{name} received: stopped after epoch {st['epoch']}; resume point saved. "
                                      f"Continue with: svp train --resume {self.run_dir}",
                                      EXIT_INTERRUPTED, self.run_dir)

        # -------------------------------------------------------------- final evaluation
        eval_model = ema.module if (ema is not None and t["ema_eval"]) else model
        results = self._finish(st, eval_model, test, val, amp_ctx, counts, lr, stop_training)
        if tb is not None:
            tb.close()
        return results

    # ------------------------------------------------------------------ helpers
    def _tensorboard(self):
        if not (self.cfg["run"]["tensorboard"] and self.dist.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise C.ConfigError("run.tensorboard=true needs the tensorboard package "
                                "(pip install 'svp-vim[tensorboard]')") from None
        return SummaryWriter(os.path.join(self.run_dir, "tb"))

    def _update_best(self, st, record, eval_model, has_val) -> bool:
        metric = self.cfg["eval"]["metric"]
        if has_val:
            if "val_top1" not in record:
                return False
            score = record["val_top1"] if metric == "top1" else -record["val_loss"]
        else:
            score = float(record["epoch"])  # no validation split: the latest epoch is "selected"
        if not math.isfinite(score):
            score = -float("inf")
        best = st["best"]
        if best is None or score > best["score"]:
            st["best"] = {"epoch": record["epoch"], "score": score, "state": trainable_state(eval_model)}
            return True
        return False

    def _save_adapter(self, model, name: str, epoch: int) -> None:
        base = unwrap(model)
        spec = dict(self.spec, epoch=epoch)

        def write(d):
            base.save(d, base_model_name=self.cfg["model"]["name"], class_names=self.classes)
            ck.atomic_write_json(os.path.join(d, "backbone.json"), spec)

        ck.atomic_replace_dir(write, os.path.join(self.run_dir, name))

    def _save_resume(self, st, model, optimizer, sched, scaler, ema) -> None:
        state = {k: v for k, v in st.items()}
        state["model"] = trainable_state(model)
        state["optimizer"] = optimizer.state_dict()
        state["scheduler"] = sched.state_dict()
        state["scaler"] = scaler.state_dict()
        state["ema"] = ({n: p.detach().cpu().clone() for n, p in ema.module.named_parameters()
                         if n in state["model"]} if ema is not None else None)
        state["rng"] = ck.rng_state()
        state["world_size"] = self.dist.world_size
        state["batch_size"] = int(self.cfg["train"]["batch_size"])
        state["time"] = time.time()
        ck.save_state(os.path.join(self.run_dir, ck.RESUME_FILE), state)

    def _load_resume(self, st, model, optimizer, sched, scaler, ema):
        state = ck.load_state(os.path.join(self.run_dir, ck.RESUME_FILE))
        if state["world_size"] != self.dist.world_size or state["batch_size"] != int(self.cfg["train"]["batch_size"]):
            raise ck.ResumeError(
                f"{self.run_dir}: the run used world size {state['world_size']} x batch {state['batch_size']}; "
                f"resume it with the same (now {self.dist.world_size} x {self.cfg['train']['batch_size']})")
        load_trainable_state(model, state["model"], f"{self.run_dir}/{ck.RESUME_FILE}")
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            params = dict(ema.module.named_parameters())
            with torch.no_grad():
                for n, v in state["ema"].items():
                    params[n].copy_(v.to(params[n].device))
        ck.set_rng_state(state["rng"])
        for k in st:
            if k in state:
                st[k] = state[k]
        return st

    def _nonfinite(self, st, step_no, loss_val, x, y, lr, model, optimizer, sched, scaler, ema, steps_per_epoch):
        out_dir = os.path.join(self.run_dir, "nonfinite")
        info = {"step": step_no, "epoch": st["epoch"] + 1, "batch_in_epoch": st["batch"] + 1,
                "batches_per_epoch": steps_per_epoch, "loss": repr(loss_val), "lr": lr, "rank": self.dist.rank}
        if self.dist.is_main:
            os.makedirs(out_dir, exist_ok=True)
            ck.atomic_write_json(os.path.join(out_dir, "nonfinite.json"), info)
            tensors = {"inputs": x.detach().cpu().float().contiguous(), "targets": y.detach().cpu().contiguous()}
            tensors.update({f"param/{k}": v for k, v in trainable_state(model).items()})
            ck.atomic_save_tensors(os.path.join(out_dir, "batch_and_weights.safetensors"), tensors,
                                   {"what": "inputs/targets of the failing step and the weights before it"})
            # a resume point just before the failing step (e.g. to continue with a lower lr)
            self._save_resume(st, model, optimizer, sched, scaler, ema)
        barrier(self.dist)
        msg = (f"non-finite loss ({loss_val}) at step {step_no} (epoch {st['epoch'] + 1}, batch "
               f"{st['batch'] + 1}/{steps_per_epoch}, lr {lr:.3e}); training stopped. The batch and the weights "
               f"before the step are in {out_dir}; a resume point before the step is in "
               f"{os.path.join(self.run_dir, ck.RESUME_FILE)}")
        log.error(msg)
        raise NonFiniteLoss(msg, self.run_dir, step_no)

    def _finish(self, st, eval_model, test, val, amp_ctx, counts, lr, stopped_early) -> Dict[str, Any]:
        cfg, t, dinfo = self.cfg, self.cfg["train"], self.dist
        hist = st["history"]
        if not hist:
            raise TrainingStopped("training ended before the first epoch finished", 1, self.run_dir)
        last = hist[-1]
        ebs, nw = int(t["eval_batch_size"]), int(cfg["data"]["num_workers"])
        final_test = best_test = None
        last_state = trainable_state(eval_model)
        if test is not None:
            final_test = evaluate(eval_model, test[0], test[1], ebs, self.device, dinfo, amp_ctx, nw)
        best = st["best"]
        if test is not None and best is not None:
            if best["epoch"] == last["epoch"]:
                best_test = final_test
            else:
                load_trainable_state(eval_model, best["state"], "best weights")
                best_test = evaluate(eval_model, test[0], test[1], ebs, self.device, dinfo, amp_ctx, nw)
                load_trainable_state(eval_model, last_state, "last weights")
        best_rec = next((h for h in hist if h["epoch"] == best["epoch"]), last) if best else last
        res: Dict[str, Any] = {
            "dataset": cfg["data"]["dataset"], "method": cfg["method"]["name"], "seed": int(t["seed"]),
            "model": cfg["model"]["name"], "checkpoint": cfg["model"]["checkpoint"],
            "backbone_init": ("checkpoint" if cfg["model"]["checkpoint"] else
                              "pretrained" if cfg["model"]["pretrained"] else "random"),
            "epochs_run": last["epoch"], "epochs": int(t["epochs"]), "steps": st["global_step"],
            "stopped_early": bool(stopped_early),
            "selection": (f"epoch with the best validation {cfg['eval']['metric']} on split "
                          f"{cfg['data']['val_split']!r}" if val is not None else
                          "no validation split: the last epoch"),
            "val_selected": {"epoch": best_rec["epoch"], "val_top1": best_rec.get("val_top1"),
                             "test_top1": best_test["top1"] if best_test else None,
                             "test_top5": best_test["top5"] if best_test else None},
            "final": {"epoch": last["epoch"], "val_top1": last.get("val_top1"),
                      "test_top1": final_test["top1"] if final_test else None,
                      "test_top5": final_test["top5"] if final_test else None,
                      "test_loss": final_test["loss"] if final_test else None,
                      "test_samples": final_test["n"] if final_test else 0},
            "final_train_loss": last["train_loss"],
        }
        if cfg["eval"]["report_best_test"]:
            tests = [(h["test_top1"], h["epoch"]) for h in hist if "test_top1" in h]
            if tests:
                v, e = max(tests, key=lambda p: (p[0], -p[1]))
                res["official_best_test_top1"] = {
                    "value": v, "epoch": e,
                    "note": "OFFICIAL PROTOCOL: best test top-1 over all epochs; selects on the test split, "
                            "so it is optimistic and not a held-out estimate"}
        res.update(counts)
        res.update({"lr_used": lr, "global_batch": int(t["batch_size"]) * dinfo.world_size,
                    "world_size": dinfo.world_size,
                    "train_seconds": sum(h["train_seconds"] for h in hist),
                    "images_per_s": (sum(h["images_per_s"] * h["train_seconds"] for h in hist)
                                     / max(sum(h["train_seconds"] for h in hist), 1e-9)),
                    "device": str(self.device)})
        if dinfo.is_main:
            self._save_adapter(eval_model, "last", last["epoch"])
            if not os.path.isdir(os.path.join(self.run_dir, "best")) and best is not None:
                load_trainable_state(eval_model, best["state"], "best weights")
                self._save_adapter(eval_model, "best", best["epoch"])
                load_trainable_state(eval_model, last_state, "last weights")
            res["adapter_bytes"] = ck.dir_size(os.path.join(self.run_dir, "last"))
            res["run_dir"] = self.run_dir
            ck.atomic_write_json(os.path.join(self.run_dir, "results.json"), res)
            # the run is complete: the resume point is no longer needed
            rp = os.path.join(self.run_dir, ck.RESUME_FILE)
            if os.path.exists(rp):
                os.replace(rp, os.path.join(self.run_dir, "final_state.safetensors"))
            sel = res["val_selected"]
            log.info("done: final-epoch test top1 %s | %s (epoch %s) test top1 %s%s",
                     _pct(res["final"]["test_top1"]), "val-selected" if val is not None else "no val split, last",
                     sel["epoch"], _pct(sel["test_top1"]),
                     (f" | official best-test-over-epochs {res['official_best_test_top1']['value']:.2f} "
                      f"(selected on test)" if "official_best_test_top1" in res else ""))
        barrier(dinfo)
        res["run_dir"] = self.run_dir
        return res


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"
