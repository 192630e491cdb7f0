"""``svp serve``: one backbone, every adapter folder of --adapters, over HTTP."""
from __future__ import annotations

import os
import sys

from ..errors import ConfigError
from ..io import printable, user_path
from ..viz.cli import DefaultsFormatter   # (each option's default, where its help does not say it)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve many adapters from one frozen backbone over HTTP (mixed-adapter batches, web page)",
        description="Serve every adapter folder under --adapters (each subfolder is one adapter, named by the "
                    "folder) from one frozen backbone: POST /v1/predict, GET /v1/adapters, POST "
                    "/v1/adapters/reload, GET /healthz, GET /metrics, and a web page at /. Needs the 'serve' "
                    "extra: pip install 'svp-vim[serve]'. See docs/serving.md.",
        formatter_class=DefaultsFormatter)
    p.add_argument("--adapters", required=True, type=user_path, metavar="DIR",
                   help="folder whose subfolders are adapters")
    p.add_argument("--model", default=None,
                   help="backbone timm name (default: from the adapters' backbone.json / base_model_name)")
    p.add_argument("--checkpoint", default=None, type=user_path,
                   help="backbone checkpoint file (.pth or .safetensors; Google's .npz for a ViT)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="a Host name the server answers to (repeat). Default: on a loopback --host, the "
                        "loopback names (localhost, 127.0.0.1, ::1) only, against DNS rebinding; on any "
                        "other --host, every name")
    p.add_argument("--window-ms", type=float, default=5.0,
                   help="how long a request waits for others to batch with")
    p.add_argument("--max-batch", type=int, default=16,
                   help="the most samples in one backbone pass (per adapter with --batching per_adapter)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="request body limit")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="decoded image size limit")
    p.add_argument("--batching", choices=("mixed", "per_adapter"), default="mixed",
                   help="mixed: any mix of adapters in one batch; per_adapter: one pass per adapter (comparison)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for inference: torch's, which svp's CPU kernels follow (default: one per core)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                   help="on Ctrl-C / SIGTERM, how long in-flight requests may take to finish before they are "
                        "cancelled (a client that stalls mid-upload cannot hold the server); a second "
                        "signal stops it at once")
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast for the large products, the scan in float32 (as svp predict --amp; "
                        "pays on a CPU with avx512_bf16 or amx_bf16, see svp doctor and docs/training.md)")
    p.set_defaults(func=run)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# what --allowed-host takes: [v6 address][:port], a bare v6 address (two colons or more), a name or
# v4 address[:port]; no scheme, path, user or space
_HOST_FORMS = (r"\[[0-9A-Fa-f:.]+\](:\d+)?", r"[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*", r"[^\s/@:\[\]]+(:\d+)?")


def allowed_hosts(host: str, given):
    """The Host names served: those given (with the bind address), else on a loopback address
    the loopback names, else any (None)."""
    import ipaddress
    if given:
        # as the Host header is compared, without port or brackets: example.com:8000 and [::1]
        # were taken as given and never matched (403s naming the very name)
        import re

        from .app import _host_name
        names = []
        for g in given:
            text = g.strip()
            if not any(re.fullmatch(form, text) for form in _HOST_FORMS):
                raise ConfigError(f"--allowed-host {g!r}: expected a host name or address (e.g. svp.lan, "
                                  f"svp.lan:8000, [::1]), without a scheme or a path")
            names.append(_host_name(text))
        return tuple(dict.fromkeys([*names, host.strip("[]")]))
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    return tuple(dict.fromkeys([*LOOPBACK_NAMES, host.strip("[]")])) if loopback else None


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown (the process then dies by the
        signal); the in-flight requests have finished by then, so exit 0 instead. A second signal
        stops it at once, SIGTERM as well as SIGINT: uvicorn forces the exit on a second SIGINT
        only, and a second `kill` (or a supervisor's) waited out the whole --shutdown-timeout
        (review49)."""

        def handle_exit(self, sig, frame):
            again = self.should_exit
            super().handle_exit(sig, frame)
            if again:
                self.force_exit = True
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return Server


def run(args) -> int:
    try:
        import uvicorn  # noqa: F401
        import starlette  # noqa: F401
        import prometheus_client  # noqa: F401
        import python_multipart  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"svp serve needs the 'serve' extra ({e.name} is missing): "
                          f"pip install 'svp-vim[serve]'") from None
    import torch

    from .app import ServeConfig, build_app

    # each named alone (one message listed all four); nan and inf refused (--window-ms inf was
    # accepted and a lone request never answered, --max-upload-mb nan a traceback)
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch {args.max_batch}: expected >= 1")
    if not 0 <= args.window_ms <= 60_000:
        raise ConfigError(f"--window-ms {args.window_ms}: expected milliseconds in 0..60000 (a lone request "
                          f"waits this long for others)")
    if not (0 < args.max_upload_mb < float("inf") and int(args.max_upload_mb * (1 << 20)) >= 1):
        raise ConfigError(f"--max-upload-mb {args.max_upload_mb}: expected a size in MB of at least one byte")
    if args.max_pixels <= 0:
        raise ConfigError(f"--max-pixels {args.max_pixels}: expected > 0")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: expected 0-65535")
    if not 0 <= args.shutdown_timeout < float("inf"):
        raise ConfigError(f"--shutdown-timeout {args.shutdown_timeout}: expected seconds >= 0")
    if args.threads is not None:
        from ..compat import threads_problem
        problem = threads_problem(args.threads)
        if problem:
            raise ConfigError(problem)
        torch.set_num_threads(args.threads)  # svp's CPU kernels follow it, in the inference thread too
    from PIL import Image
    if Image.MAX_IMAGE_PIXELS and args.max_pixels > Image.MAX_IMAGE_PIXELS:
        # Pillow's own decompression-bomb limit (89 M pixels, refused at twice that) is the
        # server's: a --max-pixels above it was refused naming Pillow's number
        Image.MAX_IMAGE_PIXELS = args.max_pixels
    cfg = ServeConfig(window_s=args.window_ms / 1000.0, max_batch=args.max_batch,
                      max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_pixels=args.max_pixels,
                      batching=args.batching, allowed_hosts=allowed_hosts(args.host, args.allowed_host))
    if args.amp:
        from ..compat import cpu_bf16_instructions, no_bf16_warning
        found = cpu_bf16_instructions()
        if not found and not torch.cuda.is_available():
            print(f"svp serve: --amp: {no_bf16_warning(found)}", file=sys.stderr)
    app, report = build_app(args.adapters, args.model, args.checkpoint, cfg, amp=args.amp)
    for name, why in report["refused"].items():
        print(f"svp serve: refused adapter {printable(name)}: {printable(why)}", file=sys.stderr)
    if not report["loaded"]:
        raise ConfigError(f"{args.adapters}: no adapter could be loaded")
    other = _other_precision(args.adapters, report["loaded"], "bfloat16" if args.amp else None)
    if other:   # (eval and predict say it too: review 83)
        print(f"svp serve: note: {len(other)} adapter(s) ({_some(other)}) were evaluated by their runs "
              f"{'in float32 or float16 autocast' if args.amp else 'under train.amp'}, served here "
              f"{'under bfloat16 autocast (--amp)' if args.amp else 'in float32'}: their answers differ in the "
              f"last digits from their runs', and a few images may change class", file=sys.stderr)
    b = report["backbone"]
    print(f"svp serve: backbone {b['model']}{' + ' + b['checkpoint'] if b['checkpoint'] else ''}"
          f"{' (bfloat16 autocast)' if args.amp else ''}, "
          f"{len(report['loaded'])} adapters ({_some(report['loaded'])}), "
          f"http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    import logging

    # the multipart parser logs each malformed upload as a warning on stderr before it raises, and
    # the client is answered 400 with the same words: the server's console holds only its own lines
    for name in ("python_multipart", "multipart"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import uvicorn
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=args.shutdown_timeout)
    # (after Config, which sets up uvicorn's loggers) a second Ctrl-C or SIGTERM makes uvicorn exit at once
    # and cancel the tasks it did not wait for, the application's lifespan among them, which it
    # then logged as a ~30-line CancelledError traceback: that cancellation is the exit asked for
    logging.getLogger("uvicorn.error").addFilter(_forced_exit_cancellation)
    _server_class()(config).run()
    return 0


def _forced_exit_cancellation(record) -> bool:
    """False for uvicorn's report of a cancelled lifespan: starlette sends its traceback as text
    ("lifespan.shutdown.failed"); uvicorn's own handler logs the exception."""
    import asyncio
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, asyncio.CancelledError):
        return False
    text = str(record.msg)
    return not (text.startswith("Traceback") and text.rstrip().endswith("CancelledError"))


def _other_precision(root: str, names, dtype) -> list:
    """The adapters whose backbone.json records another precision than the server's, ``dtype``
    ("bfloat16" under --amp, None for float32; svp.build.other_precision). (Read again after
    build_app loaded them: its report names the folders, not their records.)"""
    import json

    from ..build import other_precision
    out = []
    for name in names:
        try:
            with open(os.path.join(root, name, "backbone.json"), encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError):   # (loaded without one, or replaced since: nothing to compare)
            continue
        if other_precision(info, dtype):
            out.append(name)
    return out


def _some(names, shown: int = 10) -> str:
    """The first names, then how many more (300 adapters made one start-up line of 300 names:
    GET /v1/adapters lists them all)."""
    names = list(names)
    more = len(names) - shown
    return ", ".join(map(printable, names[:shown])) + (f", and {more} more (GET /v1/adapters)" if more > 0 else "")
