"""``svp train``, ``svp eval``, ``svp predict`` and ``svp sweep``."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import stat
import sys
import textwrap
from typing import List

from . import config as C
from . import resume_overrides as RO

EXIT_CONFIG = 2

from .. import runtime  # noqa: E402
from ..build import WEIGHTS_HELP, load_for_inference  # noqa: E402,F401 (load_for_inference re-exported)
from ..io import error_line, json_text, printable, shortened, user_path  # noqa: E402


def _config_epilog() -> str:
    lines = ["configuration keys (set with section.key=value, or in a --config YAML file as",
             "section: {key: value}); default in brackets:", ""]
    for key, default, help_ in C.SCHEMA:
        d = json.dumps(default) if not isinstance(default, str) else default
        lines.append(f"  {key} [{d}]")
        for w in textwrap.wrap(help_, 74):
            lines.append(f"      {w}")
    lines += ["", "resolution order (later wins): defaults, the dataset preset",
              "(svp.data.load_preset), --config files, the flags above,",
              "key=value overrides. The dataset preset sets most train.* keys (lr, batch,",
              "epochs, mixup, ...): `--print-config` shows what a run will actually use.",
              "",
              "examples:",
              "  svp train --dataset digits --method svp --model vim_mini_patch4_32   (bundled weights)",
              "  svp train --dataset digits --method svp --model vim_tiny_patch16_224 \\",
              "      --random-init model.kwargs.img_size=32 model.kwargs.patch_size=4 model.kwargs.stride=4 \\",
              "      train.epochs=5   (a random backbone, for a quick look; no weights needed)",
              "  svp train --dataset hta/cub200 --method svp --model vim_small_patch16_224 \\",
              "      --checkpoint vim_s_midclstok_80p5acc.pth --data-root /data",
              "  svp train --resume runs/digits-svp-s0-20250101-120000-3f9a1c",
              "  torchrun --nproc_per_node=2 -m svp train --dataset digits ...   (DDP; batch is per process)",
              "",
              "exit codes: 0 done, 1 out of memory (one line saying what to lower), 2 bad",
              "configuration/data/checkpoint or run folder in use, 3 divergence (non-finite loss,",
              "gradients, weights or optimizer state), 75 stopped by debug.stop_at_step, 130",
              "interrupted by SIGINT/SIGTERM (resume point saved; a second signal, two seconds or",
              "more after the first, stops at once)."]
    return "\n".join(lines)


# flag -> config key
TRAIN_FLAGS = [
    ("--dataset", "data.dataset", str, "dataset name (embedded: digits, textures, faces, dsprites_loc, ...; "
                                       "vtab/<task>, hta/<name>; see `svp data list`)"),
    ("--data-root", "data.root", str, "folder holding the datasets on disk (default $SVP_DATA)"),
    ("--method", "method.name", str, "adaptation method: {methods}"),
    ("--init-from", "method.init_from", str, "an adapter folder whose tensors start this run's adapter (LP-FT: a "
                                             "linear probe's best/ as a full fine-tuning run's start)"),
    ("--model", "model.name", str, "timm model name of the backbone (e.g. vim_small_patch16_224; timm's ViTs, "
                                   "vit_base_patch16_224..., for the baselines); " + WEIGHTS_HELP),
    ("--checkpoint", "model.checkpoint", str, "backbone checkpoint: an official Vim's (.pth / .safetensors), or "
                                              "a timm ViT's (those or Google's .npz)"),
    ("--output", "run.output", str, "parent folder of run folders (default runs/)"),
    ("--name", "run.name", str, "run folder name (default <dataset>-<method>-s<seed>-<date>-<time>-<6 hex>)"),
    ("--epochs", "train.epochs", int, "number of epochs"),
    ("--batch-size", "train.batch_size", int, "training batch size per process"),
    ("--lr", "train.lr", float, "base learning rate (see train.lr_scale)"),
    ("--seed", "train.seed", int, "random seed"),
    ("--shots", "data.shots", int, "few-shot: N training images per class, drawn under the seed"),
    ("--device", "train.device", str, "auto, cpu, cuda, cuda:N"),
    ("--img-size", "data.img_size", int, "input resolution"),
    ("--num-workers", "data.num_workers", int, "data-loader workers per process"),
]


def register(subparsers) -> None:
    # ---------------------------------------------------------------- train
    p = subparsers.add_parser(
        "train", help="fine-tune a Vim backbone with SVP or a baseline",
        description="Train a method on a dataset with the official SVP recipe; writes a run folder "
                    "(config.yaml, metrics.jsonl, train.log, results.json, best/ and last/ adapters, "
                    "resume.safetensors).",
        epilog=_config_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="configuration overrides, e.g. train.lr=1e-3 method.settings.shared_layers=6")
    p.add_argument("--config", "-c", action="append", default=[], metavar="FILE", type=user_path,
                   help="YAML configuration file (repeatable; later files win)")
    from ..peft import list_methods   # the registered ones: a method added to svp.peft is listed
    # the backbone's weights come from one of them (two at once: one was ignored, with a warning at
    # best; eval's, predict's and visualize's are refused alike: review 78, retest 82)
    weights = p.add_mutually_exclusive_group()
    for flag, key, typ, help_ in TRAIN_FLAGS:
        help_ = help_.replace("{methods}", ", ".join(list_methods()))
        if flag != "--checkpoint":
            p.add_argument(flag, type=typ, default=None, help=f"{help_} [{key}]")
            continue
        # (side by side, so that the usage line shows them as one choice)
        weights.add_argument(flag, type=typ, default=None, help=f"{help_} [{key}]")
        weights.add_argument("--pretrained", action="store_true",
                             help="timm's pretrained weights for the backbone; may download [model.pretrained=true]")
        weights.add_argument("--random-init", action="store_true",
                             help="a randomly initialised backbone (tests only) [model.random_init=true]")
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast on CUDA and CPU (docs/training.md) [train.amp=true]")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, type=user_path,
                   help="continue the interrupted run in RUN_DIR with its saved config.yaml (overrides may "
                        f"change only {', '.join(RO.ACCEPTED)}; refused while another process trains in "
                        "RUN_DIR)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-step progress (run.progress=none)")
    p.set_defaults(func=cmd_train)
    _intermixed(p)

    # ---------------------------------------------------------------- eval
    e = subparsers.add_parser(
        "eval", help="evaluate an adapter directory on a dataset split",
        description="Rebuild the backbone recorded in ADAPTER_DIR/backbone.json (or given by --model/"
                    "--checkpoint), apply the adapter and report top-1/top-5 accuracy.")
    e.add_argument("adapter_dirs", metavar="ADAPTER_DIR", type=user_path, nargs="+",
                   help="an adapter folder, e.g. runs/<run>/best; several: each evaluated on the same images, "
                        "each after the first paired with it (McNemar's exact test; put the baseline first)")
    e.add_argument("--dataset", required=True, help="dataset name")
    e.add_argument("--split", default="test", help="split to evaluate (default test)")
    e.add_argument("--data-root", default=None, type=user_path, help="data root for datasets on disk")
    _backbone_args(e)
    e.add_argument("--batch-size", type=int, default=144, help="evaluation batch size (default 144)")
    e.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N samples")
    _amp_arg(e)
    e.add_argument("--json", action="store_true", help="print the result as JSON: one adapter's result, or for "
                                                       "several {dataset, split, n, results, paired}")
    e.add_argument("--json-list", action="store_true",
                   help="--json in the form of several adapters for one adapter too (results: [its result], "
                        "paired: []), so a script reads one form whatever the number of folders")
    e.add_argument("--per-class", action="store_true",
                   help="also each class's images and top-1 accuracy, and their mean over the classes (the "
                        "accuracy each class weighs alike in, whatever its number of images)")
    e.add_argument("--predictions", metavar="FILE.csv", type=user_path, default=None,
                   help="also write each image's label and top-1 prediction to this CSV file (index, item, label, "
                        "label_name, pred, pred_name, prob, correct): for paired tests between methods (McNemar), "
                        "error galleries, ensembles")
    e.add_argument("--ignore-class-names", action="store_true",
                   help="evaluate by class index although the dataset's class names (or their order) are not the "
                        "adapter's (refused otherwise)")
    e.set_defaults(func=cmd_eval)
    _intermixed(e)

    # ---------------------------------------------------------------- predict
    q = subparsers.add_parser("predict", help="top-k classes (names) for image files or folders",
                              description="Classify image files with an adapter; prints the top-k class "
                                          "names and probabilities per image, in the order given (a folder's "
                                          "images in natural order: img2 before img10).")
    q.add_argument("adapter_dir", metavar="ADAPTER_DIR", type=user_path,
                   help="an adapter folder, e.g. runs/<run>/best")
    q.add_argument("images", nargs="+", metavar="IMAGE", type=user_path,
                   help="image files (any format Pillow reads), or folders: a folder stands for the image files "
                        "in it and below, by their endings as in a dataset's folders (.jpg, .png, .webp, ...; "
                        "hidden ones skipped)")
    q.add_argument("--topk", type=int, default=5, help="number of classes to print (default 5)")
    q.add_argument("--batch-size", type=int, default=32,
                   help="images read and classified at a time (default 32; the memory a batch needs grows with it)")
    _backbone_args(q)
    _amp_arg(q)
    shape = q.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print the predictions as one JSON document, once every "
                                                          "image is answered")
    shape.add_argument("--jsonl", action="store_true",
                       help="print each image's answer as a line of JSON, batch by batch (JSON Lines: a stopped "
                            "run keeps the answers before it)")
    q.set_defaults(func=cmd_predict)

    # ---------------------------------------------------------------- sweep
    s = subparsers.add_parser(
        "sweep", help="run a suite over methods and seeds; write results.csv and a Markdown table",
        description="Train every (dataset, method, seed) of a suite (finished runs are reused, interrupted "
                    "ones resumed, when the configuration a run folder saved is the one asked for; a folder "
                    "made with another is refused, naming the keys) and write <output>/results.csv and "
                    "<output>/results.md: per-dataset "
                    "test top-1 as mean ± std over seeds (val-selected epoch and last epoch), trainable "
                    "parameters with and without the head, adapter size; for VTAB the 19-task mean and "
                    "the mean of the Natural/Specialized/Structured group means.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  svp sweep --suite mini --methods svp,linear --seeds 0,1,2 train.epochs=5"
               "   (the mini suite's base: svp/assets/mini_suite.yaml)\n"
               "  svp sweep --suite vtab --methods svp --seeds 0 --data-root /data --model vim_small_patch16_224 "
               "--checkpoint vim_s.pth")
    s.add_argument("overrides", nargs="*", metavar="section.key=value", help="configuration overrides for every run")
    s.add_argument("--suite", required=True, choices=["mini", "vtab", "hta", "any"],
                   help="mini (embedded datasets, bundled mini Vim), vtab (VTAB-1k), hta (FGVC/HTA), or any "
                        "(the registered datasets --datasets names, e.g. one you added; engine defaults and "
                        "each dataset's preset)")
    s.add_argument("--methods", default="svp", help="comma-separated methods (default svp)")
    s.add_argument("--seeds", default="0", help="comma-separated seeds k (default 0): each run's train.seed is its "
                   "dataset's own seed + k (0 + k; DTD's preset: 3407 + k, as the official recipe)")
    s.add_argument("--datasets", default=None,
                   help="comma-separated subset of the suite's datasets (required with --suite any)")
    s.add_argument("--output", default=None, type=user_path, help="sweep folder (default sweeps/<suite>)")
    s.add_argument("--config", "-c", action="append", default=[], metavar="FILE", type=user_path,
                   help="YAML config for every run")
    s.add_argument("--data-root", default=None, type=user_path, help="data root [data.root]")
    s.add_argument("--model", default=None, help="backbone timm name [model.name]")
    s.add_argument("--checkpoint", default=None, type=user_path, help="backbone checkpoint [model.checkpoint]")
    s.add_argument("--fail-fast", action="store_true", help="stop at the first failing run")
    s.add_argument("--tune", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="select KEY per method and dataset on the validation split (several --tune: their "
                        "grid), then run the chosen value with every seed; grid runs use the first seed, "
                        "ties go to the first value listed (docs/training.md)")
    s.add_argument("--tune-refit", action="store_true",
                   help="after selection retrain on training + validation split (VTAB-1k convention)")
    s.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process (default 1)")
    s.set_defaults(func=cmd_sweep)
    _intermixed(s)


def _intermixed(parser: argparse.ArgumentParser) -> None:
    """Let ``key=value`` overrides and options come in any order (``svp train --dataset d
    train.lr=1 --epochs 3 model.kwargs.depth=2``): the subparser parses intermixed."""
    orig = parser.parse_known_args
    busy = [False]

    def parse_known_args(args=None, namespace=None):
        if busy[0]:
            return orig(args, namespace)
        busy[0] = True
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            busy[0] = False

    parser.parse_known_args = parse_known_args


def _backbone_args(p, device: bool = True):
    p.add_argument("--model", default=None, help="backbone timm name (default: from backbone.json; "
                                                  + WEIGHTS_HELP + ")")
    # one source of weights: given two, all but one were ignored without a word (review 78)
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", default=None, type=user_path,
                         help="backbone checkpoint (default: from backbone.json)")
    weights.add_argument("--pretrained", action="store_true",
                         help="with --model: timm's pretrained weights (may download from the hub)")
    weights.add_argument("--random-init", action="store_true", help="with --model: a random backbone (tests only)")
    if device:
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def _amp_arg(p):
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast, as train.amp: the large products in bfloat16, the scan in float32 "
                        "(on a CPU, faster where it has avx512_bf16 or amx_bf16; see docs/training.md)")


def _precision(amp: bool, device):
    """The precision ``--amp`` runs in on ``device``, as ``train.amp`` would (``.autocast``: a
    no-op context without it; ``.recorded()``: its dtype as backbone.json writes it)."""
    import torch

    from .setup import Precision

    return Precision({"train": {"amp": amp, "amp_dtype": "bfloat16"}}, torch.device(device), option="--amp")


def _overrides_from_flags(args) -> List[str]:
    out = []
    for flag, key, _, _ in TRAIN_FLAGS:
        v = getattr(args, flag.lstrip("-").replace("-", "_"))
        if v is not None:
            out.append(f"{key}={C.quoted(v) if isinstance(v, str) else v}")
    if getattr(args, "quiet", False):
        out.append("run.progress=none")
    for flag, key in (("pretrained", "model.pretrained"), ("random_init", "model.random_init"), ("amp", "train.amp")):
        if getattr(args, flag, False):
            out.append(f"{key}=true")
    # a source of weights named on the command line is the run's, whatever a -c file says: the
    # file's other source (the mini suite's model.pretrained=true under --checkpoint, a file's
    # pretrained under --random-init) won, or was warned about (retest 82); an override given
    # beside the flag still says so (svp.engine.setup). (Not at --resume: there a flag may only
    # repeat the saved run's value)
    chosen = [k for k, flag in WEIGHT_KEYS if getattr(args, flag, None)]
    if chosen and not getattr(args, "resume", None):
        out += [f"{k}={'null' if k == 'model.checkpoint' else 'false'}" for k, _ in WEIGHT_KEYS if k not in chosen]
    return out + list(args.overrides or [])


# the keys that give a backbone its weights, and train's flag of each (one at a time)
WEIGHT_KEYS = (("model.checkpoint", "checkpoint"), ("model.pretrained", "pretrained"),
               ("model.random_init", "random_init"))


def _err(msg: str, command: str = "train") -> None:
    # the same prefix as svp.cli.main's one-line errors ("svp train: error: ...")
    error_line(command, msg)


def _note(msg: str, command: str) -> None:
    """``svp COMMAND: note: MESSAGE`` on stderr: what the command assumed, its output unchanged."""
    print(f"svp {command}: note: {printable(shortened(msg), lines=True)}", file=sys.stderr)


def _note_assumptions(spec, adapter_dir: str, command: str, dataset=None, precision=None) -> None:
    """Say what an adapter folder left to the command: the image recipe and size of a folder
    without backbone.json (the 'svp' recipe, silently: a VTAB adapter's loss moved by 2e-3), a
    dataset other than the one the adapter was trained on (a VTAB task of the same class count
    passed the class-name check, its names being '0'..'C-1': review 69), and a precision other than
    the one the run evaluated in (an adapter of a train.amp run scored other images right in
    float32 than its results.json says, without a word: retest 82). ``precision``: the command's
    (:func:`_precision`)."""
    from ..build import other_precision, recorded_precision
    from .setup import amp_dtype

    here = precision.recorded() if precision is not None else None
    if not os.path.isfile(os.path.join(adapter_dir, "backbone.json")):
        _note(f"{adapter_dir} has no backbone.json, so the image recipe ({spec.extra.get('recipe')!r}) and size "
              f"({spec.img_size} px) are assumed, not the run's", command)
    elif other_precision(spec.extra, here):
        ran = recorded_precision(spec.extra)[1]
        device = precision.device_type if precision is not None else "cpu"
        with_amp = str(amp_dtype("bfloat16", device)).replace("torch.", "")   # (what --amp would run in here)
        same = ("; without --amp, the run's own numbers" if ran is None else
                "; --amp gives the run's own numbers" if here is None and ran == with_amp else "")
        _note(f"the run of {adapter_dir} evaluated it {f'under train.amp ({ran} autocast)' if ran else 'in float32'}"
              f", this runs in {f'{here} autocast (--amp)' if here else 'float32'}: probabilities differ in their "
              f"last digits and a few images may change class{same}", command)
    trained = spec.extra.get("dataset")
    if dataset and isinstance(trained, str):
        import svp.data as data
        try:
            same = data.dataset_info(trained).name == data.dataset_info(dataset).name
        except Exception:   # noqa: BLE001  (a name this svp does not register: compared as written)
            same = trained == dataset
        if not same:
            _note(f"the adapter in {adapter_dir} was trained on {trained} (its backbone.json); evaluated here "
                  f"on {dataset}", command)


def cmd_train(args) -> int:
    from .loop import TrainingStopped, train
    from .rundir import load_run_config

    overrides = _overrides_from_flags(args)
    try:
        if args.resume:
            if args.config:
                raise C.ConfigError("--resume uses the run's own config.yaml; --config cannot be combined with it")
            if args.print_config:   # with the overrides the resume would apply (and refuse)
                text = C.dump(load_run_config(args.resume, overrides))
                if runtime.launch().rank == 0:   # (under torchrun: one copy, not one a process: review 65)
                    print(text, end="")
                return 0
            train(resume=args.resume, overrides=overrides)
            return 0
        cfg = C.resolve(args.config, overrides)
        if args.print_config:
            import svp.data as data

            # (a method, or a setting of it, no run could use: refused when resolved)
            data.dataset_info(cfg["data"]["dataset"])  # a name no run could use is an error here too
            from .setup import check_method_fits, check_names
            check_names(cfg, weights=False)   # the model's, optimizer's and device's too
            check_method_fits(cfg)   # and the method's settings and the image size against the model
            if runtime.launch().rank == 0:   # (under torchrun: one copy, not one a process: review 65)
                print(C.dump(cfg), end="")
            return 0
        train(cfg)
        return 0
    except TrainingStopped as e:
        if runtime.launch().rank == 0:  # under torchrun, one message, not one a process
            _err(str(e))
        return e.code


def _open_image(path, tf):
    """Through svp.data's one image reader: 16-bit and float images are scaled by their real
    range, and an unreadable file is one error naming it."""
    from ..data import load_image
    from ..data.transforms import check_resized_size

    if os.path.isdir(path):   # (it was "unreadable image: ...: IsADirectoryError: [Errno 21]": review 69)
        from ..data import DatasetError   # (a folder listed as predict's images: one made since)
        raise DatasetError(f"{path}: a folder, not an image")
    im = load_image(path)
    # (the shorter side goes to the model's size: a 1 x 4000000 PNG of 4 KB would need ~20 GB)
    check_resized_size(tf, *im.size, path)
    return tf(im)


def _images_of(paths):
    """``svp predict``'s inputs with each folder replaced by the image files in it and below (a
    folder of images was answered "a folder, not an image", and a shell's ``folder/*.jpg`` fails
    past its argument limit, ~100,000 names): a folder's own files, then each subfolder's, each
    in natural order (``img2`` before ``img10``, case aside, as timm's folder reader), linked
    folders followed once each. Also, as answers, the folders that gave nothing: none with an
    image ending, or one that cannot be read (in its place in the order), and the files skipped
    in folders: for their endings, and (apart) pipes or devices named like images. A pipe or
    device named on its own is answered as such: reading it waited forever (retest 88)."""
    from ..data.base import IMG_EXTENSIONS, special_file, walk_folders

    def order(name):   # (the name itself last: 'A.png' and 'a.png' in one order every time)
        # (the split's odd pieces are the runs of decimal digits; '²' is a digit to isdigit(), not to
        # int(), and a name holding one stopped the command: retest 88)
        return [int(t) if k % 2 else t.casefold() for k, t in enumerate(re.split(r"(\d+)", name))], name

    images, errors, skipped, special = [], {}, [], []
    for path in paths:
        if not os.path.isdir(path):
            if special_file(path):
                errors[path] = f"{path}: not a regular file (a pipe, a device or a socket), not an image"
            images.append(path)
            continue
        found = []

        def unreadable(e, found=found):   # (called where that folder's files would come)
            found.append(e.filename)
            errors[e.filename] = f"{e.filename}: a folder that cannot be read ({e.strerror})"
        for root, files in walk_folders(path, key=order, onerror=unreadable):
            for f in sorted((f for f in files if not f.startswith(".")), key=order):
                file = os.path.join(root, f)
                if not f.lower().endswith(IMG_EXTENSIONS):
                    skipped.append(file)
                # a regular file, or a link to nothing (answered as such); not a pipe or a device,
                # which reading would wait on or read forever
                elif special_file(file):
                    special.append(file)
                else:
                    found.append(file)
        if not found:
            found.append(path)
            errors[path] = f"{path}: a folder with no image files in it or below ({' '.join(IMG_EXTENSIONS)})"
        images += found
    return images, errors, skipped, special


def _check_batch_size(n: int) -> None:
    if n < 1:
        raise C.ConfigError(f"--batch-size must be >= 1, got {n}")


def _eval_transform(spec, adapter_dir: str):
    """The evaluation transform of the recipe and normalisation an adapter was trained with (its backbone.json)."""
    import svp.data as data
    from svp.data.transforms import adapter_normalization, adapter_recipe

    mean, std = adapter_normalization(spec.extra, adapter_dir)
    return data.build_transform(adapter_recipe(spec.extra, adapter_dir), False, img_size=spec.img_size,
                                mean=mean, std=std)


def _check_class_names(adapter_names, dataset_names, args, adapter_dir: str) -> None:
    """The dataset's classes, in order, must be those the adapter was trained on (its recorded
    class names): only the count was checked, and a dataset of the same count with other classes,
    or its classes in another order (a folder renamed), got a plausible accuracy, exit 0 (QA 16d).
    An adapter that recorded no names (older files) is not checked."""
    names, classes = [str(c) for c in adapter_names or []], [str(c) for c in dataset_names or []]
    if not names or not classes or names == classes or args.ignore_class_names:
        return
    i = next(k for k, (a, b) in enumerate(zip(names, classes)) if a != b)
    order = ("; the same classes in another order, so each label would be scored as another class"
             if sorted(names) == sorted(classes) else
             "; the names differ in case or spaces only" if sorted(n.strip().lower() for n in names) == sorted(
                 c.strip().lower() for c in classes) else "")
    # how much differs, not only where first: a name renamed, against another dataset altogether
    differ = sum(a != b for a, b in zip(names, classes))
    named, listed = set(names), set(classes)   # (ImageNet-21k: 21,841 names a side)
    only_data = [c for c in classes if c not in named]
    only_adapter = [n for n in names if n not in listed]

    def some(xs):
        return ", ".join(repr(x) for x in xs[:3]) + (", ..." if len(xs) > 3 else "")
    where = []
    if only_data:
        where.append(f"{len(only_data)} dataset class(es) the adapter does not name ({some(only_data)})")
    if only_adapter:
        where.append(f"{len(only_adapter)} adapter class(es) the dataset lacks ({some(only_adapter)})")
    raise C.ConfigError(f"{args.dataset} [{args.split}]: its classes are not the adapter's ({adapter_dir}): "
                        f"{differ} of {len(names)} positions differ, the first class {i}: {classes[i]!r} in the "
                        f"dataset, {names[i]!r} in the adapter{order}{'; ' if where else ''}{'; '.join(where)}; "
                        f"--ignore-class-names evaluates by class index anyway")


def _check_adapter_for(adapter_dir: str, ds, args) -> None:
    """What refuses an adapter on this dataset, from its folder's files alone (no backbone
    built): checked for every adapter before the first is evaluated, so that a folder that is not
    there, or of other classes, named third does not end the command after two evaluations."""
    from ..build import adapter_spec, check_recorded_checkpoint, check_recorded_weights, read_adapter_folder

    files = read_adapter_folder(adapter_dir, weights=False)   # (the load reads them)
    spec = adapter_spec(adapter_dir, args.model, args.checkpoint, args.pretrained, args.random_init, files=files)
    check_recorded_weights(spec, adapter_dir, files, args.model)
    check_recorded_checkpoint(spec, adapter_dir, args.checkpoint)
    _check_classes(spec, ds, args, adapter_dir)


def _check_classes(spec, ds, args, adapter_dir: str) -> None:
    """The dataset's classes must be the adapter's: their number, then their names in order."""
    if ds.num_classes != spec.num_classes:
        raise C.ConfigError(f"{args.dataset} has {ds.num_classes} classes but the adapter in "
                            f"{adapter_dir} predicts {spec.num_classes}")
    _check_class_names(spec.recorded_class_names, ds.classes, args, adapter_dir)


def _eval_one(adapter_dir: str, ds, args, keep_correct: bool) -> dict:
    """One adapter's result on ``ds`` (built once for every adapter given); with
    ``keep_correct``, also each image's top-1 right or wrong, in dataset order (``correct``)."""
    from .distributed import DistInfo
    from .evaluate import evaluate, top_k, wilson_interval

    model, spec, dev = load_for_inference(adapter_dir, args.model, args.checkpoint, args.device, args.pretrained,
                                         args.random_init)
    _check_classes(spec, ds, args, adapter_dir)   # (again, from the files this load read: the folder may
    # have been replaced since the check)
    precision = _precision(args.amp, dev)
    _note_assumptions(spec, adapter_dir, "eval", args.dataset, precision=precision)
    tf = _eval_transform(spec, adapter_dir)
    rows = [] if args.predictions or keep_correct else None
    r = evaluate(model, ds, tf, args.batch_size, dev, DistInfo(), autocast=precision.autocast,
                 per_class=spec.num_classes if args.per_class else None, predictions=rows)
    del model   # (the next adapter's backbone is built after this one's is freed)
    r.update({"adapter": os.path.abspath(adapter_dir), "dataset": args.dataset, "split": args.split,
              "top5_k": top_k(spec.num_classes)})
    hits = round(r["top1"] * r["n"] / 100) if r["n"] else 0
    r["top1_ci95"] = list(wilson_interval(hits, r["n"]))
    # the labels' names: the dataset's (the true classes are its labels), else the adapter's
    names = [str(n) for n in (ds.classes if len(ds.classes) == spec.num_classes else spec.class_names)]
    if args.per_class:   # (where neither names its classes, by index: no row may be lost in zip)
        r.update(_per_class(r.pop("class_n"), r.pop("class_correct1"),
                            names if len(names) == spec.num_classes else [str(i) for i in range(spec.num_classes)]))
    if args.predictions:
        _write_predictions(args.predictions_target, rows, ds, names, spec.class_names)
        r["predictions"] = args.predictions_target
    if keep_correct:
        r["correct"] = [pred == label for _, label, pred, _ in sorted(rows, key=lambda row: row[0])]
    return r


