"""``svp pretrain``: pre-train a Vim on the IFS fractal categories and export it.

The loop is deliberately small and self-contained (no dependency on the fine-tuning
engine, whose recipes are for adaptation): in-memory uint8 images, per-epoch seeded
shuffling, random mirror as the only augmentation (pose, colour and shape jitter are
already in the generator), AdamW with linear warm-up then cosine decay per step,
label smoothing. A checkpoint (weights + optimiser state, with the position in the
safetensors file's metadata, and the position again as JSON to read) is written
atomically every ``--ckpt-every`` steps, at the end, and after the step under way when a
SIGINT/SIGTERM comes (:class:`Interrupted`; a Ctrl-C lost the steps since the last one);
``--resume`` continues from it and reproduces the uninterrupted run's data order.

``--export`` writes the released asset: the model's weights in safetensors (fp32)
plus a JSON model card next to it holding the recipe, the exact command, the data
definition, the file's sha256 and the held-out source-task accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..compat import memory_bytes
from ..errors import ConfigError, ResumeError
from ..io import (atomic_save_safetensors, atomic_write_json, atomic_write_text, error_line, print_or_drop,
                  remove_dead_writers_temps, sha256_file, user_path)
from .fractals import generate_split, make_categories

DEFAULTS = dict(model="vim_mini_patch4_32", num_classes=32, per_class=500, heldout_per_class=50, seed=0,
                epochs=4, batch_size=128, lr=2e-3, min_lr=1e-5, weight_decay=0.05, warmup_steps=50,
                label_smoothing=0.1, ckpt_every=50, threads=1)
MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)  # as the data recipes use by default
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)


def to_input(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> normalised float (n, 3, h, w), the pretraining input."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float().div_(255)
    return (x - MEAN) / STD


def lr_at(step: int, total: int, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    t = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


class Diverged(Exception):
    """The loss went non-finite (svp pretrain exits 3, as svp train's NonFiniteLoss; it was a
    RuntimeError traceback, not in pretrain.log)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _model_problem(args):
    """What is wrong with --model and --model-kwargs, found by building the model on the meta
    device (no memory) before any data is made, or None. (An unknown model or argument was said
    after the data were generated, and a non-Vim model trained to the end, then failed its export
    with a traceback: review 60.)"""
    import timm

    import svp.models  # noqa: F401  (registers vim_*)
    from svp.models.vim import VisionMamba
    kwargs = dict(getattr(args, "model_kwargs", None) or {})
    if "num_classes" in kwargs:   # (overridden by --num-classes, silently)
        return (f"--model-kwargs sets num_classes ({kwargs['num_classes']!r}): the head has --num-classes "
                f"classes, one per fractal category; give --num-classes")
    try:
        with torch.device("meta"):
            m = timm.create_model(args.model, num_classes=2, **kwargs)
    except Exception as e:  # noqa: BLE001  (unknown model, unknown or bad argument)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"--model {args.model}" + (f" with --model-kwargs {json.dumps(kwargs)}" if kwargs else "") \
            + f" does not build ({first})"
    if not isinstance(m, VisionMamba):
        return (f"--model {args.model} is a {type(m).__name__}, not a Vision Mamba: svp pretrain trains and "
                f"exports a Vim (e.g. vim_mini_patch4_32, or vim_tiny_patch16_224 with --model-kwargs)")
    size = tuple(int(v) for v in m.patch_embed.img_size)
    if size != (32, 32):
        # (the fractals are drawn at 32 px: a 64 px model trained on them resampled, and its card said 64)
        return (f"--model {args.model} takes {size[0]}x{size[1]} images, and the fractals are 32x32; "
                f"set \"img_size\": 32 in --model-kwargs")
    return None


# the files of a pretraining run folder (an --export must not replace them)
RUN_FILES = ("checkpoint.safetensors", "checkpoint.json", "summary.json", "pretrain.log", "pretrain.lock")
CARD_TITLE = "# Model card: `"


def card_paths(export: str):
    """The JSON card and the Markdown card an export writes beside its weights."""
    path = os.path.abspath(export)
    return os.path.splitext(path)[0] + ".json", os.path.join(os.path.dirname(path), "MODEL_CARD.md")


