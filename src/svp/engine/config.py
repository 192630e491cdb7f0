"""Run configuration: defaults, YAML files, ``key=value`` overrides, validation.

A configuration is a two-level dict ``{section: {key: value}}``. It is resolved in
this order (later wins):

1. the defaults below (the official SVP recipe, docs/training.md),
2. the dataset preset ``svp.data.load_preset(<dataset>)`` (if the data package has one),
3. the user's ``--config`` YAML files, in order,
4. ``section.key=value`` overrides from the command line (values parsed as YAML).

The resolved configuration is written to ``<run>/config.yaml``; a run can be
reproduced with ``svp train --config <run>/config.yaml``.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple

import yaml


from ..errors import ConfigError, DatasetError  # noqa: F401 (ConfigError re-exported)
from ..compat import SEED_LIMIT
# the datasets' presets as partial configurations (a module of their own: the run's setup reads
# them too, and this module imports the setup's checks)
from .presets import PRESET_MAP, PRESET_METHOD_KEYS, dataset_preset  # noqa: F401 (re-exported)


# (dotted key, default, help). The order is the order of `svp train --help`.
SCHEMA: List[Tuple[str, Any, str]] = [
    # --- backbone
    ("model.name", "vim_small_patch16_224", "timm model name of the backbone (a Vim; timm's ViTs for the baselines)"),
    ("model.checkpoint", None, "backbone checkpoint loaded into it: an official Vim's (.pth or .safetensors), or a timm ViT's (those or Google's .npz)"),
    ("model.pretrained", False, "ask timm for the model's pretrained weights (may download from the hub); the bundled vim_mini_patch4_32 always gets its bundled weights unless model.checkpoint or model.random_init is set"),
    ("model.random_init", False, "a randomly initialised backbone (tests only); without it, a model other than the bundled mini Vim needs model.checkpoint or model.pretrained"),
    ("model.kwargs", {}, "extra keyword arguments for timm.create_model (e.g. img_size, depth, embed_dim)"),
    ("model.drop_path_rate", 0.1, "stochastic depth of the backbone; active in training only where the backbone trains in train mode (full, SVP, method.settings.backbone_train_mode=true); the other frozen backbones keep it off"),
    ("model.grad_checkpointing", False, "recompute each backbone block's forward in the backward instead of keeping its activations (VisionMamba.set_grad_checkpointing): less memory for full fine-tuning at large batches, about one more forward's time a step; the same gradients, bit for bit"),
    ("model.init_seed", None, "seed the model's random parts (a new linear head, a random backbone, parts missing from the checkpoint) are drawn under; null: train.seed, so each seed of a sweep starts from its own head. A two-layer head (method.settings.head=two_layer) is the method's: drawn afterwards from train.seed's stream, as the prompters are"),
    # --- method
    ("method.name", "svp", "PEFT method, one of svp.peft.list_methods(): the built-in svp, linear, full, vpt_shallow, vpt_deep, visual_prompt, bitfit, lora, adapter, and any registered with svp.peft.register_method"),
    ("method.init_from", None, "an adapter folder whose tensors start this run's adapter, the others as initialised (LP-FT: a linear probe's best/ as a full fine-tuning run's start, its head); each of its tensors must be one of this run's adapter tensors, of the same shape, trained on the same backbone weights, its head on the same classes. Not read at --resume (the resume point holds the tensors)"),
    ("method.settings", {}, "method settings passed to svp.peft.make_config; a block named after a method (method.settings.svp.hidden=32) applies to that method only. Every method: head (linear, two_layer), simam, backbone_train_mode. svp: shared_layers, hidden, use_cross, use_inner, compat (paper; official: the official code's cross prompt, D1). vpt_shallow/vpt_deep: num_tokens, placement (prefix, middle, suffix). lora: r, alpha, targets. adapter: bottleneck, scale. bitfit: patch_embed. visual_prompt: pad, image_size. Meanings and defaults: docs/methods.md"),
    # --- data
    ("data.dataset", "digits", "dataset name from the registry (`svp data list` / svp.data.list_datasets())"),
    ("data.root", None, "data root for datasets stored on disk (embedded datasets need none)"),
    ("data.options", {}, "extra keyword arguments for svp.data.build_dataset"),
    ("data.img_size", 224, "input resolution"),
    ("data.recipe", "svp", "transform recipe: svp (DeiT-style augmentation, official), vtab (plain resize), plain"),
    ("data.normalize", "imagenet", "input mean/std: imagenet (ImageNet's for every backbone, VPT's protocol) or "
     "backbone (timm's pretrained_cfg for model.name: 0.5/0.5 for timm's augreg ViTs)"),
    ("data.train_split", "train", "split used for training"),
    ("data.val_split", "val", "split used for model selection (null: no selection, last epoch is used)"),
    ("data.test_split", "test", "split used for the reported test accuracy (null: no test)"),
    ("data.num_workers", 0, "data-loader worker processes per rank"),
    ("data.cache_images", "auto", "keep decoded images in memory after their first read where the recipe gives "
     "them the same pixels every epoch (vtab, plain without flips, every evaluation): auto (training and "
     "validation splits, and test with eval.test_every_epoch, within 2 GiB a process or an eighth of the "
     "memory shared by the node's processes), "
     "true (every such split), false; the tensors are the same bits either way (docs/training.md)"),
    ("data.max_train_samples", None, "use only the first N training samples (debugging / tests; on a split ordered by class they may be of one class: the log warns)"),
    ("data.max_eval_samples", None, "use only the first N val/test samples (debugging / tests)"),
    ("data.shots", None, "few-shot training: keep N images of each class of the training split (all of a class "
     "that has fewer), drawn under data.shots_seed; val and test splits unchanged; null: every image"),
    ("data.shots_seed", None, "seed of data.shots' draw; null: train.seed, so each seed of a sweep draws its own "
     "images (a seed's draws nest: its 4 images of a class are among its 8)"),
    # --- optimisation
    ("train.epochs", 100, "number of epochs"),
    ("train.batch_size", 96, "training batch size per process (global batch = batch_size x world size)"),
    ("train.eval_batch_size", 144, "evaluation batch size per process"),
    ("train.opt", "adamw", "optimizer name for timm.optim.create_optimizer_v2"),
    ("train.lr", 5e-3, "base learning rate (scaled by batch x world / lr_scale_base when lr_scale is true)"),
    ("train.lr_scale", True, "official scaling: lr_used = lr x batch_size x world_size / lr_scale_base"),
    ("train.lr_scale_base", 512, "denominator of the learning-rate scaling"),
    ("train.weight_decay", 1e-4, "AdamW weight decay; biases and 1-D tensors get none (timm grouping)"),
    ("train.opt_eps", 1e-8, "optimizer epsilon"),
    ("train.opt_betas", [0.9, 0.999], "AdamW betas"),
    ("train.opt_fused", "auto", "adam/adamw through torch's fused kernel, one pass over all tensors (auto: where "
     "torch has one for the device, e.g. CPU from torch 2.4; true: required; false: torch's per-tensor loop, "
     "the implementation svp used before)"),
    ("train.layer_decay", None, "layer-wise learning-rate decay d (timm's layer_decay, as BEiT and MAE fine-tune): the head trains at the schedule's rate, the last block at d times it, each block below at d times the one above, the stem (patch and position embeddings, class token) at d^(depth+1); for the tensors inside the backbone's blocks (full, bitfit, lora); a method's own tensors outside them (SVP's prompters, VPT's tokens) train at the full rate. null: one rate for all"),
    ("train.sched", "cosine", "schedule: cosine (timm CosineLRScheduler with warm-up), multistep (the rate times "
     "train.decay_rate after each of train.decay_epochs, with warm-up) or constant"),
    ("train.sched_step", "epoch", "epoch: step once per epoch like the official code; step: per optimizer step"),
    ("train.official_epoch_offset", True, "with sched_step=epoch, reproduce the official off-by-one (epochs 0 and 1 both at epoch 0's rate: warmup_lr, or lr without warm-up)"),
    ("train.warmup_epochs", 5, "linear warm-up epochs (cosine and multistep: sched=constant has none)"),
    ("train.warmup_lr", 1e-5, "learning rate at the start of the warm-up (cosine and multistep)"),
    ("train.min_lr", 1e-5, "floor of the cosine schedule (cosine only)"),
    ("train.decay_epochs", [], "sched=multistep: the epochs after which the rate is multiplied by train.decay_rate "
     "(PyTorch MultiStepLR's milestones: [30, 60] runs epochs 31-60 at decay_rate x the rate, 61 on at its square; "
     "with the official epoch offset each change comes an epoch later, as the cosine's does)"),
    ("train.decay_rate", 0.1, "sched=multistep: the factor applied at each of train.decay_epochs"),
    ("train.clip_grad", None, "clip the global gradient norm to this value (null: off, official)"),
    ("train.micro_batch", None, "forward and backward over near-equal chunks of at most this many images per "
     "process, the gradients accumulated for the batch's one optimizer step (null, or the batch or more: the "
     "whole batch at once, official): the same update up to rounding, less activation memory (Vim-Small, batch 96, chunks of 32 "
     "on the CPU: 40% of the peak memory, the same step time once the heap has grown; docs/training.md). Drop "
     "path draws its masks per chunk, so a run's bits differ from the whole batch's"),
    ("train.smoothing", 0.1, "label smoothing"),
    ("train.mixup", 0.8, "mixup alpha (0: off)"),
    ("train.cutmix", 1.0, "cutmix alpha (0: off)"),
    ("train.mixup_prob", 1.0, "probability of applying mixup or cutmix to a batch"),
    ("train.mixup_switch_prob", 0.5, "probability of cutmix instead of mixup when both are on"),
    ("train.mixup_mode", "batch", "timm mixup mode: batch, pair or elem"),
    ("train.amp", False, "mixed precision: bfloat16 autocast on CUDA and CPU (the scan and the SSM parameters "
                         "stay float32; docs/training.md)"),
    ("train.amp_dtype", "bfloat16", "autocast dtype: bfloat16 or float16 (CUDA only, with a GradScaler)"),
    ("train.amp_cpu", True, "train.amp on the CPU too (false: CUDA only, svp's behaviour before 2026-12-01, "
                            "which runs started then keep when resumed)"),
    ("train.ema", False, "keep an exponential moving average of the trainable weights (timm ModelEmaV3)"),
    ("train.ema_decay", 0.99996, "EMA decay"),
    ("train.ema_eval", False, "evaluate and save the EMA weights instead of the raw weights"),
    ("train.seed", 0, "seed: data order and augmentation are a pure function of (seed, epoch, sample)"),
    ("train.deterministic", False, "deterministic algorithms (torch.use_deterministic_algorithms)"),
    ("train.device", "auto", "auto, cpu, cuda or cuda:N"),
    ("train.finite_check", "auto", "when the divergence guard looks for inf/NaN in the gradients, weights and "
                                   "optimizer state: step (around every optimizer step, undoing the step that broke "
                                   "them; a host sync per step), interval (every run.log_every steps and before every "
                                   "save; no host sync per step; a divergence puts back the state of the last check) "
                                   "or auto (interval on one CUDA device, step elsewhere)"),
    ("train.ddp_find_unused", False, "DistributedDataParallel find_unused_parameters"),
    ("train.max_steps", None, "stop training after this many optimizer steps in total (debugging)"),
    # --- evaluation
    ("eval.every", 1, "evaluate on the validation split every N epochs (and always after the last)"),
    ("eval.metric", "top1", "selection metric on the validation split: top1 or loss"),
    ("eval.test_every_epoch", False, "also evaluate the test split after every epoch (report_best_test turns it on)"),
    ("eval.report_best_test", False, "also report the official protocol's best test top-1 over epochs (selects on test; labelled)"),
    # --- run folder
    ("run.output", "runs", "parent folder of run folders"),
    ("run.name", None, "run folder name (default: <dataset>-<method>-s<seed>-<date>-<time>-<6 hex>, unique)"),
    ("run.save_every_steps", 0, "also write a resume point every N steps inside an epoch (0: only at epoch ends)"),
    ("run.tensorboard", False, "write TensorBoard scalars to <run>/tb (needs the tensorboard package)"),
    ("run.wandb", False, "log the same scalars and the configuration to a Weights & Biases run named after the run "
                         "folder, its files in <run>/wandb; a resume continues it (needs the wandb package; "
                         "WANDB_MODE=offline logs without a network, `wandb sync` uploads later)"),
    ("run.wandb_project", None, "the wandb project (default: $WANDB_PROJECT, else svp); the entity and the rest "
                                "from wandb's own variables (WANDB_ENTITY, ...)"),
    ("run.progress", "auto", "progress display: auto (bars on a terminal, lines otherwise), bar, lines, none"),
    ("run.log_every", 10, "plain progress line every N steps when not on a terminal"),
    ("run.changes", [], "written by `svp train --resume`: each change of train.lr/epochs/max_steps with the "
                        "global step from which it took effect (a record, not a setting)"),
    # --- fault injection for tests
    ("debug.nan_at_step", None, "make the loss NaN at this global step (tests the non-finite-loss stop)"),
    ("debug.kill_at_step", None, "SIGKILL the process right after this global step (tests resume)"),
    ("debug.stop_at_step", None, "save a resume point and exit with code 75 after this global step"),
]

SECTIONS = ("model", "method", "data", "train", "eval", "run", "debug")
_DEFAULTS = {k: v for k, v, _ in SCHEMA}
# keys whose value is a free-form mapping (not validated further)
MAPPING_KEYS = {"model.kwargs", "method.settings", "data.options"}


# keys whose values are text (names, paths, choices) and run.changes (svp's record): strings there
# are kept as written, whatever they look like
_TEXTUAL = frozenset([k for k, v, _ in SCHEMA if isinstance(v, str)]
                     + ["model.checkpoint", "method.init_from", "data.root", "run.name", "run.changes",
                        "run.wandb_project"])


def defaults() -> Dict[str, Dict[str, Any]]:
    cfg: Dict[str, Dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value, _ in SCHEMA:
        sec, name = key.split(".", 1)
        cfg[sec][name] = copy.deepcopy(value)
    return cfg


_SCI = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class BadValueError(ConfigError):
    """A command-line value YAML cannot take as written; its caller names the override."""


class RepeatedKeyError(BadValueError):
    """A value written as a mapping with a key twice (`{hidden: 8, hidden: 16}`)."""


def parse_value(text: str, numbers: bool = True) -> Any:
    """A command-line value as YAML (``1e-3`` -> float, ``null`` -> None, ``[1,2]`` -> list,
    ``'"nan"'`` -> the string ``nan``). ``numbers=False``: ``1e5`` stays the text it is (a
    text key's value: run.name=1e5 is a name, not 100000.0)."""
    if numbers and _SCI.match(text.strip()):  # YAML 1.1 reads 1e-3 (no dot) as a string
        return float(text)
    if _LONE_SURROGATE.search(text):
        # an argument Python decoded as ASCII (a C locale without UTF-8 mode) holds its other bytes as
        # lone surrogates, which YAML refuses: "['café']" became one string. Read as the UTF-8 text it
        # is, its strings given back in the form Python keeps file names in (paths still reach their bytes)
        try:
            utf8 = os.fsencode(text).decode("utf-8")
        except UnicodeError:
            utf8 = None
        if utf8 is not None:
            return _map_strings(parse_value(utf8, numbers), lambda v: os.fsdecode(v.encode("utf-8")))
    try:
        return safe_load(text)
    except _RepeatedKey as e:   # (a mistake, not text: a ConfigError its caller names the value of)
        raise RepeatedKeyError(e.problem) from None
    except (yaml.YAMLError, ValueError):
        # ValueError: what YAML reads as a number or a date but Python cannot make one of (an
        # integer past 4,300 digits, 2024-13-45: a traceback): the text it is, as a name is
        return text
    except RecursionError:
        raise BadValueError("nested too deeply (hundreds of levels)") from None


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _map_strings(value: Any, fn) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    return value


# what YAML does not read as itself inside a double-quoted string (its reader refuses it raw)
_NOT_YAML_PRINTABLE = re.compile("[^\x09\x0A\x0D\x20-\x7E\x85\xA0-\uD7FF\uE000-\uFFFD\U00010000-\U0010FFFF]")


def quoted(value: str) -> str:
    """``value`` as an override's text that :func:`parse_value` reads back as the same string.
    JSON's escapes of a character outside the BMP are a surrogate pair, which YAML read as two
    lone surrogates (`--output 'out🙂'`: a traceback making the folder): such characters are
    written as themselves, and what YAML cannot read raw (a lone surrogate, from a name Python
    could not decode) as an escape."""
    return _NOT_YAML_PRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, ensure_ascii=False))