def _paired(first: dict, other: dict) -> dict:
    """``other`` against ``first`` on the same images: the top-1 difference (points) and
    McNemar's exact test on the images exactly one of them gets right (an image of non-finite
    outputs counts as wrong, as in top-1: how many there are is given beside it)."""
    from .evaluate import mcnemar_exact, paired_difference_interval

    pairs = list(zip(first["correct"], other["correct"]))
    only_other = sum(b and not a for a, b in pairs)
    only_first = sum(a and not b for a, b in pairs)
    both = sum(a and b for a, b in pairs)
    # (the difference from the counts: two rounded percentages gave -1.1999999999999993 for -1.2)
    return {"adapter": other["adapter"], "against": first["adapter"],
            "top1_diff": 100.0 * (only_other - only_first) / max(len(pairs), 1),
            "top1_diff_ci95": list(paired_difference_interval(both, only_first, only_other,
                                                              len(pairs) - both - only_first - only_other)),
            "only_this_right": only_other, "only_first_right": only_first,
            "mcnemar_p": mcnemar_exact(only_first, only_other),
            "nonfinite": other["nonfinite"], "nonfinite_first": first["nonfinite"]}


def _result_line(r: dict) -> str:
    lo, hi = r["top1_ci95"]
    return (f"top-1 {r['top1']:.2f}% (95% CI {lo:.2f}-{hi:.2f})  top-{r['top5_k']} {r['top5']:.2f}%  "
            f"loss {r['loss']:.4f}")


