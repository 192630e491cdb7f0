"""Hyper-parameter selection on the validation split (``svp sweep --tune``).

For one (dataset, method): every point of a grid (``--tune train.lr=1e-3,1e-2``; several
keys form their product, in the order given) is trained on the training split with the
first requested seed and scored as its run selected its epoch (``eval.metric``): by the
validation top-1 of the selected epoch (``val_selected.val_top1``, the best over the evaluated
epochs), or with ``eval.metric=loss`` by its validation loss, lower better (until 2026-12-06
top-1 whatever the metric). The point with the best score wins; a tie goes to the point
that comes first in grid order (list the value you would rather keep first, e.g. the
smaller learning rate). Test accuracy is never read before
the choice is made. The chosen point is then run with every requested seed:

- ``protocol="val"`` (default): trained on the training split, exactly as the grid run,
  so the grid run of the first seed *is* its final run (reused, not retrained);
- ``protocol="refit"`` (``--tune-refit``, the VTAB-1k convention): retrained on
  training + validation split (``train[:N]+val[:M]`` when the budget caps them), no
  validation split, the last epoch reported.

Folders: ``<output>/<dataset>/<method>/grid/<point>/seed<k>`` (grid and, for ``val``,
final runs) and ``<output>/<dataset>/<method>/refit/<point>/seed<k>``. A finished run
(``results.json``) is reused and an interrupted one resumed, so a tuning sweep can be
interrupted and restarted at will, as long as the run folder's ``config.yaml`` matches the
configuration the sweep asks for now (:func:`check_same_config`; a folder made with another
one is refused, not reused); ``tuning.json`` in the output folder records every grid score
and choice.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import checkpoint as ck
from . import config as C
from . import resume_overrides as RO

log = logging.getLogger("svp.engine.sweep")

Point = Tuple[Tuple[str, str], ...]   # ((key, value text), ...) in grid order
# keys the sweep itself decides per run; tuning them would break the protocol
# (eval.metric: the grid points are scored by it, so every point must be scored alike)
FORBIDDEN = ("data.dataset", "method.name", "train.seed", "run.output", "run.name", "data.train_split",
             "data.val_split", "data.test_split", "eval.report_best_test", "eval.test_every_epoch", "eval.metric")
PROTOCOL_TITLES = {"val": "selected on the validation split, final runs trained on the training split",
                   "refit": "selected on the validation split, final runs retrained on training + validation "
                            "(VTAB-1k convention)"}


def _split_values(text: str) -> List[str]:
    """Comma-separated values; commas inside [...] or {...} belong to the value."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def _canon(text: str) -> str:
    """One spelling per value: 1, 1.0 and 1e0 are one number; others as sorted JSON."""
    v = C.parse_value(text)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            return repr(float(v))
        except OverflowError:   # an integer past float's range: itself (validation refuses it as a value)
            return repr(v)
    return json.dumps(v, sort_keys=True)