def _check_key(key: str, source: str) -> Tuple[str, str]:
    if "." not in key:
        raise ConfigError(f"{source}: key {key!r} must be 'section.name' with section in {', '.join(SECTIONS)}")
    sec, name = key.split(".", 1)
    top = f"{sec}.{name.split('.', 1)[0]}"
    if top not in _DEFAULTS:
        close = [k for k in _DEFAULTS if k.split(".")[-1] == name.split(".")[0]]
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{source}: unknown configuration key {key!r}{hint}; "
                          f"`svp train --help` lists every key")
    if name != top.split(".", 1)[1] and top not in MAPPING_KEYS:
        raise ConfigError(f"{source}: {top!r} is not a mapping, cannot set {key!r}")
    return sec, name


def _method_names() -> set:
    import svp.peft as peft
    return set(peft.list_methods())


def _drop_shadowed(settings: dict, names: Iterable[str]) -> None:
    """A generic ``method.settings.<name>`` from a later source wins over the same name in a
    method's block from an earlier one (the block applies to its method only, and beat the
    generic key whatever its source: a command-line ``method.settings.shared_layers=3`` was
    ignored, silently, under the mini suite's ``svp: {shared_layers: 4}``)."""
    methods = _method_names()
    for name in names:
        if name in methods:
            continue
        for block, body in settings.items():
            if block in methods and isinstance(body, dict):
                body.pop(name, None)