def _p_text(p: float) -> str:
    return "p < 1e-300" if p == 0 else f"p = {p:.3g}"   # (below float's range: 0.0 in --json)


def cmd_eval(args) -> int:
    import svp.data as data

    from .setup import Limited

    _check_batch_size(args.batch_size)
    if args.max_samples is not None and args.max_samples < 1:
        raise C.ConfigError(f"--max-samples must be >= 1 (or left out for every sample), got {args.max_samples}")
    dirs = list(args.adapter_dirs)
    args.json = args.json or args.json_list
    seen = {}
    for d in dirs:   # (the same folder twice compares an adapter with itself: p = 1, a wasted pass)
        real = os.path.realpath(d)
        if real in seen:
            raise C.ConfigError(f"{d}: given twice (as {seen[real]} too); expected different adapter folders")
        seen[real] = d
    if args.predictions and len(dirs) > 1:
        raise C.ConfigError(f"--predictions writes one adapter's predictions; {len(dirs)} adapters were given "
                            f"(evaluate each with its own --predictions file; the paired test between them is "
                            f"printed without it)")
    several = len(dirs) > 1
    if several:
        from ..build import pick_device
        pick_device(args.device)   # (a device this machine lacks was refused after the header: retest 93)
    ds = Limited(data.build_dataset(args.dataset, args.split, root=args.data_root), args.max_samples)
    if several:
        for d in dirs:
            _check_adapter_for(d, ds, args)
    args.predictions_target = None
    if args.predictions:   # (before the run: a folder that is not there failed after it)
        args.predictions_target = check_output_file(args.predictions, "--predictions")
    if several and not args.json:   # each adapter's line as it is done: a later failure keeps them
        print(f"{args.dataset} [{args.split}] {len(ds)} images, {len(dirs)} adapters:", flush=True)
    results, d = [], None
    try:
        for d in dirs:
            r = _eval_one(d, ds, args, keep_correct=several)
            results.append(r)
            if several and not args.json:
                print(f"  {d}: {_result_line(r)}", flush=True)
                if args.per_class:
                    _print_per_class(r, indent="    ")
    except BaseException:
        if several and args.json:   # the finished ones (none: the first failed), and their pairs, as unfinished
            print(json_text({"dataset": args.dataset, "split": args.split, "n": len(ds), "incomplete": True,
                             "failed": d, "results": [{k: v for k, v in r.items() if k != "correct"}
                                                      for r in results],
                             "paired": [_paired(results[0], r) for r in results[1:]]}, indent=2), flush=True)
        raise
    paired = [_paired(results[0], r) for r in results[1:]]
    for r in results:
        r.pop("correct", None)
    if args.json:
        print(json_text(results[0] if not (several or args.json_list) else
                        {"dataset": args.dataset, "split": args.split, "n": results[0]["n"], "results": results,
                         "paired": paired}, indent=2))
    elif not several:
        r = results[0]
        print(f"{args.dataset} [{args.split}] {r['n']} images: {_result_line(r)}")
        if args.per_class:
            _print_per_class(r)
    else:
        print(f"paired with {dirs[0]} on the same images (McNemar's exact test; p not corrected for "
              f"{len(paired)} comparisons):" if len(paired) > 1 else
              f"paired with {dirs[0]} on the same images (McNemar's exact test):")
        for d, c in zip(dirs[1:], paired):
            said = [f"{n} of {what} images gave non-finite outputs, counted wrong"
                    for n, what in ((c["nonfinite"], "its"), (c["nonfinite_first"], "the first's")) if n]
            lo, hi = c["top1_diff_ci95"]
            print(f"  {d}: top-1 {c['top1_diff']:+.2f} points (95% CI {lo:+.2f} to {hi:+.2f}); right where the "
                  f"first is wrong: "
                  f"{c['only_this_right']}, the reverse: {c['only_first_right']}; {_p_text(c['mcnemar_p'])}"
                  + "".join(f"; {b}" for b in said))
    bad = [(d, r) for d, r in zip(dirs, results) if r["nonfinite"]]
    for d, r in bad:   # the accuracy over nan logits read as a number (argmax of nan)
        _err(f"{r['nonfinite']} of {r['n']} images gave non-finite outputs (nan or inf logits), counted as wrong"
             f"{f' ({d})' if several else ''}: the adapter's weights, or this input, overflow", "eval")
    return 1 if bad else 0