def parse_tune(items: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """``["train.lr=1e-3,1e-2", ...]`` -> ``[("train.lr", ["1e-3", "1e-2"]), ...]``."""
    spec: List[Tuple[str, List[str]]] = []
    for item in items:
        if "=" not in item:
            raise C.ConfigError(f"--tune {item!r}: expected section.key=v1,v2,... (e.g. train.lr=1e-3,1e-2)")
        key, text = item.split("=", 1)
        key = key.strip()
        C._check_key(key, f"--tune {item!r}")
        if key in FORBIDDEN:
            raise C.ConfigError(f"--tune {item!r}: {key} is set by the sweep itself and cannot be tuned")
        if any(k == key for k, _ in spec):
            raise C.ConfigError(f"--tune: key {key} given twice; give all its values in one --tune")
        values = _split_values(text)
        if not all(values):
            raise C.ConfigError(f"--tune {item!r}: empty value in the list")
        try:
            parsed = [_canon(v) for v in values]
        except C.BadValueError as e:   # (a traceback: QA review)
            raise C.ConfigError(f"--tune {item!r}: {e}") from None
        if len(set(parsed)) != len(parsed):
            raise C.ConfigError(f"--tune {item!r}: a value is listed twice")
        spec.append((key, values))
    return spec


def grid_points(spec: List[Tuple[str, List[str]]]) -> List[Point]:
    """The grid's points in order: the product of the lists, the first key slowest."""
    keys = [k for k, _ in spec]
    return [tuple(zip(keys, combo)) for combo in itertools.product(*[v for _, v in spec])]


def point_overrides(point: Point) -> List[str]:
    return [f"{k}={v}" for k, v in point]


def point_label(point: Point) -> str:
    return ", ".join(f"{k}={v}" for k, v in point)


def _folder_value(text: str) -> str:
    """A value as a folder name writes it: ``_canon``'s spelling, a whole number without its
    ``.0`` (``hidden=4``, not ``hidden=4.0``; 4, 4.0 and 4e0 are one value either way)."""
    v = C.parse_value(text)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e15 and float(v).is_integer():
        return str(int(v))
    return _canon(text)


def point_slug(point: Point, legacy: bool = False) -> str:
    """A folder name for a point; values are normalised (1e-2, 0.01 and 1.0e-2 share a
    folder), and a short hash keeps sanitised names apart. ``legacy``: the name before
    2026-12-05, whole numbers as ``4.0`` (point_dir still finds such folders)."""
    raw = ",".join(f"{k}={_canon(v) if legacy else _folder_value(v)}" for k, v in point)
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", raw)
    if safe != raw or len(safe) > 100:
        # (surrogatepass: an undecodable path as a value)
        safe = safe[:80] + "-" + hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return safe


def point_dir(parent: str, point: Point) -> str:
    """``parent/<point_slug>``, or the folder an earlier sweep made under the old name of the
    point (``hidden=4.0``) when only that one exists: a restarted sweep reuses its runs."""
    new = os.path.join(parent, point_slug(point))
    old = os.path.join(parent, point_slug(point, legacy=True))
    return old if old != new and os.path.isdir(old) and not os.path.exists(new) else new


def choose(scores: Sequence[Optional[float]]) -> Optional[int]:
    """Index of the best validation score; ties go to the first; None (failed) never wins."""
    from .select import improves   # the epoch selection's rule: strictly better wins
    best = None
    for i, s in enumerate(scores):
        if improves(s, best):
            best = {"score": s, "index": i}
    return None if best is None else best["index"]


def scored_by(metric: str) -> str:
    """What the grid runs are scored by under the sweep's ``eval.metric``."""
    return "val_loss" if metric == "loss" else "val_top1"


def _selected_val_loss(res: dict) -> Optional[float]:
    """The selected epoch's validation loss: results.json's (written since 2026-12-06), else the
    run's metrics.jsonl at that epoch (a grid run an older svp finished; scored by top-1 it
    beat every point scored by the loss: review)."""
    sel = res.get("val_selected") or {}
    if sel.get("val_loss") is not None:
        return float(sel["val_loss"])
    try:
        with open(os.path.join(res["run_dir"], "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("epoch") == sel.get("epoch") and rec.get("val_loss") is not None:
                    return float(rec["val_loss"])
    except (OSError, KeyError, TypeError, ValueError):
        pass
    return None


def val_score(res: Optional[dict], metric: str = "top1") -> Optional[float]:
    """Higher is better: the selected epoch's validation top-1, or (``metric`` loss) its loss
    negated; None where the run failed or its result lacks the number."""
    if not res:
        return None
    if metric == "loss":
        v = _selected_val_loss(res)
        return None if v is None else -v
    v = (res.get("val_selected") or {}).get("val_top1")
    return float(v) if v is not None else None


def refit_split(cfg: dict) -> str:
    """The training set of a refit: training + validation split, each cut as the grid
    runs saw it (``max_train_samples`` on train, ``max_eval_samples`` on val)."""
    d = cfg["data"]
    tr = d["train_split"] + (f"[:{int(d['max_train_samples'])}]" if d["max_train_samples"] else "")
    va = d["val_split"] + (f"[:{int(d['max_eval_samples'])}]" if d["max_eval_samples"] else "")
    return f"{tr}+{va}"


def selection_splits(dataset: str, cfg: dict) -> Tuple[str, str]:
    """(training split, validation split) of the grid: the configuration's own validation split
    with its training split; else the dataset's selection pair, its training part in place of the
    official training split (VTAB-1k: train800 / val200, where the presets train on
    train800val200, which holds val200: scored on its own training images and refit on val200
    twice); a training split the user chose stays; else a validation split carved by val_from_train, whose remainder
    the configured training split returns."""
    d = cfg["data"]
    if d["val_split"]:
        return str(d["train_split"]), str(d["val_split"])
    import svp.data as data
    info = data.dataset_info(dataset)
    if (d["options"] or {}).get("val_from_train"):
        # asked for: a validation split carved out of the configured training split, whose
        # remainder that split then returns (first: with VTAB-1k's own pair the grid trained on
        # train800, which the carve does not touch, and was scored on images of it, review)
        return str(d["train_split"]), "val"
    if info.selection_splits.get("val"):
        train = d["train_split"]
        if train == info.default_splits.get("train") and info.selection_splits.get("train"):
            train = info.selection_splits["train"]  # the official training split: its selection part
        return str(train), "val"
    raise C.ConfigError(f"--tune needs a validation split and {info.name} has none: carve one out of the "
                        f"training split with data.options.val_from_train=0.1 (or set data.val_split)")


# where a run lives and the record of its resumes: the folder itself is the run's identity
# (the same folder may be reached through another --output spelling)
# (and where its scalars go: a finished run logged to another wandb project is the same run; an
# interrupted one resumes into its own)
_PLACE_KEYS = ("run.output", "run.name", "run.changes", "run.wandb_project")
_UNSET = object()


def _free(key: str) -> bool:
    """May ``key`` differ between a run folder and the configuration a sweep asks for now?
    Where the run lives, its resume record, and whatever ``svp train --resume`` may change
    without changing what is learned (how the run is watched and saved, where the data
    lives, the device, ``debug.*``: engine/resume_overrides.py). Not ``train.lr`` /
    ``train.epochs`` / ``train.max_steps``: ``--resume`` accepts them, but the run would then
    be two schedules glued together, or one cut short, not the run the sweep asks for."""
    return key in _PLACE_KEYS or (RO.accepted(key) and key not in RO.TRAINING_KEYS)


def _flatten(cfg: dict) -> Dict[str, Any]:
    """``{dotted key: value}``; the free-form mappings (method.settings, data.options,
    model.kwargs) down to their leaves, so a difference names the leaf. Blocks of
    method.settings named after another method are left out: they do not apply to this
    run (engine/setup.py build_method), and a sweep over several methods shares them."""
    import svp.peft as peft
    known = set(peft.list_methods())
    method = cfg.get("method", {}).get("name")
    out: Dict[str, Any] = {}

    def walk(prefix: str, v: Any, mapping: bool) -> None:
        if mapping and isinstance(v, dict):
            for k, sub in v.items():
                if prefix == "method.settings" and k in known and k != method and isinstance(sub, dict):
                    continue
                walk(f"{prefix}.{k}", sub, True)
        else:
            out[prefix] = v

    for sec, body in cfg.items():
        for name, v in (body or {}).items():
            if f"{sec}.{name}" == "method.settings" and isinstance(v, dict) and isinstance(v.get(method), dict):
                # the settings the run gets (its method's block over the shared keys, as
                # setup.method_config reads them): one setting spelled in the block in one
                # configuration and flat in the other differed (review 74)
                v = {**{k: sub for k, sub in v.items() if k != method}, **v[method]}
            walk(f"{sec}.{name}", v, f"{sec}.{name}" in C.MAPPING_KEYS)
    return out


def _same(a: Any, b: Any) -> bool:
    # YAML round trips keep types, except that 1 and 1.0 are one number; True == 1 is not one value
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _show(v: Any) -> str:
    return "(unset)" if v is _UNSET else json.dumps(v, default=str)


def config_differences(saved: dict, cfg: dict) -> Dict[str, str]:
    """``{key: "old -> new"}`` for every key that is not :func:`_free` and differs between a
    run folder's configuration ``saved`` and ``cfg``. A training key changed by an earlier
    ``svp train --resume`` (``run.changes``) differs unless every value it ran with is ``cfg``'s."""
    old, new = _flatten(saved), _flatten(cfg)
    for flat in (old, new):   # the seed the head was drawn under: null means train.seed
        if flat.get("model.init_seed", _UNSET) is None:
            flat["model.init_seed"] = flat.get("train.seed")
        # the weights' source a run used: a checkpoint sets pretrained and random_init aside, and
        # timm's weights random_init (setup.model_spec warns of them as not used). A sweep made
        # with --checkpoint before the suite's pretrained was dropped under one recorded
        # pretrained: true, and every run of it was refused after the upgrade (retest 84)
        if flat.get("model.checkpoint"):
            flat["model.pretrained"] = flat["model.random_init"] = False
        elif flat.get("model.pretrained"):
            flat["model.random_init"] = False
    out: Dict[str, str] = {}
    for key in list(old) + [k for k in new if k not in old]:
        if _free(key):
            continue
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if not _same(a, b):
            out[key] = f"{_show(a)} -> {_show(b)}"
    history: Dict[str, List[Tuple[str, Any]]] = {}
    for ch in (saved.get("run") or {}).get("changes") or []:
        for key, pair in ((ch or {}).get("changes") or {}).items():
            if isinstance(pair, (list, tuple)) and len(pair) == 2 and not _free(key):
                vals = history.setdefault(key, [("start", pair[0])])
                vals.append((f"step {ch.get('step')}", pair[1]))
    for key, vals in history.items():
        b = new.get(key, _UNSET)
        if not all(_same(v, b) for _, v in vals):
            used = ", then ".join(f"{_show(v)} (from {at})" for at, v in vals)
            out[key] = f"{used} -> {_show(b)}"
    return out


def check_same_config(run_dir: str, cfg: dict, finished: bool) -> List[str]:
    """Refuse (:class:`ConfigError`) to reuse or resume the run in ``run_dir`` when its
    ``config.yaml`` differs from ``cfg``, the configuration the sweep would run there now,
    in anything but the keys :func:`_free` lists. Returns the overrides that carry ``cfg``'s
    values of the keys ``svp train --resume`` accepts into a resume of the run (so a
    restarted sweep resumes on its own device, progress display, stop step, ...)."""
    from .rundir import load_run_config

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise C.ConfigError(f"run folder {run_dir} holds {'results.json' if finished else ck.RESUME_FILE} but no "
                            f"config.yaml, so the sweep cannot tell which configuration made it and does not "
                            f"take it over; use another --output, or delete the folder to train it again")
    # the saved configuration as the engine's resume reads it (keys added since the run
    # started filled in with the behaviour it had; debug.* reset)
    saved = load_run_config(run_dir)
    diff = config_differences(saved, cfg)
    # keys an older svp had not (its config.yaml lacks them): the run did what that svp did, which
    # load_run_config pins (train.opt_fused=false, ...); where the sweep leaves the key at its
    # default, that is the same run asked for, not another configuration (every run of a sweep
    # from before 2026-12-05 was refused after an upgrade: review 74)
    try:
        written = _flatten(C.load_yaml(path))
    except Exception:   # noqa: BLE001  (load_run_config read it above; a key-less file pins nothing)
        written = {}
    default, now, then = _flatten(C.defaults()), _flatten(cfg), _flatten(saved)
    # a frozen-backbone mode left unset means the method's own default (svp: train mode), which an
    # older official-compat run pinned as true: the same run (retest 77)
    mode = "method.settings.backbone_train_mode"
    if mode in diff:
        import svp.peft as peft
        try:
            own = bool(getattr(peft.get_method(cfg["method"]["name"])[1], "default_backbone_train_mode", False))
        except (ValueError, KeyError, TypeError):
            own = None
        pick = [v if v not in (_UNSET, None) else own for v in (then.get(mode, _UNSET), now.get(mode, _UNSET))]
        if own is not None and _same(*pick):
            diff.pop(mode)
    # (backbone_train_mode turns DropPath on or off: the same run only without drop path)
    no_drop = not then.get("model.drop_path_rate")
    older = {k: diff.pop(k) for k in list(diff)
             if k in _PINNED_NUMERICS and k not in written and (no_drop or not k.endswith("backbone_train_mode"))
             and _same(now.get(k, _UNSET), default.get(k, _UNSET))}
    if diff:
        raise C.ConfigError(
            f"run folder {run_dir} holds {'a finished' if finished else 'an interrupted'} run made with another "
            f"configuration than this sweep's (run folder -> sweep: "
            f"{'; '.join(f'{k}: {v}' for k, v in diff.items())}), so it "
            f"is not {'reused' if finished else 'resumed'}; use another --output for the new configuration, "
            f"or delete the folder to train it again")
    if older:   # (said once the run is taken over, not before a refusal: retest 75)
        log.info("run folder %s was made by an older svp, without the key(s) %s: %s with the behaviour it had "
                 "(%s)", run_dir, ", ".join(older), "reused" if finished else "resumed",
                 "; ".join(f"{k}: {v}" for k, v in older.items()))
    return [f"{k}={_show(v)}" for k, v in now.items()
            if RO.accepted(k) and k not in older and not _same(then.get(k, _UNSET), v)]


# Keys an older svp lacked whose pinned value (rundir._pin_old_behaviour) changes how a step is
# computed, the run's data and model the same: the fused optimizer step (rounding), amp on the CPU
# (nothing without train.amp), SVP's frozen-backbone mode (DropPath on or off: allowed only at drop
# path 0, the mini suite's). Not model.random_init: a random backbone is another run than the
# bundled weights (retest 75).
_PINNED_NUMERICS = frozenset({"train.opt_fused", "train.amp_cpu", "method.settings.backbone_train_mode"})


# (model, checkpoint file's identity, sizes) -> the base weights' hash, so that a sweep
# reusing many finished runs of one backbone builds it once
_BASE_HASHES: Dict[Tuple, str] = {}


def recorded_init_weights(run_dir: str) -> Optional[str]:
    """What the run in ``run_dir`` recorded of the adapter its ``method.init_from`` started it
    from (``init_from_weights`` in its resume point, else in last/ or best/ backbone.json:
    :func:`svp.engine.setup.adapter_digest`), or None (no such run, a run from before 2026-12-07,
    or an unreadable record). (A run interrupted before its first epoch's end has no adapter
    folder yet: its resume point was not read, and it was resumed from an old start: retest 94.)"""
    got = ck.saved_value(os.path.join(run_dir, ck.RESUME_FILE), "init_from_weights")
    if isinstance(got, str) and got:
        return got
    for sub in ("last", "best"):
        try:
            with open(os.path.join(run_dir, sub, "backbone.json"), encoding="utf-8") as f:
                got = json.load(f).get("init_from_weights")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(got, str) and got:
            return got
    return None


def check_same_init(run_dir: str, cfg: dict, finished: bool) -> None:
    """Refuse (:class:`ConfigError`) to reuse or resume the run in ``run_dir`` when the adapter
    folder its ``method.init_from`` names now holds other tensors than the run started from: the
    configuration names the folder, not its contents, and an LP-FT sweep run again after its linear
    probes were retrained reused full fine-tuning runs started from the old probes (retest 89). A
    run without the record (older, or no adapter saved yet) or a folder no longer readable is not
    compared."""
    from .setup import adapter_digest

    source = cfg["method"].get("init_from")
    recorded = recorded_init_weights(run_dir) if source else None
    if not recorded:
        return
    now = adapter_digest(source)
    if now is not None and now != recorded:
        raise C.ConfigError(
            f"run folder {run_dir} holds {'a finished' if finished else 'an interrupted'} run started from the "
            f"adapter in {source} (method.init_from) when that folder held other tensors ({recorded}; now "
            f"{now}), so it is not {'reused' if finished else 'resumed'}; use another --output, or delete the "
            f"folder to train it again from the adapter there now")


def check_same_backbone(run_dir: str) -> None:
    """Refuse (:class:`ConfigError`) to reuse the finished run in ``run_dir`` when the backbone
    checkpoint at its recorded path now holds other weights than its adapters were trained on
    (``base_model_hash`` in ``last/adapter_config.json``). The configuration names the file, not
    its contents: a checkpoint replaced at the same path left the sweep's table mixing runs on
    two backbones. An interrupted run's resume point is checked by ``svp train --resume``;
    hub weights (model.pretrained) and random backbones are not rebuilt here, and a checkpoint
    no longer there cannot be compared (the run is reused)."""
    from ..build import read_backbone_spec
    from ..peft.io import base_weights_hash, read_adapter_config

    last = os.path.join(run_dir, "last")
    try:
        recorded = read_adapter_config(last)["base_model_hash"]
        spec = read_backbone_spec(os.path.join(last, "backbone.json"))
    except (OSError, ValueError, AttributeError):   # no last/ (an older layout): nothing to compare
        return
    if not recorded or spec.weights not in ("checkpoint", "bundled"):
        return
    if spec.weights == "checkpoint":
        try:
            st = os.stat(spec.checkpoint)
        except OSError:
            return
        ident: Tuple = (spec.checkpoint, st.st_size, st.st_mtime_ns, st.st_ino)
    else:
        ident = ("bundled",)
    key = (spec.model, ident, json.dumps(spec.kwargs, sort_keys=True, default=str), spec.img_size)
    if key not in _BASE_HASHES:
        from ..build import build_backbone
        _BASE_HASHES[key] = base_weights_hash(build_backbone(spec, skip_init=True))
    now = _BASE_HASHES[key]
    if now != recorded:
        where = f"the checkpoint {spec.checkpoint}" if spec.checkpoint else f"the bundled {spec.model}"
        raise C.ConfigError(
            f"run folder {run_dir} holds a finished run trained on backbone weights {recorded}, but "
            f"{where} now holds weights {now} (replaced since the run?), so it is not reused: its results "
            f"would sit in one table with runs on another backbone; use another --output for the new "
            f"checkpoint, or delete the folder to train it again")


def load_or_resume(run_dir: str, cfg: dict, resume: bool = True) -> Optional[Dict[str, Any]]:
    """The results of a finished run (status ``reused``), of an interrupted one after
    resuming it (``resumed``, only with ``resume``), or None when the run has not started.
    ``cfg``: the configuration the sweep would run in ``run_dir``; a run made with
    another one raises :class:`ConfigError` (:func:`check_same_config`)."""
    from .loop import train

    from .runlock import describe_holder, holder
    info = holder(run_dir)
    if info is not None:   # (it was "an interrupted run made with another configuration": review 71)
        raise C.ConfigError(f"run folder {run_dir} is in use by {describe_holder(info)} (an `svp train` of its "
                            f"own, or another sweep's run), so this sweep does not take it over; let it end, "
                            f"or use another --output")
    done = os.path.join(run_dir, "results.json")
    if os.path.isfile(done):
        check_same_config(run_dir, cfg, finished=True)
        check_same_init(run_dir, cfg, finished=True)
        check_same_backbone(run_dir)
        with open(done) as f:
            res = json.load(f)
        res["status"] = "reused"
        return res
    if resume and os.path.isfile(os.path.join(run_dir, ck.RESUME_FILE)):
        overrides = check_same_config(run_dir, cfg, finished=False)
        check_same_init(run_dir, cfg, finished=False)
        res = train(resume=run_dir, overrides=overrides)
        res["status"] = "resumed"
        return res
    return None


class StoppedAfterRuns(KeyboardInterrupt):
    """A stop a :class:`Runner` held until its caller's block had ended: every run had finished,
    and what the block did with them (a sweep's tables) is done."""


class Runner:
    """Runs (or reuses / resumes) training runs, one at a time or ``jobs`` at a time
    in spawned worker processes (each run's threads as the environment sets them).
    The worker pool lives until :meth:`close` (use as a context manager).

    With ``jobs`` > 1 its stop request (:class:`~svp.engine.signals.StopRequest`) takes
    SIGINT/SIGTERM from its first :meth:`run_all` until :meth:`close`, not only while its workers
    train (a run it trains in this process has its own handlers meanwhile): what the caller does with the
    results inside the ``with`` block (a sweep writes its tables) is not cut short by a first
    signal, which Python's handler, back after the last run, turned into a KeyboardInterrupt there
    (the tables lost), or SIGTERM's default into the process's death. Leaving the block with no
    exception raises the stop then (KeyboardInterrupt), the tables written."""

    def __init__(self, jobs: int = 1):
        self.jobs = max(1, int(jobs))
        self._pool = None
        self._retire = None   # the pool's: set once it broke, so that its idle workers exit (_watch_parent)
        self._stop = None
        self._stop_request = None
        self._training = False   # whether workers are running runs (what a first signal's warning says)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        if exc_type is None and self._stop is not None and self._stop.value:
            import signal
            name = signal.Signals(self._stop.value).name
            raise StoppedAfterRuns(f"{name} received after the last run had finished")

    def close(self) -> None:
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
        finally:
            if self._stop_request is not None:
                self._stop_request.restore()
                self._stop_request = None

    def _on_first_signal(self, name: str) -> None:
        if self._training:
            log.warning("%s received: the running runs stop after their step and write their resume points; the "
                        "sweep exits when they have", name)
        else:
            log.warning("%s received: no run is training now; the sweep starts no other", name)

    def run_all(self, tasks: List[Tuple[str, Callable[[], dict]]]) -> List[Tuple[Optional[dict], str]]:
        """tasks: (run_dir, make_config). Returns (results or None, error text) per task."""
        if self.jobs > 1 and self._stop is None:
            # from the first call on, whatever it trains: a rerun with one run left to train (or
            # none) trains it in this process, and its tables went unprotected (review48)
            import multiprocessing as mp

            from .signals import StopRequest
            # the workers' stop request: a signal sent to this process alone does not reach them
            self._stop = mp.get_context("spawn").RawValue("i", 0)
            self._stop_request = StopRequest(self._stop, on_first=self._on_first_signal).install()
        self._check_stop(" between runs: no run was training, and none was started after it")
        out: List[Optional[Tuple[Optional[dict], str]]] = [None] * len(tasks)
        todo = []
        for i, (run_dir, make_cfg) in enumerate(tasks):
            try:
                cfg = make_cfg()
                res = load_or_resume(run_dir, cfg, resume=False)
            except Exception as e:  # a bad configuration, or a run folder made with another one,
                # fails its runs, not the sweep
                log.error("run %s failed: %s: %s", run_dir, type(e).__name__, e)
                out[i] = (None, f"{type(e).__name__}: {e}")
                continue
            if res is not None:
                out[i] = (res, "")
            else:
                todo.append((i, run_dir, cfg))
        if todo:
            failed = sum(o is not None and o[0] is None for o in out)  # refused folders, bad configurations
            log.info("%d run(s) to train, %d reused%s", len(todo), len(tasks) - len(todo) - failed,
                     f", {failed} failed before training" if failed else "")
        if self.jobs == 1 or len(todo) <= 1:
            for i, run_dir, cfg in todo:
                self._check_stop(" between runs: no run was training, and none was started after it")
                out[i] = _run_safely(run_dir, cfg)
        else:
            import concurrent.futures as cf
            import multiprocessing as mp
            ctx = mp.get_context("spawn")
            if self._pool is None:
                self._retire = ctx.RawValue("b", 0)
                self._pool = cf.ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx, initializer=_worker_init,
                                                    initargs=(self._stop, os.getpid(), self._retire))
            # each run's name within the sweep begins its stderr lines (svp.engine.progress.worker_label)
            root = os.path.commonpath([os.path.abspath(d) for _, d, _ in todo])
            label = {i: os.path.relpath(os.path.abspath(run_dir), root) for i, run_dir, _ in todo}
            broken, stopped = [], []
            self._training = True
            try:
                self._check_stop()
                # the workers start (at submit) with SIGINT/SIGTERM blocked, then ignored until a
                # run's own handler is in (_worker_init): a terminal's Ctrl-C reaches the whole
                # group, and a worker still importing torch, or idle between runs, died with a
                # traceback, which the sweep then took for the out-of-memory killer's work (review42)
                from .signals import starting_workers
                with starting_workers():
                    futs = {self._pool.submit(_run_safely, run_dir, cfg, label[i]): i for i, run_dir, cfg in todo}
                for k, f in enumerate(cf.as_completed(futs), 1):
                    i = futs[f]
                    try:
                        out[i] = f.result()
                    except cf.process.BrokenProcessPool:
                        broken.append(i)
                        continue
                    except KeyboardInterrupt as e:
                        # every running run stops after its step: wait for them all, and say which
                        # stopped where (the first one's step alone was reported, as the sweep's)
                        stopped.append((label[i], str(e)))
                        continue
                    if out[i][0] is None:
                        log.info("[%d/%d] failed %s", k, len(todo), tasks[i][0])
                    else:
                        log.info("[%d/%d] finished %s", k, len(todo), tasks[i][0])
                if broken:
                    # Python >= 3.12 ends a broken pool's other workers by SIGTERM alone, which an idle
                    # worker ignores, and its shutdown (here or at close) then waited for them for
                    # ever: they exit themselves once this is set (_watch_parent)
                    self._retire.value = 1
                if broken and self._stop.value:   # a worker a stop request ended, not the out-of-memory killer
                    stopped += [(label[i], "not started: the sweep was stopped") for i in broken]
                if stopped:
                    raise KeyboardInterrupt(_stopped_summary(stopped, self._stop.value))
                if broken:
                    # a worker killed by a signal (the out-of-memory killer) broke the pool, which
                    # ended the others: each affected run again in a process of its own, so that
                    # the one that dies again fails alone (the sweep crashed with a traceback, its
                    # other runs stopped and no table written: review)
                    self._pool.shutdown(wait=True, cancel_futures=True)
                    self._pool = None
                    log.warning("a worker process died (killed by a signal: out of memory?), and the runs beside "
                                "it stopped with it: %d run(s) again, each in a process of its own", len(broken))
                    cfgs = {i: cfg for i, _, cfg in todo}
                    for i in sorted(broken):
                        self._check_stop()
                        out[i] = self._run_alone(tasks[i][0], cfgs[i], label[i], ctx)
            finally:
                self._training = False
            self._check_stop()  # every run finished before it could stop: start nothing more
        return [o if o is not None else (None, "not run") for o in out]

    def _run_alone(self, run_dir: str, cfg: dict, label: str, ctx) -> Tuple[Optional[dict], str]:
        """One run in a worker process of its own; its death fails this run only."""
        import concurrent.futures as cf
        with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_worker_init,
                                    initargs=(self._stop, os.getpid())) as pool:
            try:
                from .signals import starting_workers
                with starting_workers():
                    fut = pool.submit(_run_safely, run_dir, cfg, label)
                return fut.result()
            except cf.process.BrokenProcessPool:
                log.error("run %s failed: its worker process died (killed by a signal: out of memory?)", run_dir)
                return None, "its worker process died (killed by a signal: out of memory?)"

    def _check_stop(self, when: str = "") -> None:
        if self._stop is not None and self._stop.value:
            import signal
            raise KeyboardInterrupt(f"{signal.Signals(self._stop.value).name} received{when}")


def _stopped_summary(stopped: List[Tuple[str, str]], signum: int) -> str:
    """One line (no ';': the command line prints up to the first) for the runs a stop request
    ended: 'SIGINT received: 2 run(s) stopped (a/seed0 after step 131, b/seed0 after step 135),
    resume points saved, 3 not started'."""
    import re
    import signal
    name = signal.Signals(signum).name if signum else "stop request"
    ran = []
    for lab, msg in sorted(stopped):
        if not msg.startswith("not started"):
            m = re.search(r"stopped after ([^;.]+)", msg)
            ran.append(f"{lab} after {m.group(1)}" if m else f"{lab}: {msg.split(';')[0]}")
    parts = [f"{len(ran)} run(s) stopped ({', '.join(ran)}), resume points saved"] if ran else []
    if len(stopped) > len(ran):
        parts.append(f"{len(stopped) - len(ran)} not started")
    return f"{name} received: " + ", ".join(parts)


def _worker_init(stop_value, sweep_pid: int, retire=None) -> None:
    import signal

    from .signals import use_stop_value, worker_signals
    use_stop_value(stop_value)
    # the sweep's own handler stops the runs, through the stop value: a signal the whole group got
    # (a terminal's Ctrl-C) is not this worker's to act on, also one that came while it started
    # (blocked since: engine.signals.starting_workers)
    worker_signals(signal.SIG_IGN)
    # the sweep's pid as the sweep gave it: a worker that starts after a kill -9 of the sweep has
    # been adopted already, and took its new parent (init) for the sweep, watching it for ever
    _RETIRE[0] = retire
    _watch_parent(stop_value, sweep_pid)


_RUNS_IN_PROGRESS = [0]   # in a worker: runs of _run_safely not yet returned
_RETIRE = [None]          # in a worker: its pool's retire flag (set by the sweep once the pool broke)


def _watch_parent(stop_value, ppid: int, every_s: float = 1.0, grace_s: float = 600.0) -> None:
    """A worker whose sweep died (kill -9, the out-of-memory killer) trained on with its run
    folder locked, so the restarted sweep recorded that run as failed, and then waited for work
    forever (~1 GB each). Once its parent is gone it stops its run as a stop request would (after
    the step, resume point written) and exits; after ``grace_s`` it exits anyway (the operating
    system releases the run's lock). Gone: another parent pid (adopted), or the parent's sentinel
    says so (on Windows getppid goes on answering the dead parent's pid: review45).
    Once the sweep sets its pool's retire flag (``_RETIRE``: the pool broke, a worker killed by
    a signal), an idle worker exits. Python >= 3.12 ends a broken pool's other workers by SIGTERM
    alone (3.11 also queued them an end-of-work marker), which a worker between runs ignores, and
    the sweep then waited for them for ever (seen on Python 3.13)."""
    import multiprocessing
    import signal
    import threading
    import time

    parent = multiprocessing.parent_process()   # (None where this process was not started so)

    def watch():
        while os.getppid() == ppid and (parent is None or parent.is_alive()):
            if _RETIRE[0] is not None and _RETIRE[0].value and not _RUNS_IN_PROGRESS[0]:
                os._exit(0)
            time.sleep(every_s)
        stop_value.value = int(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _RUNS_IN_PROGRESS[0] and time.monotonic() < deadline:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watch, name="svp-sweep-parent-watch", daemon=True).start()


def stop_requested(e: BaseException) -> bool:
    """Was the run stopped by SIGINT/SIGTERM (resume point written)? Then the whole sweep
    stops, rather than recording the run as failed and starting the next one."""
    from .signals import EXIT_INTERRUPTED, TrainingStopped
    return isinstance(e, TrainingStopped) and e.code == EXIT_INTERRUPTED


def _run_safely(run_dir: str, cfg: dict, label: Optional[str] = None) -> Tuple[Optional[dict], str]:
    """One run; ``label``: in a worker of a parallel sweep, the run's name within the sweep."""
    from . import progress
    if _RETIRE[0] is not None and _RETIRE[0].value:   # a call the broken pool had queued already
        return None, "not started: the sweep's worker pool broke"
    _RUNS_IN_PROGRESS[0] += 1
    progress.worker_label = label
    try:
        return _run(run_dir, cfg)
    finally:
        _RUNS_IN_PROGRESS[0] -= 1
        progress.worker_label = None


def _run(run_dir: str, cfg: dict) -> Tuple[Optional[dict], str]:
    from .loop import train
    from .signals import stop_value_signal
    if stop_value_signal():  # the sweep was asked to stop before this run started
        raise KeyboardInterrupt(f"not started: the sweep was stopped ({run_dir})")
    try:
        res = load_or_resume(run_dir, cfg, resume=True)
        if res is None:
            res = train(cfg)
            res["status"] = "ok"
        return res, ""
    except Exception as e:  # recorded per run; the sweep goes on, unless the user stopped it
        if stop_requested(e):
            raise KeyboardInterrupt(str(e)) from None
        log.error("run %s failed: %s: %s", run_dir, type(e).__name__, e)
        return None, f"{type(e).__name__}: {e}"


def grid_tasks(points: List[Point], seed0: int, folder: str,
               make_config: Callable[[Point, int, str, bool], dict]) -> List[Tuple[str, Callable[[], dict]]]:
    """The grid runs of one (dataset, method): (run folder, config maker) per point."""
    dirs = [os.path.join(point_dir(os.path.join(folder, "grid"), p), f"seed{seed0}") for p in points]
    return [(d, (lambda p=p, d=d: make_config(p, seed0, d, False))) for p, d in zip(points, dirs)]


def select(points: List[Point], seeds: Sequence[int], folder: str, protocol: str,
           make_config: Callable[[Point, int, str, bool], dict], grid: List[Tuple[str, Callable]],
           grid_results: List[Tuple[Optional[dict], str]], label: str = ""
           ) -> Tuple[Dict[str, Any], List[Tuple[str, Callable[[], dict]]]]:
    """The choice from the grid's validation scores, and the final runs it asks for."""
    if protocol not in PROTOCOL_TITLES:
        raise C.ConfigError(f"tuning protocol {protocol!r}: expected val or refit")
    # the grid is scored by the sweep's own eval.metric (eval.metric cannot be tuned: FORBIDDEN)
    metric = make_config(points[0], int(seeds[0]), grid[0][0], False)["eval"]["metric"] if points else "top1"
    scores = [val_score(res, metric) for res, _ in grid_results]
    for (res, _), s, (d, _) in zip(grid_results, scores, grid):
        if res and s is None:
            log.warning("%s: grid run %s has no validation %s to be scored by; it cannot be chosen",
                        label, d, "loss" if metric == "loss" else "top-1")
    k = choose(scores)
    by = scored_by(metric)
    sel = [(res or {}).get("val_selected") or {} for res, _ in grid_results]
    cell: Dict[str, Any] = {
        "label": label, "protocol": protocol, "grid_seed": int(seeds[0]), "scored_by": by,
        "grid": [{"point": dict(p), "label": point_label(p), "val_top1": v.get("val_top1") if s is not None else None,
                  "val_loss": (-s if by == "val_loss" else v.get("val_loss")) if s is not None else None,
                  "score": s, "run_dir": os.path.abspath(d),
                  "status": res.get("status", "ok") if res else "failed", "error": err}
                 for p, (d, _), s, v, (res, err) in zip(points, grid, scores, sel, grid_results)],
        "chosen": None, "chosen_label": None, "finals": []}
    if k is None:
        log.error("%s: every grid point failed; nothing to select", label)
        return cell, []
    chosen = points[k]
    cell["chosen"], cell["chosen_label"] = dict(chosen), point_label(chosen)
    if by == "val_loss":
        log.info("%s: chose %s (val loss %.4f)", label, point_label(chosen), -scores[k])
    else:
        log.info("%s: chose %s (val top-1 %.2f)", label, point_label(chosen), scores[k])
    sub = "grid" if protocol == "val" else "refit"
    dirs = [os.path.join(point_dir(os.path.join(folder, sub), chosen), f"seed{int(s)}") for s in seeds]
    return cell, [(d, (lambda s=s, d=d: make_config(chosen, int(s), d, protocol == "refit")))
                  for s, d in zip(seeds, dirs)]


def record_finals(cell: Dict[str, Any], seeds: Sequence[int], tasks, results) -> None:
    cell["finals"] = [{"seed": int(s), "run_dir": os.path.abspath(d), "results": res, "error": err}
                      for s, (d, _), (res, err) in zip(seeds, tasks, results)]


def tune_cell(points: List[Point], seeds: Sequence[int], folder: str, protocol: str,
              make_config: Callable[[Point, int, str, bool], dict], runner: Runner,
              label: str = "") -> Dict[str, Any]:
    """Select a point for one (dataset, method) and run it with every seed.

    ``make_config(point, seed, run_dir, refit)`` returns the run's configuration
    (``run.output``/``run.name`` must place it in ``run_dir``). Returns the cell's
    record: grid scores, the choice, and the final runs' results.
    """
    grid = grid_tasks(points, int(seeds[0]), folder, make_config)
    cell, finals = select(points, seeds, folder, protocol, make_config, grid, runner.run_all(grid), label)
    if finals:
        record_finals(cell, seeds, finals, runner.run_all(finals))
    return cell
