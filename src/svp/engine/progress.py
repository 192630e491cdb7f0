"""What a run shows: the per-step progress (bar or lines), the ``svp.engine`` log (stderr
and ``<run>/train.log``) and its scalars (TensorBoard, Weights & Biases)."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from typing import List, Optional

from ..errors import ConfigError
from .distributed import arithmetic

log = logging.getLogger("svp.engine")


# Set in a `svp sweep --jobs N` worker (svp.engine.tune) to its run's name within the sweep:
# it begins each of the run's stderr lines, and the automatic progress display is lines, not a
# bar (N workers drew their bars on one terminal line, over each other and over the log lines,
# and nothing said which run a line came from).
worker_label: Optional[str] = None


class Progress:
    def __init__(self, mode: str, enabled: bool, log_every: int):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() and worker_label is None else "lines"
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

    def wants(self, step_in_epoch: int) -> bool:
        """Does ``update`` at this step show the loss? (Otherwise the loss need not be read,
        which on CUDA saves a host synchronisation.)"""
        return self.mode != "none" and (step_in_epoch % self.log_every == 0 or step_in_epoch == self.total)

    def update(self, step_in_epoch: int, loss: Optional[float], lr: float, images: int):
        self.images += images
        if self.bar is not None:
            self.bar.update(step_in_epoch - self.bar.n)
        if not self.wants(step_in_epoch) or loss is None:
            return
        dt = max(time.time() - self.t0, 1e-9)
        ips = self.images / dt
        if self.bar is not None:
            # loss first, lr second, compact: tqdm's set_postfix sorts its keys and cuts the end at
            # the terminal's width, so an 80-column bar never showed lr, and often not the loss
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.1e} {ips:.0f} img/s")
        elif self.mode == "lines":
            left = (self.total - step_in_epoch) * dt / max(step_in_epoch - self.done0, 1)
            log.info("epoch %d/%d step %d/%d loss %.4f lr %.3e %.1f img/s eta %s", self.epoch + 1, self.epochs,
                     step_in_epoch, self.total, loss, lr, ips, fmt_time(left))

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{(s % 3600) // 60:02d}:{s % 60:02d}"


class _RunLog(logging.FileHandler):
    """train.log: a line it cannot write (a full disk) is said once on stderr, not as logging's
    traceback for every line; the run goes on (its other files say whether they were written)."""

    failed = False

    def handleError(self, record) -> None:
        self._said(sys.exc_info()[1])

    def close(self) -> None:
        try:   # (the lines it could not take are still buffered: closing flushes them again)
            super().close()
        except OSError as e:
            self._said(e)

    def _said(self, e) -> None:
        if not self.failed:
            self.failed = True
            sys.stderr.write(f"svp: cannot write {self.baseFilename} ({getattr(e, 'strerror', None) or e}); "
                             f"lines from here on are missing from it\n")


class LineFormatter(logging.Formatter):
    """train.log's records, each line of a message under its time stamp: a message of several
    lines (a dataset error's expected layout, a traceback) left lines without one, which a
    reader of one record per line took for records of their own."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if "\n" not in text:
            return text
        stamp = self.formatTime(record, self.datefmt) + " "
        first, *rest = text.split("\n")
        return "\n".join([first] + [stamp + "  " + ln for ln in rest])


class _LabelFormatter(logging.Formatter):
    """A --jobs worker's stderr lines, each begun with its run's name: a message of several lines
    (the trainable-parameter report) had it on its first line alone, and two runs' second lines
    could not be told apart (review42)."""

    def __init__(self, label: str):
        super().__init__("%(message)s")
        self.label = label

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(self.label + ln for ln in super().format(record).split("\n"))


class _RunWarnings(logging.Handler):
    """While a run logs (in its handler list, so teardown_logging ends it): each Python warning
    shown in the run's process is written to train.log too. train.log had none of them (a
    DataLoader's "will create 4 worker processes", bfloat16 on a CPU without its instructions)
    (review 55). Python shows a warning once per place in the code for a whole process: the
    places seen are forgotten as a run starts (CPython's ``warnings._filters_mutated``, what
    changing a filter does), so each run of a sweep in one process shows, and logs, its own. Where
    the user gave no warning options (``-W``, ``PYTHONWARNINGS``), a text is shown once a run:
    torch's DataLoader gives that one from two places, and stderr had it twice. Shown as before
    otherwise (the hook found in place is called: pytest's too); the data loader's worker
    processes show theirs on stderr only (forked ones inherit the hook: each wrote the log)."""

    def __init__(self, files: List[logging.Handler]):
        super().__init__()
        self.files, self.seen, self.pid = files, set(), os.getpid()
        forget = getattr(warnings, "_filters_mutated", None)
        if forget is not None:
            forget()
        self.previous = warnings.showwarning
        warnings.showwarning = self._show

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if os.getpid() != self.pid:   # (a forked worker)
            return self.previous(message, category, filename, lineno, file, line)
        key = (category, str(message))
        if key in self.seen and not sys.warnoptions:
            return
        self.seen.add(key)
        self.previous(message, category, filename, lineno, file, line)
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        record = log.makeRecord(log.name, logging.WARNING, filename, lineno, "%s", (text,), None)
        for h in self.files:
            h.handle(record)

    def emit(self, record):   # (never added to a logger: a handler only to be closed with the others)
        pass

    def close(self):
        if warnings.showwarning == self._show:   # (else someone hooked after it: theirs stays)
            warnings.showwarning = self.previous
        super().close()


def setup_logging(run_dir: Optional[str], is_main: bool) -> List[logging.Handler]:
    handlers: List[logging.Handler] = []
    log.setLevel(logging.INFO)
    log.propagate = False
    if is_main:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(_LabelFormatter(f"[{worker_label}] ") if worker_label else logging.Formatter("%(message)s"))
        handlers.append(sh)
        if run_dir:
            # (a run folder's name under a non-UTF-8 locale holds lone surrogates: their bytes)
            fh = _RunLog(os.path.join(run_dir, "train.log"), encoding="utf-8", errors="surrogateescape")
            fh.setFormatter(LineFormatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            handlers.append(fh)
    if not is_main:
        # (with no handler at all, logging's lastResort printed every warning of the other ranks
        # on stderr, unlabelled, beside rank 0's: each warning twice under torchrun: review 65)
        handlers.append(logging.NullHandler())
    for h in handlers:
        log.addHandler(h)
    if is_main and run_dir:
        handlers.append(_RunWarnings(handlers[1:]))
    return handlers


def log_fatal(handlers, exc: BaseException) -> None:
    """Write why the run ended to ``train.log`` only (stderr gets it from the CLI): the
    message of a user's error or a stop, the traceback of anything else."""
    from ..errors import SVPError
    from .signals import TrainingStopped

    files = [h for h in handlers if isinstance(h, logging.FileHandler)]
    if not files:
        return
    known = isinstance(exc, (SVPError, TrainingStopped))
    text = str(exc) if known else f"{type(exc).__name__}: {exc}"
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "stopped: %s", (text,),
                            None if known else (type(exc), exc, exc.__traceback__))
    for h in files:
        h.handle(record)


def teardown_logging(handlers) -> None:
    for h in handlers:
        log.removeHandler(h)
        h.close()


def tensorboard(cfg: dict, run_dir: str, is_main: bool, resumed_at: int = 0):
    """The run's TensorBoard writer (``run.tensorboard``). A run resumed at global step
    ``resumed_at`` discards what a stopped or killed attempt wrote after it (``purge_step``):
    TensorBoard showed those steps twice, the killed attempt's values beside the resumed
    ones (different ones after ``--resume train.lr=...``), as metrics.jsonl does not."""
    if not (cfg["run"]["tensorboard"] and is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("run.tensorboard=true needs the tensorboard package "
                          "(pip install 'svp-vim[tensorboard]')") from None
    return SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resumed_at + 1 if resumed_at else None)


WANDB_ID_FILE = "wandb_run_id"


def _installed(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        import importlib.util
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_scalar_packages(cfg: dict) -> None:
    """The packages ``run.tensorboard`` and ``run.wandb`` need, before any work (found missing
    only after the data and the model were built, and at a resume after config.yaml was rewritten
    with the setting: retest 94). Looked up, not imported."""
    run = cfg["run"]
    # (torch's writer already imported, or the package it needs there)
    board = sys.modules.get("torch.utils.tensorboard") is not None or _installed("tensorboard")
    if run.get("tensorboard") and not board:
        raise ConfigError("run.tensorboard=true needs the tensorboard package (pip install 'svp-vim[tensorboard]'); "
                          "or run without it (run.tensorboard=false, at a --resume too)")
    if run.get("wandb") and not _installed("wandb"):
        raise ConfigError("run.wandb=true needs the wandb package (pip install 'svp-vim[wandb]'); or run without "
                          "it (run.wandb=false, at a --resume too)")
    if run.get("wandb"):   # (the project it falls back to, which wandb checks even where one is given: retests 97, 99)
        problem = wandb_project_problem(os.environ.get("WANDB_PROJECT") or None)
        if problem:
            raise ConfigError(f"run.wandb=true: $WANDB_PROJECT={os.environ['WANDB_PROJECT']!r}, which wandb reads "
                              f"{'even beside run.wandb_project' if run.get('wandb_project') else 'as the project'}, "
                              f"is refused by it: {problem}")


def wandb_project_problem(project) -> Optional[str]:
    """Why wandb would refuse ``project`` as a project name (at init, after the data and the model
    were built: retest 94, 97), or None."""
    if not isinstance(project, str):
        return None
    if any(c in project for c in "/\\#?%:"):
        return "a wandb project name may not hold any of / \\ # ? % :"
    if len(project) > 128:
        return f"a wandb project name has at most 128 characters, this one {len(project)}"
    return None


class WandbScalars:
    """The run's Weights & Biases run (``run.wandb``), written to as TensorBoard is:
    ``add_scalar(tag, value, step)`` and ``close()``. The scalars of one global step go out as
    one ``log`` call, charted over ``global_step`` (wandb's own step counts calls). The run's id
    is kept in ``<run>/wandb_run_id``, so a resumed run continues the same wandb run. wandb cannot
    drop what a stopped attempt logged after the resume point, as TensorBoard's purge does: those
    steps show twice on a chart over ``global_step``; a killed attempt loses what wandb had not yet
    written (offline, its file is written every ~15 s)."""

    def __init__(self, run, step_key: str = "global_step"):
        self.run, self.step_key = run, step_key
        self.pending: dict = {}
        self.step: Optional[int] = None

    def add_scalar(self, tag: str, value, step: int) -> None:
        if self.pending and step != self.step:
            self.flush()
        self.step = int(step)
        self.pending[tag] = float(value)

    def flush(self) -> None:
        if self.pending:
            self.run.log({**self.pending, self.step_key: self.step})
            self.pending = {}

    def summarise(self, results: dict) -> None:
        """The run's results in the wandb run's summary: the val-selected and the final epoch's
        numbers (``selected/test_top1``, ``final/test_top1``, ...), the parameter counts and the
        adapter's size, as in results.json (the summary would otherwise hold each scalar's last
        logged value: the final epoch's)."""
        out = {}
        for part in ("val_selected", "final"):
            for k, v in (results.get(part) or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{'selected' if part == 'val_selected' else part}/{k}"] = v
        for k in ("trainable_params", "trainable_params_without_head", "all_params", "adapter_bytes",
                  "train_seconds", "images_per_s"):
            if isinstance(results.get(k), (int, float)):
                out[k] = results[k]
        self.run.summary.update(out)

    def close(self, failed: bool = False) -> None:
        try:
            self.flush()
        finally:
            self.run.finish(exit_code=1 if failed else 0)


def read_wandb_record(path: str) -> dict:
    """``<run>/wandb_run_id``: the wandb run's id on its first line, then ``project: ...`` and
    ``entity: ...`` lines (an empty entity: the one wandb chose by default, e.g. an offline run's;
    a file of an earlier svp holds the id alone); {} without the file."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().splitlines()]
    if not lines or not lines[0] or ":" in lines[0]:   # (no id: nothing of the rest belongs to a run: retest 99)
        return {}
    out = {"id": lines[0]}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep and (key.strip() == "project" and value.strip() or key.strip() == "entity"):
            out[key.strip()] = value.strip()
    return out


def _wandb_record(run_id: str, project: str, entity: Optional[str]) -> str:
    return f"{run_id}\nproject: {project}\n" + (f"entity: {entity}\n" if entity is not None else "")


@contextlib.contextmanager
def _without_env(name: Optional[str]):
    saved = os.environ.pop(name, None) if name else None
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def wandb_run(cfg: dict, run_dir: str, is_main: bool) -> Optional[WandbScalars]:
    """The run's wandb run (``run.wandb``; project ``run.wandb_project``, else $WANDB_PROJECT, else
    "svp"; entity, mode and the rest from wandb's own variables: WANDB_ENTITY, WANDB_MODE=offline
    ...). Named ``run.name`` (else the run folder's name), its files in ``<run>/wandb``, the
    resolved configuration as its config."""
    if not (cfg["run"].get("wandb") and is_main):
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("run.wandb=true needs the wandb package (pip install 'svp-vim[wandb]')") from None
    from ..io import atomic_write_text

    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode == "disabled":   # (it left an id file of a run that never existed: retest 97)
        log.info("run.wandb=true: WANDB_MODE=disabled, so nothing goes to wandb")
        return None
    id_file = os.path.join(run_dir, WANDB_ID_FILE)
    recorded = read_wandb_record(id_file)
    run_id = recorded.get("id")
    project = cfg["run"].get("wandb_project") or os.environ.get("WANDB_PROJECT") or "svp"
    entity = recorded.get("entity")   # (None: not recorded yet; "": wandb's default entity)
    problem = wandb_project_problem(recorded.get("project"))
    if problem:
        raise ConfigError(f"{id_file}: project {recorded['project']!r}: {problem} (the file was edited?); give the "
                          f"project the run's wandb run is in, or delete the project line")
    if recorded.get("project") and recorded["project"] != project:
        # (a run id lives in one project: a resume without the $WANDB_PROJECT of its start logged its
        # other half to a second run in another project: retest 97)
        log.warning("run.wandb: this run's wandb run %s is in project %r; it continues there, not in %r", run_id,
                    recorded["project"], project)
        project = recorded["project"]
    env_entity = os.environ.get("WANDB_ENTITY")
    if entity is not None and env_entity and env_entity != entity:
        # (an offline first attempt records the default entity, ""; its resume under $WANDB_ENTITY went
        # to that entity unsaid, and the record was rewritten to it: retest 98)
        log.warning("run.wandb: this run's wandb run %s belongs to %s; it continues there, not in $WANDB_ENTITY=%r",
                    run_id, f"entity {entity!r}" if entity else "wandb's default entity (its first attempt's)",
                    env_entity)
    if run_id is None:
        # (wandb's own ids: 8 characters of [a-z0-9]; written before init, so a run killed during
        # init still resumes into the run it created)
        import secrets
        run_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
    atomic_write_text(id_file, _wandb_record(run_id, project, entity))
    offline = mode in ("offline", "dryrun")
    try:
        # (run.name where given, sub-folders and all: a sweep's runs are <dataset>/<method>/seed<N>,
        # each "seed0" by its folder's name alone)
        name = cfg["run"].get("name") or os.path.basename(os.path.normpath(run_dir))
        # (quiet unless WANDB_QUIET / WANDB_SILENT say otherwise: wandb's ~35 lines a run, its
        # sparklines and sync hints, came between svp's own: retest 94; offline, wandb prints its
        # three lines whatever quiet says, so silent there, and svp says where the files are: retest 97)
        quiet = {} if any(v in os.environ for v in ("WANDB_QUIET", "WANDB_SILENT")) else \
            {"settings": wandb.Settings(quiet=True, silent=offline)}
        with _without_env("WANDB_ENTITY" if entity == "" else None):   # (the default: the variable unread)
            run = wandb.init(project=project, entity=entity or None, name=str(name), id=run_id,
                             resume="allow", dir=run_dir, config=cfg, job_type="train",
                             tags=[str(cfg["method"]["name"])[:64], str(cfg["data"]["dataset"])[:64]], **quiet)
    except Exception as e:   # noqa: BLE001  (wandb's errors have no common base: login, network, mode)
        advice = ("" if offline else f"set WANDB_MODE=offline to log to {os.path.join(run_dir, 'wandb')} and "
                                     f"`wandb sync` later, or ")
        raise ConfigError(f"run.wandb=true: wandb could not start a run ({type(e).__name__}: {e}); "
                          f"{advice}run without it (run.wandb=false, at a --resume too)") from None
    if entity is None:   # (recorded once, by the attempt that made the run: a resume never rewrites it)
        atomic_write_text(id_file, _wandb_record(run_id, project, str(getattr(run, "entity", None) or "")))
    sync_dir = getattr(getattr(run, "settings", None), "sync_dir", None)
    if offline and sync_dir:
        log.info("wandb (offline): run %s's records are in %s; `wandb sync %s` uploads them", run_id, sync_dir,
                 sync_dir)
    run.define_metric("global_step")
    run.define_metric("*", step_metric="global_step")
    return WandbScalars(run)


class Scalars:
    """Every scalar sink of a run (TensorBoard, wandb), written to as one."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def add_scalar(self, tag: str, value, step: int) -> None:
        for s in self.sinks:
            s.add_scalar(tag, value, step)

    def summarise(self, results: dict) -> None:
        for s in self.sinks:
            if isinstance(s, WandbScalars):
                try:   # (the run has finished and results.json is written: a summary wandb refuses is said)
                    s.summarise(results)
                except Exception as e:   # noqa: BLE001
                    log.warning("wandb did not take the run's results as its summary (%s: %s)", type(e).__name__, e)

    def close(self, failed: bool = False) -> None:
        errors = []
        for s in self.sinks:   # (each closed, one failing or not: a TensorBoard flush error left wandb open)
            try:
                s.close(failed=failed) if isinstance(s, WandbScalars) else s.close()
            except Exception as e:   # noqa: BLE001
                errors.append(e)
        if errors and not failed:
            raise errors[0]
        for e in errors:   # (the run's own error is the one to see: said, not raised over it)
            log.warning("closing the run's scalar logs: %s: %s", type(e).__name__, e)


def scalar_sinks(cfg: dict, run_dir: str, is_main: bool, resumed_at: int = 0) -> Optional[Scalars]:
    """The run's scalar sinks (``run.tensorboard``, ``run.wandb``) as one, or None."""
    sinks = [s for s in (tensorboard(cfg, run_dir, is_main, resumed_at),) if s is not None]
    try:
        w = wandb_run(cfg, run_dir, is_main)
    except BaseException:
        for s in sinks:
            s.close()
        raise
    sinks += [w] if w is not None else []
    return Scalars(sinks) if sinks else None


def log_start(cfg: dict, run_dir: str, model, spec, n_train: int, device, world_size: int, lr: float,
              steps_per_epoch: int) -> None:
    t = cfg["train"]
    log.info("run folder: %s", run_dir)
    # (what ran each segment: a resume after an upgrade says so here)
    import platform

    import torch

    from .._version import __version__
    log.info("svp %s, torch %s, Python %s", __version__, torch.__version__, platform.python_version())
    a = arithmetic(model)
    # (the thread count and scan backend: a step's last bits depend on them, and a resume on others
    # says so; each segment of a resumed run logs its own)
    log.info("%s on %s (%d classes, %d train samples), backbone %s, device %s%s, scan backend %s, world size %d",
             cfg["method"]["name"], cfg["data"]["dataset"], spec.num_classes, n_train, spec.model, device,
             f" ({a['threads']} thread(s))" if a["threads"] is not None else "", a["scan_backend"] or "unknown",
             world_size)
    if spec.weights == "random":
        log.warning("WARNING: the backbone %s is randomly initialised (model.random_init=true): fine for "
                    "tests, meaningless for results. Use --checkpoint <official .pth> or the bundled "
                    "--model vim_mini_patch4_32", spec.model)
    log.info("%s", model.trainable_report())
    mc = getattr(model, "config", None)
    if mc is not None and hasattr(mc, "head"):
        # (an HTA preset gives every method the official run's head kind and SimAM: the log did not
        # say so, only config.yaml did: review 66)
        log.info("head %s, SimAM %s%s", mc.head, "on" if getattr(mc, "simam", False) else "off",
                 " (the dataset's preset, for every method: docs/methods.md, The harness)"
                 if mc.head != "linear" or getattr(mc, "simam", False) else "")
    log.info("lr used %.4g (base %.4g, batch %d x world %d%s), %d steps/epoch, %d epochs", lr,
             float(t["lr"]), int(t["batch_size"]), world_size,
             f" / {t['lr_scale_base']}" if t["lr_scale"] else ", unscaled", steps_per_epoch, int(t["epochs"]))


def log_epoch(record: dict, epochs: int, improved: bool, tb=None, metric: str = "top1") -> None:
    msg = (f"epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f} lr {record['lr']:.3e} "
           f"{record['images_per_s']:.1f} img/s {record['train_seconds']:.1f}s")
    if "val_top1" in record:
        # the mark beside the validation number it was selected on (it sat after the test number,
        # and without a validation split, where nothing is compared, on every epoch; with
        # eval.metric=loss beside a top-1 that fell while the loss it was chosen on went unshown)
        best = " (best)" if improved else ""
        msg += f" | val top1 {record['val_top1']:.2f}" + ("" if metric == "loss" else best)
        if metric == "loss" and "val_loss" in record:
            msg += f" val loss {record['val_loss']:.4f}" + best
    if "test_top1" in record:
        msg += f" | test top1 {record['test_top1']:.2f}"
    log.info(msg)
    if tb is not None:
        # on the global step axis, as train/*: a resume's purge (tensorboard()) is by step, and
        # epoch numbers would not reach the epochs a killed attempt logged after the resume point
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                tb.add_scalar(f"epoch/{k}", v, record["step"])


def log_done(res: dict, has_val: bool) -> None:
    sel = res["val_selected"]
    log.info("done: final-epoch test top1 %s | %s (epoch %s) test top1 %s%s",
             pct(res["final"]["test_top1"]), "val-selected" if has_val else "no val split, last",
             sel["epoch"], pct(sel["test_top1"]),
             (f" | official best-test-over-epochs {res['official_best_test_top1']['value']:.2f} "
              f"(selected on test)" if "official_best_test_top1" in res else ""))


def pct(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"