def check_output_file(path: str, option: str) -> str:
    """A file ``option`` names to write (whole or not at all: a temporary file renamed over it),
    checked before the work that makes it, so that a run is not lost to a name it cannot write;
    returns the path to write: a link's target (renamed over, the link became a plain file and its
    target kept the old text), else ``path``. A pipe, a device or a socket is refused (replaced by a
    plain file: /dev/stdout as root), as are a name ending in a separator and a folder that does not
    exist or cannot be written (retest 88)."""
    if path.endswith(("/", os.sep)):
        raise C.ConfigError(f"{option} {path}: ends in a folder separator; expected a file name")
    # (what the name leads to, links followed, before the link's text is resolved: a link to
    # /dev/stdout, a pipe, resolves to a /proc name that exists nowhere: retest 89)
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:   # (links in a loop: the last one was replaced by a plain file)
            raise C.ConfigError(f"{option} {path}: links that lead to each other in a loop, to no file") from None
        mode = None   # (not there yet)
    if mode is not None and stat.S_ISDIR(mode):
        raise C.ConfigError(f"{option} {path}: a folder; expected a file to write")
    if mode is not None and not stat.S_ISREG(mode):
        raise C.ConfigError(f"{option} {path}: not a regular file (a pipe, a device or a socket); svp writes a file "
                            f"whole, by renaming a finished one over the name, which would replace it")
    # the file the name reaches, every link on the way followed (a folder link then '..' is resolved
    # by the system from the link's target: checked and written as text, the check passed and the
    # write failed after the work: retest 90)
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise C.ConfigError(f"{option} {path}: its folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise C.ConfigError(f"{option} {path}: its folder {folder} cannot be written (permissions, or a read-only "
                            f"file system)")
    return target


def _write_predictions(path: str, rows, ds, label_names, pred_names) -> None:
    """Each image's row, in dataset order, written whole or not at all. ``item``: the image's
    file for data on disk, else its name in the dataset (``digits[test][3]``)."""
    import csv
    import io

    from ..io import atomic_write_text
    describe = getattr(getattr(ds, "ds", ds), "describe", None)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["index", "item", "label", "label_name", "pred", "pred_name", "prob", "correct"])
    for i, label, pred, prob in sorted(rows, key=lambda row: row[0]):
        w.writerow([i, describe(i) if describe else "", label, label_names[label] if label < len(label_names) else "",
                    "" if pred is None else pred, "" if pred is None or pred >= len(pred_names) else pred_names[pred],
                    "" if prob is None else f"{prob:.6g}", int(pred == label)])
    atomic_write_text(path, out.getvalue())


