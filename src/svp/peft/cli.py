"""``svp convert-official-svp``: import an official SVP checkpoint as an adapter directory."""
from __future__ import annotations

import contextlib
import json
import signal

from ..errors import ConfigError, SVPError
from ..io import user_path


def _run(args) -> int:
    from .convert import _read_class_names, convert_official_svp

    try:
        model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
    except ValueError as e:
        raise ConfigError(f"--model-kwargs is not valid JSON ({e}): {args.model_kwargs!r}") from None
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise ConfigError(f"--model-kwargs must be a JSON object of model arguments, got {args.model_kwargs!r}")
    try:
        with _terminate_as_interrupt():
            peft = convert_official_svp(
                args.checkpoint, args.model, args.shared_layers, args.prompt_hidden, args.num_classes, args.out,
                simam=args.simam, two_layer_head=args.two_layer_head, backbone_checkpoint=args.backbone_checkpoint,
                class_names=_read_class_names(args.class_names), model_kwargs=model_kwargs, overwrite=args.overwrite,
                class_names_source=f"--class-names {args.class_names}")
    except SVPError:
        raise  # one line and exit 2 from svp.cli.main
    except (OSError, ValueError, RuntimeError) as e:  # an unreadable file, a checkpoint that does not fit
        raise ConfigError(str(e)) from None
    print(peft.trainable_report())
    print(f"wrote {args.out} (base model hash {peft.base_hash})")
    return 0


@contextlib.contextmanager
def _terminate_as_interrupt():
    """A SIGTERM while converting stops it as a Ctrl-C does, so that the folder it was making is
    removed (the default action killed the process and left it: review 57)."""
    from ..io import sigterm_as_interrupt
    old = sigterm_as_interrupt()
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def register(subparsers):
    p = subparsers.add_parser(
        "convert-official-svp",
        help="turn an official SVP training checkpoint into an adapter directory (compat='official')",
        description="Read an official SVP checkpoint ({'model': backbone + prompt_* + head}, loaded with "
                    "weights_only=True) and write adapter.safetensors + adapter_config.json. Load it with "
                    "svp.load_adapter(model, OUT) on a model holding the same backbone weights.")
    p.add_argument("checkpoint", metavar="CKPT", type=user_path, help="official SVP checkpoint (.pth or .safetensors)")
    p.add_argument("--model", required=True, help="backbone architecture, e.g. vim_small_patch16_224")
    p.add_argument("--shared-layers", type=int, required=True, help="S, layers per Cross-prompter group")
    p.add_argument("--prompt-hidden", type=int, required=True, help="r, the Inner prompter's width (64 in the script)")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--out", required=True, type=user_path, help="adapter directory to write")
    p.add_argument("--simam", action="store_true", help="the checkpoint was trained with --input_relu True (SimAM)")
    p.add_argument("--two-layer-head", action="store_true", help="head is Linear(D, D/2) -> Linear(D/2, C)")
    p.add_argument("--backbone-checkpoint", default=None, type=user_path,
                   help="official Vim checkpoint to take the backbone from (must equal the one in CKPT)")
    p.add_argument("--class-names", default=None, type=user_path,
                   help="text file, one class name per line (or a JSON list)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the adapter in --out (by default --out must be new or empty)")
    p.add_argument("--model-kwargs", default=None, help='JSON dict of extra model arguments, e.g. \'{"img_size": 384}\'')
    p.set_defaults(func=_run)