def _export_problem(args):
    """What stops --export from being written, found before the run (each was said after the
    whole run, or not at all: a card written over its own weights, an export over the run's
    checkpoint, a FIFO or device replaced by a file: review 60), or None."""
    import stat
    path = os.path.abspath(args.export)
    if not path.endswith(".safetensors"):   # (w.json: the JSON card was written over the weights)
        return (f"--export {args.export}: expected a file name ending in .safetensors (its JSON card goes "
                f"beside it, under the same name with .json)")
    # (the folders as they are: link/checkpoint.safetensors with link -> --out replaced the
    # run's checkpoint: retest 64)
    real, out = os.path.realpath(path), os.path.realpath(args.out)
    if real == out:
        return (f"--export {args.export} is --out; give a file to write, e.g. "
                f"{os.path.join(args.out, 'model.safetensors')}")
    json_card, md_card = card_paths(path)
    if os.path.dirname(real) == out:
        clash = [os.path.basename(f) for f in (path, json_card) if os.path.basename(f) in RUN_FILES]
        if clash:
            return (f"--export {args.export}: {clash[0]} is one of the run's own files in --out; give "
                    f"another file name")
    top = os.path.dirname(path)
    while not os.path.exists(top) and os.path.dirname(top) != top:
        top = os.path.dirname(top)
    if not os.path.isdir(top):
        return f"--export {args.export}: {top} is a file, where a folder of the path was expected"
    for f, what in ((path, "the export"), (json_card, "its JSON card"), (md_card, "its MODEL_CARD.md")):
        try:
            st = os.lstat(f)
        except FileNotFoundError:
            continue
        except OSError as e:
            return f"--export {args.export}: cannot read {f} ({e.strerror or e})"
        if stat.S_ISDIR(st.st_mode):
            return f"--export {args.export}: {f}, where {what} goes, is a folder"
        if not stat.S_ISREG(st.st_mode):   # (replaced by a file through os.replace: /dev/null was)
            return (f"--export {args.export}: {f}, where {what} goes, is not a regular file (a link, pipe "
                    f"or device); give the path of a file to write")
    if os.path.isfile(md_card):
        try:
            with open(md_card, encoding="utf-8", errors="replace") as fh:
                first = fh.readline()
        except OSError as e:
            return f"--export {args.export}: cannot read {md_card} ({e.strerror or e})"
        if not first.startswith(CARD_TITLE):   # (a user's own MODEL_CARD.md was replaced, silently)
            return (f"--export {args.export}: its folder holds a MODEL_CARD.md that svp pretrain did not "
                    f"write ({md_card}); export into another folder, or move that file")
    return None


def build_model(args, num_classes: int):
    """The backbone to pre-train: random weights from the global RNG (seeded by the caller)."""
    from ..build import ModelSpec, build_model as build
    return build(ModelSpec(args.model, num_classes=num_classes, random_init=True,
                           kwargs=dict(getattr(args, "model_kwargs", None) or {})))