def _per_class(counts, hits, names) -> dict:
    """Each class's images and top-1 accuracy (%; None for a class without images here), and the
    mean of the accuracies over the classes with images ('mean_class_top1'; None if none has)."""
    rows = [{"class": str(name), "index": i, "n": n, "top1": 100.0 * h / n if n else None}
            for i, (name, n, h) in enumerate(zip(names, counts, hits))]
    seen = [row["top1"] for row in rows if row["n"]]
    return {"per_class": rows, "mean_class_top1": sum(seen) / len(seen) if seen else None,
            "classes_without_images": len(rows) - len(seen)}


def _print_per_class(r, indent: str = "") -> None:
    rows, absent = r["per_class"], r["classes_without_images"]
    if r["mean_class_top1"] is not None:
        print(f"{indent}mean per-class top-1 {r['mean_class_top1']:.2f}% over {len(rows) - absent} classes"
              + (f" ({absent} of {len(rows)} have no images here)" if absent else ""))
    width = max(len("class"), *(len(printable(row["class"])) for row in rows))
    print(f"{indent}  {'class':<{width}}  {'images':>7}  {'top-1':>7}")
    for row in rows:
        top1 = f"{row['top1']:6.2f}%" if row["n"] else "      -"
        print(f"{indent}  {printable(row['class']):<{width}}  {row['n']:>7}  {top1}")