def _yaml12_numbers(value: Any) -> Any:
    """``value`` with strings that YAML 1.2 reads as floats (1e-3) made floats (see _FLOAT_12)."""
    if isinstance(value, str) and _FLOAT_12.match(value):
        return float(value)
    if isinstance(value, list):
        return [_yaml12_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _yaml12_numbers(v) for k, v in value.items()}
    return value


def _read_value(key: str, value: Any) -> Any:
    return value if key in _TEXTUAL else _yaml12_numbers(value)


def set_key(cfg: dict, key: str, value: Any, source: str = "override") -> None:
    sec, name = _check_key(key, source)
    parts = name.split(".")
    value = _read_value(f"{sec}.{parts[0]}", value)
    if isinstance(value, dict) and f"{sec}.{parts[0]}" in MAPPING_KEYS:
        # a mapping merges key by key, as a config file's does: 'method.settings={svp: {hidden: 8}}'
        # replaced the whole of method.settings, silently dropping the suite's and the preset's
        # blocks (LoRA trained at its default rank: QA 16a)
        for p in reversed(parts[1:]):
            value = {p: value}
        merge(cfg, {sec: {parts[0]: value}}, source)
        return
    if key.startswith("method.settings.") and len(parts) == 2 and isinstance(cfg[sec].get("settings"), dict):
        _drop_shadowed(cfg[sec]["settings"], parts[1:])
    node = cfg[sec]
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def get_key(cfg: dict, key: str) -> Any:
    sec, name = key.split(".", 1)
    return cfg[sec][name]