@torch.no_grad()
def evaluate(model, images_u8: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = model(to_input(images_u8[i:i + batch_size]))
        correct += int((logits.argmax(-1).numpy() == labels[i:i + batch_size]).sum())
    return correct / max(1, len(labels))


def _optim_state(opt, names) -> Dict[str, torch.Tensor]:
    out = {}
    for p, name in zip(opt.param_groups[0]["params"] + opt.param_groups[1]["params"], names):
        st = opt.state.get(p)
        if st:
            out[f"exp_avg.{name}"] = st["exp_avg"]
            out[f"exp_avg_sq.{name}"] = st["exp_avg_sq"]
            out[f"step.{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    return out


def _load_optim_state(opt, names, tensors):
    for p, name in zip(opt.param_groups[0]["params"] + opt.param_groups[1]["params"], names):
        if f"exp_avg.{name}" in tensors:
            opt.state[p] = {"step": torch.tensor(float(tensors[f"step.{name}"][0])),
                            "exp_avg": tensors[f"exp_avg.{name}"].clone(),
                            "exp_avg_sq": tensors[f"exp_avg_sq.{name}"].clone()}


def _make_optimizer(model, args):
    decay, no_decay, dn, nn_ = [], [], [], []
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name in skip or name.endswith(".bias") or getattr(p, "_no_weight_decay", False):
            no_decay.append(p), nn_.append(name)
        else:
            decay.append(p), dn.append(name)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    return opt, dn + nn_


def pretrain(args, log=print) -> dict:
    """Run (or resume) pretraining into ``args.out``; returns the final summary."""
    import signal

    from ..io import sigterm_as_interrupt
    torch.set_num_threads(max(1, int(args.threads)))
    os.makedirs(args.out, exist_ok=True)
    # a SIGTERM before the loop's own handler (while the data are made) is a Ctrl-C: it ended the
    # process with no word and an empty log (review 60)
    old_term = sigterm_as_interrupt()
    try:
        return _pretrain(args, log)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _pretrain(args, log) -> dict:
    from .. import ops
    torch.manual_seed(args.seed)
    model = build_model(args, args.num_classes)
    opt, names = _make_optimizer(model, args)
    n = args.num_classes * args.per_class   # (generate_split makes per_class images of each class)
    steps_per_epoch = n // args.batch_size
    total = steps_per_epoch * args.epochs
    step = 0
    ckpt = os.path.join(args.out, "checkpoint.safetensors")
    state_json = os.path.join(args.out, "checkpoint.json")
    history, loss_avg, segments = [], None, []
    # the part of the run this process trains: its threads and scan backend (the bits depend on
    # both: a resume on others continues another run's arithmetic) and its seconds
    segment = {"from_step": 0, "to_step": 0, "threads": torch.get_num_threads(), "scan_backend": ops.get_backend(),
               "seconds": 0.0}
    if args.resume and os.path.isfile(ckpt):
        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            # the state in the weights' own file (one atomic write): a kill between the two files
            # left step 8's weights beside step 4's checkpoint.json, resumed as step 4. Files of
            # earlier versions hold it in checkpoint.json only
            source = ckpt
            try:
                with safe_open(ckpt, framework="pt") as f:
                    text = (f.metadata() or {}).get("state")
            except Exception:   # unreadable: said below, where the tensors are read
                text = ""
            if text is None:
                source = state_json
                if not os.path.isfile(state_json):
                    raise ValueError("no step recorded")
                with open(state_json) as f:
                    text = f.read()
            saved = json.loads(text) if text else {"step": 0}
            if not isinstance(saved, dict) or not isinstance(saved.get("step"), int):
                raise ValueError("expected an object with an integer 'step'")
        except ValueError as e:   # JSONDecodeError too: cut off by a full disk, edited
            raise ResumeError(f"--resume: {source} is damaged ({e}); start a new --out") from None
        _check_resume_args(saved.get("args") or {}, vars_of(args), source)
        try:
            tensors = load_file(ckpt)
            model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
            _load_optim_state(opt, names, tensors)
            if "rng.torch" in tensors:   # (drop-path draws from it: resumes differed from the run: review 60)
                torch.set_rng_state(tensors["rng.torch"].clone())
            # (views of the file's mapped pages, kept for the whole run otherwise: on Windows a
            # mapped file cannot be replaced, and the next checkpoint could not be written)
            del tensors
        except Exception as e:   # SafetensorError (truncated, empty), tensors that do not fit
            raise ResumeError(f"--resume: {ckpt} cannot be read or does not fit this model "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              f"start a new --out") from None
        step = int(saved["step"])
        # the epochs before the resume point and the loss average: the summary and the model card
        # report the whole run, and the logged loss goes on as if never stopped
        history, loss_avg = list(saved.get("history") or []), saved.get("loss_avg")
        # (None: a resume point of an earlier version, which kept no segments: the total time is not known)
        segments = list(saved.get("segments") or []) if isinstance(saved.get("segments"), list) or step == 0 \
            else None
        segment["from_step"] = segment["to_step"] = step
        log(f"resumed from {ckpt} at step {step}/{total}")
        before = (segments or [{}])[-1]
        ran = (before.get("threads", (saved.get("args") or {}).get("threads")), before.get("scan_backend"))
        now = (segment["threads"], segment["scan_backend"])
        if step < total and any(a is not None and a != b for a, b in zip(ran, now)):
            log(f"warning: the steps so far ran on {ran[0]} thread(s) with scan backend {ran[1] or '(not recorded)'}, "
                f"these run on {now[0]} with {now[1]}: the weights will differ in their last bits from a run "
                f"that never stopped (the sums' order changes); the model card records both")
    elif args.resume:   # (the help's "if present": said, not silent)
        log(f"--resume: no {ckpt} yet; starting at step 0")
    t0 = time.time()
    cats = make_categories(args.num_classes, args.seed)
    train_x, train_y = generate_split("train", args.num_classes, args.per_class, args.seed, categories=cats)
    held_x, held_y = generate_split("heldout", args.num_classes, args.heldout_per_class, args.seed,
                                    categories=cats)
    assert len(train_y) == n, (len(train_y), n)
    log(f"data: {len(train_y)} train / {len(held_y)} held-out IFS images, {args.num_classes} categories "
        f"({time.time() - t0:.1f}s)")
    if args.warmup_steps >= total and step < total:   # (the rate never reached --lr; the card said it did)
        log(f"warning: --warmup-steps {args.warmup_steps} is not below the run's {total} steps: the learning "
            f"rate rises to {lr_at(total - 1, total, args):.3g} and never reaches --lr {args.lr}")
    log(f"model {args.model}: {sum(p.numel() for p in model.parameters()):,} params; scan backend "
        f"{ops.get_backend()} (available: {', '.join(ops.available_backends())}); {total} steps of "
        f"{args.batch_size}; threads {torch.get_num_threads()}")

    def segments_now(measure=True):
        if measure:
            segment["to_step"], segment["seconds"] = step, round(time.time() - t_start, 1)
        if segments is None:
            return None
        return segments + ([dict(segment)] if segment["to_step"] > segment["from_step"] else [])

    def save_ckpt():
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update(_optim_state(opt, names))
        tensors["rng.torch"] = torch.get_rng_state()
        state = {"step": step, "total": total, "args": vars_of(args), "history": history, "loss_avg": loss_avg,
                 "segments": segments_now()}
        atomic_save_safetensors(ckpt, tensors, metadata={"state": json.dumps(state)})
        atomic_write_json(state_json, state)   # (the same, to read; --resume reads the weights' file)

    model.train()
    epochs = -(-total // steps_per_epoch)
    t_start = time.time()
    # a first SIGINT/SIGTERM ends the step under way and saves it; a second one, later, stops
    # at once (svp.engine.signals, as svp train)
    from ..engine.signals import Signals
    signals = Signals().install()
    try:
        while step < total:
            epoch, i = divmod(step, steps_per_epoch)
            g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
            perm = torch.randperm(n, generator=g)
            flips = torch.rand(n, generator=g) < 0.5
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            x = to_input(train_x[idx.numpy()])
            fl = flips[idx]
            x[fl] = x[fl].flip(-1)
            y = torch.from_numpy(train_y[idx.numpy()])
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args)
            loss = F.cross_entropy(model(x), y, label_smoothing=args.label_smoothing)
            if not torch.isfinite(loss):
                raise Diverged(f"non-finite loss ({loss.item()}) at step {step}, lr {lr_at(step, total, args):.3g}: "
                               f"training stopped; start again in another --out with a lower --lr (or more "
                               f"--warmup-steps)", step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_avg = loss.item() if loss_avg is None else 0.9 * loss_avg + 0.1 * loss.item()
            if step % 10 == 0 or step == total:
                el = time.time() - t_start
                # epochs counted from 1, as svp train and the model card count them (summary.json's
                # history keeps its 0-based "epoch" field, which the card and older files read)
                log(f"step {step}/{total} epoch {epoch + 1}/{epochs} loss (EMA) {loss_avg:.4f} "
                    f"lr {opt.param_groups[0]['lr']:.2e} {el:.0f}s elapsed")
            if step % steps_per_epoch == 0 or step == total:
                acc = evaluate(model, held_x, held_y)
                history.append({"step": step, "epoch": epoch, "heldout_acc": acc, "loss": loss_avg})
                log(f"epoch {epoch + 1}/{epochs} done: held-out accuracy {acc:.4f}")
                model.train()
            # (after the epoch's record, which it keeps)
            if step % args.ckpt_every == 0 or step == total or signals.received:
                save_ckpt()
            if signals.received and step == total:   # the run is done: finished, not stopped
                log(f"{signals.name} received in the last step: finishing (held-out evaluation, export)")
            if signals.received and step < total:
                raise Interrupted(f"{signals.name} received: stopped after step {step}/{total}; checkpoint saved. "
                                  f"Continue with the same command and --resume")
    finally:
        signals.restore()
    acc = evaluate(model, held_x, held_y)
    # (as the last checkpoint measured it, at the last step: the held-out evaluation after it is not
    # training, and a resume that only exports reads the checkpoint's seconds; the two said 0.2 and 0.1 s)
    done = segments_now(measure=False)
    # (the whole run's training time: after a resume that only exported, it said 0.2 s: review 60)
    summary = {"steps": total, "heldout_accuracy": acc, "heldout_images": int(len(held_y)),
               "chance": 1.0 / args.num_classes,
               "train_seconds": None if done is None else round(sum(sg["seconds"] for sg in done), 1),
               "train_seconds_this_run": segment["seconds"], "segments": done, "history": history}
    atomic_write_json(os.path.join(args.out, "summary.json"), summary)
    log(f"done: held-out accuracy {acc:.4f} (chance {1 / args.num_classes:.4f})")
    if args.export:
        export(model, args, summary, cats, log)
    return summary


# what may differ between a run and its resume: where it writes, how often it saves, its threads
_RESUME_FREE = ("out", "resume", "export", "ckpt_every", "threads", "func", "command_line")


class Interrupted(Exception):
    """A signal stopped the run after a step, its checkpoint saved (exit 130)."""


def _check_resume_args(saved: dict, now: dict, source: str) -> None:
    """Refuse a resume whose arguments would make another run than the one saved (another
    schedule, data or model): its steps would not continue the saved ones."""
    diff = [f"--{k.replace('_', '-')} {saved[k]!r} -> {now.get(k)!r}" for k in sorted(saved)
            if k not in _RESUME_FREE and saved[k] != now.get(k)]
    if diff:
        raise ConfigError(f"--resume: {source} was saved by a run with other arguments ({'; '.join(diff)}); "
                          f"resume with the same ones, or start a new --out")


def vars_of(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func",)}


def export(model, args, summary: dict, cats, log=print) -> str:
    """Write the weights (safetensors) and the JSON card with the file's sha256."""
    path = args.export
    meta = {"format": "pt", "model": args.model, "source_task": f"ifs_fractal_{args.num_classes}",
            "seed": str(args.seed)}
    # (a second held-out draw, of 10 per class, that tests/test_mini_backbone.py regenerates: not
    # a subset of the held-out split, whatever its name in the card's JSON says)
    test_x, test_y = generate_split("heldout", args.num_classes, 10, args.seed, categories=cats)
    test_acc = evaluate(model, test_x, test_y)
    kwargs = dict(getattr(args, "model_kwargs", None) or {})
    card = {
        "model": args.model,
        "file": os.path.basename(path),
        "sha256": None,   # (the file's, once written)
        "bytes": None,
        "params": int(sum(p.numel() for p in model.parameters())),
        "architecture": {k: v for k, v in _arch(model).items()},
        "source_task": {
            "name": f"IFS fractal categories ({args.num_classes} classes), svp.pretrain.fractals",
            "num_classes": args.num_classes, "seed": args.seed, "img_size": 32,
            "train": {"split": "train", "per_class": args.per_class},
            "heldout": {"split": "heldout", "per_class": args.heldout_per_class,
                        "accuracy": summary["heldout_accuracy"]},
            "heldout_test_subset": {"split": "heldout", "per_class": 10, "accuracy": test_acc},
            "chance": 1.0 / args.num_classes,
        },
        "recipe": {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "min_lr", "weight_decay",
                                                  "warmup_steps", "label_smoothing", "threads")},
        "model_kwargs": kwargs,
        "drop_path_rate": float(kwargs.get("drop_path_rate", 0.0) or 0.0),
        "normalisation": {"mean": MEAN.flatten().tolist(), "std": STD.flatten().tolist()},
        "command": getattr(args, "command_line", None),
        "history": summary.get("history", []),
        "train_seconds_last_run": summary.get("train_seconds_this_run"),
        "train_seconds": summary.get("train_seconds"),
        "segments": summary.get("segments"),
        "torch": torch.__version__,
    }
    card_path, md_path = card_paths(path)
    # (the folder first: the lock file goes in it, and an --export into a new folder failed after the
    # whole run: retest 73)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _export_lock(path):   # the weights, their sha256 and the cards, of one run (review 71)
        atomic_save_safetensors(path, model.state_dict(), metadata=meta)
        digest, size = sha256_file(path), os.path.getsize(path)
        card.update(sha256=digest, bytes=size)
        atomic_write_json(card_path, card)
        replaced = _card_file(md_path)
        atomic_write_text(md_path, model_card_markdown(card))   # (surrogateescape: a non-UTF-8 --out in its command)
    if replaced and replaced != card["file"]:   # (one MODEL_CARD.md a folder: said, not silent)
        log(f"{md_path} described {replaced}; it now describes {card['file']} (the JSON card beside each "
            f"file describes that file)")
    log(f"exported {path} ({size / 1e6:.2f} MB, sha256 {digest}) and {card_path}; held-out accuracy "
        f"{summary['heldout_accuracy']:.4f}, a second held-out draw (10 per class) {test_acc:.4f}")
    return path


class _export_lock:
    """Hold a lock file beside ``--export`` while the weights and their cards are written: two
    runs exporting to one file at once left the weights of one and the JSON card (its sha256
    not the file's) of the other, both saying "exported" (review 71). The second waits for the
    first (a few seconds at most: the writes alone are inside), then writes its own whole. A file
    system without locks exports without one, as before."""

    def __init__(self, path: str, wait_s: float = 600.0):
        from ..engine.runlock import RunLock
        self.lock = RunLock(os.path.dirname(os.path.abspath(path)), lock_file=f".{os.path.basename(path)}.lock",
                            what="export", advice="another svp pretrain is exporting to this file")
        self.wait_s = wait_s

    def __enter__(self):
        from ..engine.runlock import LocksRefused
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                self.lock.acquire("export")
                return self
            except LocksRefused:
                return self
            except ResumeError as e:   # (held by another export: wait; a folder that refuses the file: say it)
                if "is in use by" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def __exit__(self, *exc):
        self.lock.release()
        return False


def _card_file(md_path: str):
    """The weights file an existing MODEL_CARD.md describes (its ``File:`` line), or None."""
    try:
        with open(md_path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("File: `"):
                    return line[len("File: `"):].split("`")[0]
    except OSError:
        pass
    return None


def _card_segments(card: dict) -> str:
    """Where the run trained, part by part (threads and scan backend set the weights' last bits)."""
    segs = card.get("segments")
    total = card.get("train_seconds")
    if not segs:
        return (f"Training time of the last run: {card.get('train_seconds_last_run')} s on {card['recipe']['threads']} "
                f"CPU thread(s)")
    parts = "; ".join(f"steps {sg['from_step']}-{sg['to_step']}: {sg['threads']} thread(s), scan backend "
                      f"{sg['scan_backend']}, {sg['seconds']} s" for sg in segs)
    return f"Training time: {total} s ({parts})"


def model_card_markdown(card: dict) -> str:
    """The human-readable card, generated from the JSON card (which tests read)."""
    a, st, r = card["architecture"], card["source_task"], card["recipe"]
    hist = "\n".join(f"| {h['epoch'] + 1} | {h['step']} | {h['loss']:.4f} | {100 * h['heldout_acc']:.2f}% |"
                     for h in card.get("history", []))
    kwargs = card.get("model_kwargs") or {}
    model, file = card["model"], card["file"]
    spec = f'ModelSpec("{model}", checkpoint="{file}", num_classes=10' + (f", kwargs={kwargs!r})" if kwargs else ")")
    drop = card.get("drop_path_rate") or 0.0
    return f"""{CARD_TITLE}{card['model']}` (pre-trained by `svp pretrain`)

File: `{card['file']}` ({card['bytes']:,} bytes, fp32 safetensors), sha256
`{card['sha256']}` (also in `{os.path.splitext(card['file'])[0]}.json`, the card this one is generated from).

## What it is
A Vision Mamba (the same `svp.models.vim.VisionMamba` code as Vim-Tiny/Small, "midclstok"
layout) sized for CPUs: {a['img_size']}x{a['img_size']} input, patch {a['patch_size']}, stride {a['stride']}
({a['num_patches']} patch tokens + the middle class token), width {a['embed_dim']}, depth {a['depth']},
d_state {a['d_state']}, expand {a['expand']}; {card['params']:,} parameters including the
{a['num_classes']}-class source head. Model arguments: {json.dumps(kwargs) if kwargs else "the model's defaults"}.
Use (a new head of 10 classes; the source head is dropped):

```python
from svp.build import ModelSpec, build_model
model = build_model({spec})
```

or `svp train --model {card['model']} --checkpoint {card['file']}`{" with model.kwargs as above" if kwargs else ""}.

## Source task and data
{st['name']}: formula-driven images, no natural images and no task shared with the
evaluation tasks (see docs/mini_backbone.md for the reasons). Each class is an iterated
function system of 2-4 random contractive affine maps (seed {st['seed']}); an image is a
chaos-game render of a slightly perturbed copy, randomly rotated, mirrored, scaled, shifted
and coloured. Train split: {st['train']['per_class']} images per class; held-out split: a separate
random stream. Normalisation: mean {[round(v, 4) for v in card['normalisation']['mean']]}, std {[round(v, 4) for v in card['normalisation']['std']]}.

## Accuracy on the source task (held out)
| split | images | top-1 | chance |
|---|---:|---:|---:|
| heldout, {st['heldout']['per_class']} per class | {st['heldout']['per_class'] * st['num_classes']} | {100 * st['heldout']['accuracy']:.2f}% | {100 * st['chance']:.2f}% |
| a second held-out draw, {st['heldout_test_subset']['per_class']} per class | {st['heldout_test_subset']['per_class'] * st['num_classes']} | {100 * st['heldout_test_subset']['accuracy']:.2f}% | {100 * st['chance']:.2f}% |

Per epoch:

| epoch | step | train loss (EMA) | held-out top-1 |
|---:|---:|---:|---:|
{hist}

## Recipe
AdamW (weight decay {r['weight_decay']} on matrices only), lr {r['lr']} with {r['warmup_steps']} linear warm-up steps then
per-step cosine to {r['min_lr']}, batch {r['batch_size']}, {r['epochs']} epochs, label smoothing {r['label_smoothing']},
gradient clipping at norm 1, random horizontal mirror, {f"drop-path {drop}" if drop else "no drop-path"}.
{_card_segments(card)}; torch {card['torch']}.

Command (`MODEL_CARD.md` is generated from the JSON by `svp.pretrain.train.model_card_markdown`):

```
{card['command']}
```
"""


def _arch(model) -> dict:
    pe = model.patch_embed
    m = model.layers[0].mixer
    return {"img_size": pe.img_size[0], "patch_size": pe.patch_size[0], "stride": pe.stride[0],
            "embed_dim": model.embed_dim, "depth": len(model.layers), "d_state": m.d_state,
            "expand": m.d_inner // m.d_model, "num_patches": pe.num_patches,
            "num_classes": model.num_classes}


def register(subparsers):
    p = subparsers.add_parser(
        "pretrain", help="pre-train a (mini) Vim on procedural IFS fractal categories",
        description="Pre-train a Vim on formula-driven IFS fractal categories (FractalDB-style, no natural "
                    "images) and optionally export the weights + model card. Bit-identical for the same "
                    "--seed, --threads and scan backend on one machine (a --resume on other threads "
                    "continues with other sums: said, and recorded in the card).")
    p.add_argument("--out", required=True, type=user_path, help="run folder (checkpoints, summary.json, log)")
    p.add_argument("--model", default=DEFAULTS["model"], help="registered timm model name (default %(default)s)")
    for k in ("num_classes", "per_class", "heldout_per_class", "seed", "epochs", "batch_size", "warmup_steps",
              "ckpt_every", "threads"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=DEFAULTS[k], help=f"default {DEFAULTS[k]}")
    for k in ("lr", "min_lr", "weight_decay", "label_smoothing"):
        p.add_argument("--" + k.replace("_", "-"), type=float, default=DEFAULTS[k], help=f"default {DEFAULTS[k]}")
    p.add_argument("--model-kwargs", type=_json_dict, default={}, metavar="JSON",
                   help='extra timm.create_model arguments, e.g. \'{"depth": 2}\' (default none)')
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors if present")
    p.add_argument("--export", default=None, metavar="FILE.safetensors", type=user_path,
                   help="write the final weights here (a .safetensors file) plus a JSON model card beside it "
                        "(the same name, .json) and MODEL_CARD.md in its folder")
    p.set_defaults(func=_main)


def _main(args) -> int:
    args.command_line = "svp pretrain " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 1 and sys.argv[1] == "pretrain" else None
    for k, least in (("num_classes", 2), ("per_class", 1), ("heldout_per_class", 1), ("epochs", 1),
                     ("batch_size", 1), ("ckpt_every", 1), ("threads", 1), ("warmup_steps", 0), ("seed", 0)):
        if getattr(args, k) < least:   # (--threads 0 ran on one thread, and recorded 0)
            error_line("pretrain", f"--{k.replace('_', '-')} must be >= {least}, got {getattr(args, k)}")
            return 2
    from ..compat import threads_problem
    problem = threads_problem(args.threads)
    if problem:
        error_line("pretrain", problem)
        return 2
    most = (2**63 - 1) // 1000 - args.epochs   # (the epochs' data order is seeded seed * 1000 + epoch)
    if args.seed > most:
        error_line("pretrain", f"--seed must be <= {most}, got {args.seed}")
        return 2
    need, have = _images_bytes(args), memory_bytes()
    if have and need > have // 2:   # (--num-classes 10**9: minutes of drawing categories, then out of memory)
        error_line("pretrain", f"{args.num_classes} classes x ({args.per_class} + {args.heldout_per_class}) images "
                   f"are {need / 2**30:.3g} GiB in memory, more than half this machine's {have / 2**30:.3g} GiB; "
                   f"fewer --num-classes, --per-class or --heldout-per-class")
        return 2
    if args.per_class * args.num_classes < args.batch_size:
        error_line("pretrain", f"{args.per_class * args.num_classes} training images are fewer than one batch "
                   f"({args.batch_size})")
        return 2
    # (before any training: an --export folder failed after the whole run, a bad rate at its first step)
    problems = []
    # (inf trained, then stopped as a divergence advising a lower --lr: --weight-decay inf too)
    if not 0 < args.lr < float("inf"):
        problems.append(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0 <= args.min_lr < float("inf") or not 0 <= args.weight_decay < float("inf"):
        problems.append(f"--min-lr and --weight-decay must be finite numbers >= 0, got {args.min_lr}, "
                        f"{args.weight_decay}")
    if not 0 <= args.label_smoothing < 1:
        problems.append(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        problems.append(f"--out {args.out}: a file, expected a folder")
    if os.path.isdir(args.out) and not any(
            os.path.exists(os.path.join(args.out, f)) for f in RUN_FILES):
        other = sorted(f for f in os.listdir(args.out) if not f.startswith("."))   # (.gitkeep, .DS_Store)
        if other:   # (another tool's folder, or notes: the run's files were mixed in: review 60)
            problems.append(f"--out {args.out} holds other files ({', '.join(other[:3])}"
                            f"{', ...' if len(other) > 3 else ''}); give a new or empty folder")
    problem = _model_problem(args)
    if problem:
        problems.append(problem)
    if args.export and os.path.isdir(args.export):
        problems.append(f"--export {args.export}: a folder, expected a .safetensors file to write")
    elif args.export:
        problem = _export_problem(args)
        if problem:
            problems.append(problem)
    if problems:
        error_line("pretrain", "; ".join(problems))
        return 2
    from ..engine.runlock import RunLock
    lock = RunLock(args.out, "pretrain.lock", what="pretrain folder",
                   advice="a folder belongs to one `svp pretrain` at a time (wait for it to end, or use another --out)")
    try:
        _mk(args.out)
        lock.acquire("pretrain")   # (three processes wrote one folder, its log and checkpoint, at once)
    except OSError as e:
        error_line("pretrain", f"--out {args.out}: cannot write ({e.strerror or e})")
        return 2
    except ResumeError as e:
        error_line("pretrain", e)
        return 2
    try:
        return _locked_main(args)
    finally:
        lock.release()


def _locked_main(args) -> int:
    ckpt = os.path.join(args.out, "checkpoint.safetensors")
    if not args.resume and os.path.isfile(ckpt):   # (a fresh run overwrote another's checkpoint and summary)
        error_line("pretrain", f"--out {args.out} holds a pretraining run ({ckpt}); --resume continues it, another "
                   f"--out starts a new one")
        return 2
    try:
        # (the folder made before the lock; UTF-8 whatever the locale: a C locale's ASCII failed on
        # a non-ASCII --out in every line, and every --resume with it)
        logf = open(os.path.join(args.out, "pretrain.log"), "a", encoding="utf-8", errors="surrogateescape")
        # temporaries of writes a kill cut off (a checkpoint-sized file each)
        remove_dead_writers_temps(args.out)
    except OSError as e:
        error_line("pretrain", f"--out {args.out}: cannot write ({e.strerror or e})")
        return 2

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print_or_drop(line, flush=True)   # (`svp pretrain | head`: the run goes on)
        try:
            logf.write(line + "\n")
            logf.flush()
        except OSError:   # a full disk: the line is printed; the error comes from the next checkpoint
            pass

    try:
        pretrain(args, log)
    except Interrupted as e:
        log(str(e))
        error_line("pretrain", e)
        return 130
    except Diverged as e:
        log(str(e))
        error_line("pretrain", e)
        return 3
    except OSError as e:   # a full or read-only disk: one line (the last checkpoint is whole)
        then = ("--resume continues from the last checkpoint once it can" if os.path.isfile(ckpt) else
                "no checkpoint was written yet: the same command starts the run again once it can")
        error_line("pretrain", f"cannot write {e.filename or args.out} ({e.strerror or e}); {then}")
        return 2
    finally:
        try:
            logf.close()
        except OSError:
            pass
    return 0


def _images_bytes(args) -> int:
    """What the generated images take in memory: both splits are made whole, as uint8 RGB at the
    fractals' 32 px (fractals.generate_split), before the first step."""
    return args.num_classes * (args.per_class + args.heldout_per_class) * 32 * 32 * 3


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--model-kwargs: not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--model-kwargs: expected a JSON object, got {text!r}")
    return value


def _mk(d):
    os.makedirs(d, exist_ok=True)
    return d