def cmd_predict(args) -> int:
    import torch

    from ..data import DatasetError
    from ..peft.heads import top_classes
    from .evaluate import forward_in_chunks

    if args.topk < 1:
        raise C.ConfigError(f"--topk must be >= 1, got {args.topk}")
    _check_batch_size(args.batch_size)
    model, spec, dev = load_for_inference(args.adapter_dir, args.model, args.checkpoint, args.device, args.pretrained,
                                         args.random_init)
    precision = _precision(args.amp, dev)
    _note_assumptions(spec, args.adapter_dir, "predict", precision=precision)
    tf = _eval_transform(spec, args.adapter_dir)
    names = spec.class_names
    # batch by batch: a thousand images in one batch would hold a thousand images' activations.
    # Each batch's answers leave as plain numbers (and, as text, are printed) before the next
    # batch: a small tensor kept per batch among the freed activations pinned the heap around
    # it (+10 KB of resident memory per image, 160 MB at 16,000), and nothing was printed
    # until the last image, so a killed run lost every answer.
    images, unlisted, skipped, special = _images_of(args.images)
    if skipped:
        from ..data.base import IMG_EXTENSIONS
        _note(f"{len(skipped)} file(s) in the folders given skipped: not ending as an image file "
              f"({' '.join(IMG_EXTENSIONS)}); e.g. {skipped[0]} (name them to have them read)", "predict")
    if special:
        _note(f"{len(special)} entries named like images in the folders given skipped: not regular files (pipes, "
              f"devices, sockets), which reading would wait on; e.g. {special[0]}", "predict")
    out, failed, unreadable = [], 0, []
    autocast = precision.autocast
    with torch.no_grad(), runtime.held_heap(torch.device(dev).type == "cpu"):
        for i in range(0, len(images), args.batch_size):
            paths = images[i:i + args.batch_size]
            # an image that cannot be read is answered with its error, the others as usual: it
            # stopped the command, and with --json every image's answer was lost (QA 16e)
            xs, read, errors = [], [], {}
            for path in paths:
                if path in unlisted:
                    errors[path] = unlisted[path]
                    continue
                try:
                    xs.append(_open_image(path, tf))
                    read.append(path)
                except DatasetError as e:
                    errors[path] = str(e)
            unreadable += [errors[p] for p in paths if p in errors]   # (each time a path is named)
            answered = {}
            if xs:
                with autocast():
                    logits = forward_in_chunks(model, torch.stack(xs).to(dev))
                values, indices = (t.tolist() for t in top_classes(logits.float().softmax(dim=1), args.topk))
                finite = torch.isfinite(logits).all(dim=1).tolist()
                del xs, logits
                # an image whose logits are not all finite has no answer: topk ranked nan
                # probabilities arbitrarily (and --json wrote a bare NaN)
                answered = {path: {"image": path, "top": [{"class": names[j], "index": int(j), "prob": float(v)}
                                                          for v, j in zip(pv, pi)]} if ok else
                            {"image": path, "top": [], "error": NONFINITE}
                            for path, pv, pi, ok in zip(read, values, indices, finite)}
                failed += finite.count(False)
            answers = [answered.get(path) or {"image": path, "top": [], "error": errors[path]} for path in paths]
            if args.json:
                out += answers   # one JSON document, printed once every image has its answer
                continue
            if args.jsonl:   # (one line each: json_text escapes a line break inside a name)
                print("\n".join(json_text(o) for o in answers), flush=True)
                continue
            for o in answers:
                # (paths and errors escaped as the class names: a file 'a\nb.png' was two records, and
                # an escape sequence in a name reached the terminal: review 69; --json keeps them whole)
                print(printable(o["image"]))
                if "error" in o:
                    print(f"  {printable(o['error'])}")
                for rank, t in enumerate(o["top"], 1):
                    # (a class name from the adapter's file, escape sequences and all: printable)
                    print(f"  {rank}. {printable(t['class'])}  {100 * t['prob']:.2f}%")
            sys.stdout.flush()
    if args.json:
        print(json_text(out, indent=2))
    if unreadable:   # (the input's fault: exit 2, as a user's mistake)
        # (answers for folders, not images; a pipe named on its own is an image not read: retest 89)
        folders = sum(1 for path in images if path in unlisted and os.path.isdir(path))
        files, bad = len(images) - folders, len(unreadable) - folders
        if len(images) > 1:
            said = ([f"{bad} of {files} images could not be read"] if bad else []) + (
                [f"{folders} folder(s) gave no images"] if folders else [])
            others = " (the others are answered)" if len(unreadable) < len(images) else ""
            _err(f"{'; '.join(said)}{others}; the first: {unreadable[0]}", "predict")
        else:
            _err(unreadable[0], "predict")
    if failed:
        _err(f"{failed} of {len(images)} images: {NONFINITE}", "predict")
    return 2 if unreadable else 1 if failed else 0