def merge(cfg: dict, partial: dict, source: str) -> dict:
    """Merge a (possibly partial) two-level config into ``cfg`` in place, validating keys."""
    if partial is None:
        return cfg
    if not isinstance(partial, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(partial).__name__}")
    for sec, body in partial.items():
        if sec not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {sec!r}; expected one of {', '.join(SECTIONS)}")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section {sec!r} must be a mapping, got {body!r}")
        for name, value in body.items():
            key = f"{sec}.{name}"
            _check_key(key, source)
            value = _read_value(key, value)
            if key in MAPPING_KEYS:
                if value is None:
                    value = {}
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
                # merged key by key, nested blocks too (a later file's method.settings.svp: {hidden: 8}
                # replaced the whole svp block of an earlier file or the suite's base)
                into = copy.deepcopy(dict(cfg[sec].get(name) or {}))
                if key == "method.settings":   # before this source's own blocks are merged
                    _drop_shadowed(into, value)
                cfg[sec][name] = _merge_mapping(into, value)
            else:
                cfg[sec][name] = copy.deepcopy(value)
    return cfg


def _merge_mapping(into: dict, value: dict) -> dict:
    for k, v in value.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            into[k] = _merge_mapping(dict(into[k]), v)
        else:
            into[k] = copy.deepcopy(v)
    return into


MAX_YAML_NODES = 1_000_000   # a configuration spelled out, aliases (*name) expanded