NONFINITE = "no prediction: the outputs are not finite (nan or inf logits); the adapter's weights, or this input, overflow"


def cmd_sweep(args) -> int:
    # the command's own console handler, for as long as it runs (one left behind would write to
    # the stderr of the first call: a closed stream when called again from Python or a test)
    sweep_log = logging.getLogger("svp.engine.sweep")
    sweep_log.setLevel(logging.INFO)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("sweep: %(message)s"))
    sweep_log.addHandler(h)
    try:
        return _sweep(args)
    finally:
        sweep_log.removeHandler(h)


def _sweep(args) -> int:
    from .sweep import sweep

    overrides = list(args.overrides or [])
    for flag, key in (("data_root", "data.root"), ("model", "model.name"), ("checkpoint", "model.checkpoint")):
        v = getattr(args, flag)
        if v is not None:
            overrides.insert(0, f"{key}={C.quoted(v)}")
    if args.checkpoint is not None:   # (the runs' source of weights, whatever a -c file says, as train's flags)
        overrides[1:1] = ["model.pretrained=false", "model.random_init=false"]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise C.ConfigError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    datasets = [d.strip() for d in args.datasets.split(",")] if args.datasets else None
    for flag, values in (("--methods", methods), ("--seeds", seeds), ("--datasets", datasets or [None])):
        if not values:
            raise C.ConfigError(f"{flag} {getattr(args, flag[2:])!r}: expected at least one value")
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:  # the same run twice: duplicate rows, and a spread over copies
            raise C.ConfigError(f"{flag} names {', '.join(twice)} more than once")
    if args.jobs is not None and args.jobs < 1:
        raise C.ConfigError(f"--jobs {args.jobs}: expected a positive number of worker processes")
    from .signals import EXIT_INTERRUPTED, TrainingStopped
    from .tune import StoppedAfterRuns
    try:
        out_dir = args.output or os.path.join("sweeps", args.suite)
        out = sweep(args.suite, methods, seeds, out_dir, datasets,
                    args.config, overrides, args.fail_fast, args.tune, args.tune_refit, args.jobs)
    except ValueError as e:
        if isinstance(e, C.ConfigError):
            raise
        raise C.ConfigError(str(e)) from None
    except TrainingStopped as e:
        if e.code == EXIT_INTERRUPTED:   # Ctrl-C / SIGTERM inside a run: its resume point is saved
            # (the run's own advice, `svp train --resume`, left out: the sweep's command resumes it)
            why = re.split(r"\. Continue with|; continue from", str(e))[0]
            _err(f"sweep interrupted ({e.__class__.__name__}: {why}); run the "
                 f"same svp sweep command again: finished runs are reused, the interrupted one resumes", "sweep")
        else:   # --fail-fast: a run diverged or stopped on its own (rerun, it would again: review 55)
            _err(f"run {printable(e.run_dir or '?')} stopped the sweep (--fail-fast): {e}", "sweep")
        return e.code
    except StoppedAfterRuns as e:   # (held by the runner until the tables were written)
        _err(f"sweep stopped: {e}; its tables are written (in {printable(out_dir)}: results.csv, "
             f"results.md); the same svp sweep command reuses every run and prints them", "sweep")
        return 130
    except KeyboardInterrupt as e:  # --jobs N: the workers' runs stopped (svp.engine.tune.Runner)
        _err(f"sweep interrupted ({str(e).split(';')[0] or 'KeyboardInterrupt'}); run the same svp sweep "
             f"command again: finished runs are reused, interrupted ones resume from their resume points", "sweep")
        return 130
    print(open(out["markdown"], encoding="utf-8").read())
    print(f"wrote {out['csv']} and {out['markdown']}" + (f" and {out['json']}" if out.get("json") else ""))
    # a failed grid point of a tuned sweep is an outcome (it cannot be chosen; docs/training.md),
    # not a failure of the sweep, whose reported runs are the final ones (review 55: it exited 1)
    reported = [r for r in out["rows"] if r.get("role") != "grid"]
    failed = sum(r["status"] == "failed" for r in reported)
    grid_failed = sum(r["status"] == "failed" and r.get("role") == "grid" for r in out["rows"])
    if grid_failed:
        print(f"sweep: {grid_failed} grid run(s) failed and could not be chosen (the selection table says "
              f"which; {os.path.basename(out['csv'])}'s error column why)", file=sys.stderr)
    if failed:
        _err(f"{failed} of {len(reported)} run(s) failed; {os.path.basename(out['csv'])}'s error column says why",
             "sweep")
    return 1 if failed else 0