class _RepeatedKey(yaml.constructor.ConstructorError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document whose aliases expand it past MAX_YAML_NODES: a
    2 KB config.yaml of nested aliases (a "billion laughs") loads as shared objects, and the
    first walk of it (the resume digest's json.dumps) spelled out billions of strings until
    memory ran out."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _refuse_repeated_keys(node, set())
            n = _expanded_size(node, {})
            if n > MAX_YAML_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"its aliases (*name) expand it past {MAX_YAML_NODES:,} values; refused (a "
                                f"configuration file is far smaller)", node.start_mark)
        return node


# YAML 1.2's floats without a dot (1e-3): PyYAML reads YAML 1.1, where they are strings, so `lr: 1e-3`
# in a config file (and 1e-3 in a JSON one) was refused as "expected a number" (QA 16a). The reader
# stays YAML 1.1 (a config.yaml an older svp wrote holds `name: 1e5` unquoted, a run's name: a
# YAML 1.2 reader made it a number, and the run could not resume); merge() and set_key() read
# such strings as numbers where a key is not text (_yaml12_numbers). The writer quotes them, so
# that YAML 1.2 readers (other tools) read svp's files as svp does.
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


def _refuse_repeated_keys(node, seen: set) -> None:
    """A key written twice in one mapping (`train: {lr: 0.01, lr: 0.02}`) took the last value,
    silently; YAML requires keys to be unique (QA 16a). Checked before construction, where a
    merge key (<<: *base) has not yet added keys of its own."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in lines:
                    raise _RepeatedKey(
                        None, None, f"the key {key.value!r} is given twice in one mapping (first on line "
                                    f"{lines[key.tag, key.value]}); keep one", key.start_mark)
                lines[key.tag, key.value] = key.start_mark.line + 1
            _refuse_repeated_keys(key, seen)
            _refuse_repeated_keys(value, seen)
    elif isinstance(node, yaml.SequenceNode):
        for child in node.value:
            _refuse_repeated_keys(child, seen)


def _expanded_size(node, memo: dict) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1   # (a recursive alias counts once)
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(c, memo) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[key] = min(size, MAX_YAML_NODES + 1)
    return memo[key]


def safe_load(stream) -> Any:
    """``yaml.safe_load`` bounded in what its aliases expand to (see _BoundedLoader)."""
    return yaml.load(stream, Loader=_BoundedLoader)   # noqa: S506 (a SafeLoader subclass)


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):   # a value written twice is written out twice, not as *id001
        return True


_NoAliasDumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789"))


def yaml_error_line(e: yaml.YAMLError) -> str:
    """A YAML error on one line, with where it is: PyYAML's own text spans several (the file's
    line quoted under a caret), which broke svp's one-line errors."""
    if not isinstance(e, yaml.MarkedYAMLError):
        return " ".join(str(e).split())
    said = "; ".join(p for p in (e.context, e.problem) if p) or type(e).__name__
    mark = e.problem_mark or e.context_mark
    return said + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else "")


# what a pipe given as -c held, by the pipe (device, inode): it can be read once, and svp sweep
# resolves its configuration once per run (every run after the first trained without it, silently)
_PIPES: Dict[Tuple[int, int], Any] = {}


def load_yaml(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.isdir(path):
        raise ConfigError(f"{path}: a folder, expected a YAML config file")
    # (a pipe is read as the file it stands for: -c <(...) was "not found")
    st = os.stat(path)
    pipe = None if os.path.isfile(path) else (st.st_dev, st.st_ino)
    if pipe in _PIPES:
        return copy.deepcopy(_PIPES[pipe])
    data = _read_yaml(path)
    if pipe is not None:
        _PIPES[pipe] = copy.deepcopy(data)
    return data


def _read_yaml(path: str) -> dict:
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {yaml_error_line(e)}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
        except ValueError as e:   # a number or a date Python cannot make (a traceback)
            raise ConfigError(f"{path}: a value YAML reads as a number or a date cannot be one ({e}); quote it "
                              f"if it is text") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply (hundreds of levels)") from None
    return data or {}


def _brief_item(item: str) -> str:
    """An override as an error quotes it: a deep or long one cut (it was quoted whole)."""
    return repr(item) if len(item) <= 200 else repr(item[:120]) + f" ... ({len(item)} characters)"


def parse_overrides(items: Iterable[str]) -> List[Tuple[str, Any]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-3)")
        key, text = item.split("=", 1)
        key = key.strip()
        sec, name = _check_key(key, f"override {item!r}")
        try:
            out.append((key, parse_value(text, numbers=f"{sec}.{name.split('.')[0]}" not in _TEXTUAL)))
        except BadValueError as e:
            raise ConfigError(f"override {_brief_item(item)}: {e}") from None
    return out


def resolve(config_files: Iterable[str] = (), overrides: Iterable[str] = (), base: Optional[dict] = None,
            use_presets: bool = True, check_blocks: bool = True, base_source: Optional[str] = None) -> dict:
    """Defaults <- dataset preset <- config files <- overrides (the command line's method blocks
    after its generic settings). A complete ``base`` (every key of every section, e.g. what
    ``resolve`` returned) already holds its presets: they are not merged again (their mappings
    would add keys). ``check_blocks=False``: other methods' blocks are not checked, nor the
    model.kwargs keys svp sets (a run's own configuration, at --resume). ``base_source`` names
    ``base`` in errors, as a config file is named (a run folder's config.yaml)."""
    if base and is_complete(base):
        use_presets = False
    user: List[Tuple[str, dict]] = [(p, load_yaml(p)) for p in config_files or []]
    parsed = parse_overrides(overrides)
    # the command line is one source: its method blocks after its generic settings, so a block wins
    # over the same generic name whatever their order (as in one file; the last given won: review)
    methods = _method_names()
    generic, blocks = [], []
    for k, v in parsed:
        parts = k.split(".")
        if parts[:2] == ["method", "settings"] and len(parts) >= 3 and parts[2] in methods:
            blocks.append((k, v))
        elif k == "method.settings" and isinstance(v, dict):
            # a whole mapping: its method blocks go with the blocks (a later generic key dropped them)
            own = {n: b for n, b in v.items() if n in methods and isinstance(b, dict)}
            rest = {n: b for n, b in v.items() if n not in own}
            if rest or not own:
                generic.append((k, rest))
            if own:
                blocks.append((k, own))
        else:
            generic.append((k, v))
    parsed = generic + blocks
    # which method/dataset? (needed to pick the preset first)
    def apply_user(target: dict) -> dict:
        if base:
            merge(target, base, base_source or "config dict")
        for src, part in user:
            merge(target, part, src)
        for k, v in parsed:
            set_key(target, k, v)
        return target

    probe = apply_user(defaults())
    for src, part in user:
        # a run's config.yaml holds every key, its dataset's preset values among them: given with
        # another --dataset, that dataset's preset never applied, silently (review 66)
        theirs = part.get("data", {}).get("dataset") if is_complete(part) else None
        if use_presets and theirs is not None and theirs != probe["data"]["dataset"]:
            logging.getLogger("svp.engine.config").warning(
                "%s is a whole configuration, resolved for dataset %s (its lr, seed, method settings, ...): "
                "dataset %s's preset does not apply under it; to start from that preset, give a file with "
                "only the keys you mean to keep", src, theirs, probe["data"]["dataset"])
    cfg = defaults()
    if use_presets:
        merge(cfg, dataset_preset(str(probe["data"]["dataset"]), str(probe["method"]["name"])),
              f"preset of dataset {probe['data']['dataset']!r}")
    apply_user(cfg)
    try:
        validate(cfg)
        if check_blocks:
            check_model_kwargs_keys(cfg)
    except ConfigError as e:
        # (a bad value in a run folder's config.yaml was said without the file: retest 59)
        src = _source_of(str(e), ([(base_source, base)] if base_source else []) + user, parsed)
        if src is None:
            raise
        raise ConfigError(f"{src}: {e}") from None
    from .setup import check_other_blocks, method_config
    try:   # the method's name and settings (types, ranges; the model's own checks come when it is built)
        method_config(cfg, None)
        if check_blocks:
            check_other_blocks(cfg)
    except ConfigError as e:
        files = [src for src, part in user if isinstance(part, dict) and isinstance(part.get("method"), dict)
                 and part["method"].get("settings")]
        if not files:
            raise
        raise ConfigError(f"{e} (method.settings from {', '.join(files)})") from None
    return cfg


def _source_of(message: str, user: List[Tuple[str, dict]], parsed: List[Tuple[str, Any]]) -> Optional[str]:
    """The config file that set the key a validation message starts with, when the last value
    came from one (validation runs on the merged config, so a wrong type from a -c file was
    reported without the file)."""
    m = re.match(r"([a-z_]+)\.([a-z_]+)\b", message)
    if not m or any(k.split(".")[:2] == [m.group(1), m.group(2)] for k, _ in parsed):
        return None   # an override names its key itself
    for src, part in reversed(user):
        body = part.get(m.group(1)) if isinstance(part, dict) else None
        if isinstance(body, dict) and m.group(2) in body:
            return src
    return None


def is_complete(config: dict) -> bool:
    return isinstance(config, dict) and all(
        isinstance(config.get(s), dict) and set(d) <= set(config[s]) for s, d in defaults().items())


_CHOICES = {
    "train.sched": ("cosine", "multistep", "constant"),
    "train.sched_step": ("epoch", "step"),
    "train.mixup_mode": ("batch", "pair", "elem"),
    "train.amp_dtype": ("bfloat16", "float16"),
    "train.finite_check": ("auto", "step", "interval"),
    "eval.metric": ("top1", "loss"),
    "run.progress": ("auto", "bar", "lines", "none"),
    "data.recipe": ("svp", "vtab", "plain"),
    "data.normalize": ("imagenet", "backbone"),
}
_BOOL = tuple(key for key, default, _ in SCHEMA if isinstance(default, bool))
_POSITIVE_INT = ("train.epochs", "train.batch_size", "train.eval_batch_size", "eval.every", "run.log_every")
_NONNEG_NUM = ("train.lr", "train.weight_decay", "train.warmup_lr", "train.min_lr", "train.smoothing",
               "train.mixup", "train.cutmix", "train.mixup_prob", "train.mixup_switch_prob",
               "train.warmup_epochs", "model.drop_path_rate")
# names, paths and split names: text (null, a number or an empty string crashed where they were used)
_TEXT = ("model.name", "method.name", "data.dataset", "data.train_split", "train.opt", "train.device", "run.output")
_TEXT_OR_NULL = ("model.checkpoint", "method.init_from", "data.root", "data.val_split", "data.test_split",
                 "run.wandb_project")
_PATHS = ("run.output", "model.checkpoint", "method.init_from", "data.root")


def path_value(key: str, value: Any) -> Any:
    """``value`` as svp keeps it for ``key``: a path setting's leading ``~`` is the home folder
    (`run.output=~/runs` reaches svp unexpanded: the shell expands ~ at a word's start only)."""
    if key in _PATHS and isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    return value


def absolute_paths(cfg: dict) -> dict:
    """A new run keeps ``model.checkpoint`` and ``data.root`` as absolute paths (relative to the
    working folder it starts in): a relative --checkpoint was kept as given, and the run's
    --resume, printed as an absolute command, failed from any other folder ("file not found"),
    with no way to say where the file is (model.checkpoint cannot change at --resume)."""
    for key in ("model.checkpoint", "method.init_from", "data.root"):
        v = get_key(cfg, key)
        if isinstance(v, str) and v.strip() and not os.path.isabs(v):
            set_key(cfg, key, os.path.abspath(v))
    return cfg


_INF = float("inf")


def _is_num(v, integer: bool = False) -> bool:
    """A YAML number (bools are ints in Python, and never a size or a rate here), an integer one
    within a machine word (train.lr=1 followed by 400 zeros passed, and overflowed where it became
    a float; eval_batch_size=10**30 where it became a slice)."""
    return (isinstance(v, int if integer else (int, float)) and not isinstance(v, bool)
            and (not isinstance(v, int) or abs(v) <= sys.maxsize))


def validate(cfg: dict) -> None:
    for key, choices in _CHOICES.items():
        v = get_key(cfg, key)
        if v not in choices:
            raise ConfigError(f"{key}={v!r} is not one of {', '.join(map(str, choices))}")
    for key in _POSITIVE_INT:
        v = get_key(cfg, key)
        if not _is_num(v, integer=True) or v < 1:
            raise ConfigError(f"{key}={v!r}: expected a positive integer")
    for key in _NONNEG_NUM:
        v = get_key(cfg, key)
        # `not v >= 0` also refuses nan; inf would only surface as a divergence at the first step
        if not (_is_num(v) and 0 <= v < _INF):
            raise ConfigError(f"{key}={v!r}: expected a non-negative (finite) number")
    for key in _TEXT + _TEXT_OR_NULL:
        v = get_key(cfg, key)
        if isinstance(v, os.PathLike):   # from Python: a pathlib.Path is a path
            v = os.fspath(v)
            set_key(cfg, key, v)
        expanded = path_value(key, v)
        if expanded is not v:
            v = expanded
            set_key(cfg, key, v)
        if (v is not None or key in _TEXT) and (not isinstance(v, str) or not v.strip()):
            # (a number given on the command line is YAML's number: run.wandb_project=2024 was refused
            # without saying how to give it as text: retest 97)
            quote = f"; give a number as text in quotes ({key}=\"'{v}'\")" if _is_num(v) else ""
            raise ConfigError(f"{key}={v!r}: expected a non-empty string" + (" or null" if key in _TEXT_OR_NULL else "")
                              + quote)
        if isinstance(v, str) and "\0" in v:   # (a ValueError traceback where it became a path)
            raise ConfigError(f"{key}={v!r}: holds a NUL character")
    from .progress import wandb_project_problem
    problem = wandb_project_problem(cfg["run"].get("wandb_project"))
    if problem:
        raise ConfigError(f"run.wandb_project={cfg['run']['wandb_project']!r}: {problem}")
    for key in ("data.num_workers", "run.save_every_steps"):   # 0.5 was truncated to 0 (no mid-epoch saves)
        v = get_key(cfg, key)
        if not (_is_num(v, integer=True) and v >= 0):
            raise ConfigError(f"{key}={v!r}: expected a non-negative integer")
    # counts: a fraction was truncated where it was used (max_train_samples=0.5 kept no sample)
    for key in ("train.micro_batch", "train.max_steps", "data.max_train_samples", "data.max_eval_samples",
                "data.shots", "debug.nan_at_step", "debug.kill_at_step", "debug.stop_at_step"):
        v = get_key(cfg, key)
        if v is not None and not (_is_num(v, integer=True) and v >= 1):
            raise ConfigError(f"{key}={v!r}: expected null or a positive integer")
    decay = cfg["train"]["layer_decay"]
    if decay is not None and not (_is_num(decay) and 0 < decay <= 1):
        raise ConfigError(f"train.layer_decay={decay!r}: expected null or a number in (0, 1] (each block's rate is "
                          f"the one above it times this)")
    clip = cfg["train"]["clip_grad"]
    if clip is not None and not (_is_num(clip) and 0 < clip < _INF):
        raise ConfigError(f"train.clip_grad={clip!r}: expected null or a positive (finite) number")
    for key in _BOOL:
        v = get_key(cfg, key)
        if not isinstance(v, bool):
            raise ConfigError(f"{key}={v!r}: expected true or false")
    for key in MAPPING_KEYS:
        if not isinstance(get_key(cfg, key), dict):
            raise ConfigError(f"{key} must be a mapping, got {get_key(cfg, key)!r}")
    for key, top, closed in (("train.smoothing", 1, False), ("train.mixup_prob", 1, True),
                             ("train.mixup_switch_prob", 1, True), ("model.drop_path_rate", 1, False)):
        v = get_key(cfg, key)
        if v > top or (v == top and not closed):
            raise ConfigError(f"{key}={v!r}: expected a number in [0, {top}{']' if closed else ')'}")
    img = cfg["data"]["img_size"]
    if not _is_num(img, integer=True) or img < 1:
        raise ConfigError(f"data.img_size={img!r}: expected a positive integer (pixels)")
    if not isinstance(cfg["run"].get("changes", []), list):
        raise ConfigError(f"run.changes={cfg['run']['changes']!r}: expected a list (it is written by "
                          f"`svp train --resume`)")
    fused = cfg["train"]["opt_fused"]
    if not (fused == "auto" or isinstance(fused, bool)):
        raise ConfigError(f"train.opt_fused={fused!r} is not one of auto, true, false")
    kept = cfg["data"]["cache_images"]
    if not (kept == "auto" or isinstance(kept, bool)):
        raise ConfigError(f"data.cache_images={kept!r} is not one of auto, true, false")
    betas = cfg["train"]["opt_betas"]
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2
            and all(_is_num(b) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"train.opt_betas={betas!r}: expected two numbers in [0, 1), e.g. [0.9, 0.999]")
    for key in ("train.seed", "model.init_seed", "data.shots_seed"):
        v = get_key(cfg, key)
        if (v is not None or key == "train.seed") and (not _is_num(v, integer=True) or not 0 <= v < SEED_LIMIT):
            raise ConfigError(f"{key}={v!r}: expected a non-negative integer below 2**32 ({SEED_LIMIT})"
                              + (" or null" if key != "train.seed" else ""))
    eps = cfg["train"]["opt_eps"]
    if not (_is_num(eps) and 0 < eps < _INF):
        raise ConfigError(f"train.opt_eps={eps!r}: expected a small positive number, e.g. 1e-8")
    base = cfg["train"]["lr_scale_base"]
    if not (_is_num(base) and 0 < base < _INF):
        raise ConfigError(f"train.lr_scale_base={base!r}: expected a positive number (the batch size the "
                          f"learning rate is given for, e.g. 512)")
    t = cfg["train"]
    if t["lr_scale"] and not math.isfinite(t["lr"] * t["batch_size"] / base):   # (1e-320: "lr used inf")
        raise ConfigError(f"train.lr_scale_base={base!r}: the rate it scales train.lr={t['lr']!r} to "
                          f"(lr x batch_size / lr_scale_base) is not a finite number")
    name = cfg["run"]["name"]
    if name is not None:
        norm = os.path.normpath(str(name))
        # ('.' was run.output itself: the run's files among the other runs' folders; a Windows drive,
        # 'D:elsewhere', is not absolute there but joins to another drive)
        if (not isinstance(name, str) or not name.strip() or os.path.isabs(norm) or norm.split(os.sep)[0] == ".."
                or norm == "." or os.path.splitdrive(norm)[0] or "\0" in name):
            raise ConfigError(f"run.name={name!r}: expected a folder name inside run.output (sub-folders "
                              f"allowed, not an absolute path, run.output itself ('.') or one that leaves "
                              f"run.output through '..')")
    ema = cfg["train"]["ema_decay"]
    if not (_is_num(ema) and 0 < ema < 1):
        raise ConfigError(f"train.ema_decay={ema!r}: expected a number in (0, 1), e.g. 0.99996")
    if cfg["train"]["ema_eval"] and not cfg["train"]["ema"]:  # it would evaluate the plain weights, silently
        raise ConfigError("train.ema_eval=true needs train.ema=true (the EMA weights it evaluates)")
    val, test = cfg["data"]["val_split"], cfg["data"]["test_split"]
    shared = splits_shared(val, test, cfg["data"]["dataset"])
    if shared:   # an epoch (or svp sweep --tune's choice) selected on test, unsaid
        what = "is also data.test_split" if val == test else (
            f"and data.test_split={test!r} both read images of split {shared[0]!r}")
        raise ConfigError(f"data.val_split={val!r} {what}: the epoch kept, and a --tune choice, "
                          f"would be selected on test images; select on a validation split (or none: "
                          f"data.val_split=null), and eval.report_best_test=true reports the official "
                          f"protocol's best test epoch, labelled as such")
    if cfg["eval"]["report_best_test"] and cfg["data"]["test_split"] is None:   # it was ignored, silently
        raise ConfigError("eval.report_best_test=true needs a test split (data.test_split is null)")
    if cfg["train"]["decay_epochs"] is None:   # (null: none, as the default's [])
        cfg["train"]["decay_epochs"] = []
    milestones, rate = cfg["train"]["decay_epochs"], cfg["train"]["decay_rate"]
    if not (isinstance(milestones, (list, tuple)) and all(_is_num(m, integer=True) and m >= 1 for m in milestones)
            and list(milestones) == sorted(set(milestones))):
        raise ConfigError(f"train.decay_epochs={milestones!r}: expected a list of increasing positive whole epochs, "
                          f"e.g. [30, 60]")
    if not (_is_num(rate) and 0 < rate <= 1):
        raise ConfigError(f"train.decay_rate={rate!r}: expected a number in (0, 1], e.g. 0.1")
    if cfg["train"]["sched"] == "multistep" and not milestones:
        raise ConfigError("train.sched=multistep needs train.decay_epochs (the epochs after which the rate is "
                          "multiplied by train.decay_rate, e.g. [30, 60]); train.sched=constant keeps one rate")
    warm = cfg["train"]["warmup_epochs"]
    if cfg["train"]["sched_step"] == "epoch" and float(warm) != int(warm):
        # the rate changes once an epoch: 0.5 was rounded to no warm-up, 1.5 and 2.5 both to 2
        raise ConfigError(f"train.warmup_epochs={warm!r} with train.sched_step=epoch: the rate changes once an "
                          f"epoch, so warm-up is a whole number of epochs; train.sched_step=step takes fractions")
    t = cfg["train"]
    if (float(t["mixup"]) > 0 or float(t["cutmix"]) > 0) and int(t["batch_size"]) % 2:
        # (timm's Mixup asserts it at the first step; found when the run was built, a sweep had
        # started every run before each failed)
        raise ConfigError(f"train.mixup / train.cutmix need an even train.batch_size (timm's Mixup mixes "
                          f"pairs of images), got {t['batch_size']}; or set train.mixup=0 train.cutmix=0")
    if cfg["eval"]["report_best_test"] and not cfg["eval"]["test_every_epoch"]:
        cfg["eval"]["test_every_epoch"] = True  # the official number needs test every epoch


def splits_shared(a, b, dataset=None) -> list:
    """The splits two split expressions of ``dataset`` both read (``svp.data.split_holds``):
    ``val_split='test[:64]'`` beside ``test_split='test'`` (review 62), and VTAB's ``val`` beside
    ``val200`` (retest 64), selected on test images with nothing said."""
    if not isinstance(a, str) or not isinstance(b, str):
        return []
    from svp.data import split_holds
    theirs = split_holds(dataset, b)
    return [p for p in split_holds(dataset, a) if p in theirs]


def check_model_kwargs_keys(cfg: dict) -> None:
    """model.kwargs keys svp sets itself are refused in a new run (svp overwrote them, silently:
    review); not at --resume (``resolve(check_blocks=False)``): a run an older svp started with
    one resumes as it ran, its config.yaml unchanged (the resume point is bound to it)."""
    for key, use in (("drop_path_rate", "model.drop_path_rate"), ("num_classes", "the dataset's class count")):
        if key in (cfg["model"]["kwargs"] or {}):
            raise ConfigError(f"model.kwargs.{key}: set by svp from {use}; remove it from model.kwargs"
                              + (" and set model.drop_path_rate" if key == "drop_path_rate" else ""))


def dump(cfg: dict) -> str:
    return yaml.dump(cfg, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=None)
