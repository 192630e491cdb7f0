"""The HTTP server: a Starlette ASGI app (run by uvicorn) over a :class:`MultiAdapterModel`.

Starlette rather than FastAPI: the endpoints take a multipart form *or* a JSON body on the
same path and every bad input must become one 4xx JSON error written by us, so FastAPI's
pydantic validation layer would be bypassed anyway; Starlette is the ASGI toolkit FastAPI
is built on, with one small dependency set (anyio), and uvicorn is its reference server.

Dynamic batching: every predict request decodes its image (small ones on the event loop,
larger ones in a decode thread; see ServeConfig.inline_decode_pixels), then puts
(tensor, adapter, future) on an asyncio queue. One batcher task takes the first waiting
request, collects more for at most ``window_s`` (or until ``max_batch``), and runs them as
one mixed-adapter batch in the single inference thread; each request awaits its own
future. Requests that arrive while a batch runs wait in the queue and form the next one.
Reloading adapters and drawing gate maps run in the same thread, so they never overlap a
batch.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import functools
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..errors import AdapterError, SVPError
from ..peft.heads import top_classes
from ..peft.base import check_family
from ..peft.io import (ADAPTER_CONFIG, BACKBONE_SPEC, AdapterFiles, adapter_files_stamp, read_adapter_config,
                       read_adapter_files)
from .model import MultiAdapterModel, check_adapter_dir

_log = logging.getLogger("svp.serve")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
GATE_QUANTITIES = ("update", "forget", "propagation")


class RequestError(SVPError):
    """A bad request; ``status`` is the HTTP status it is answered with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class _AdapterRemoved(RequestError):
    """A request accepted for an adapter that a reload removed before it ran: 404 (in a batch: it
    never reached the backbone)."""

    def __init__(self, name: str):
        super().__init__(f"adapter {name!r} was removed", 404)


DRAIN_S = 5.0   # (read_body's drain: how long a refused body's rest is read for)


@dataclass
class ServeConfig:
    window_s: float = 0.005          # how long the batcher waits for more requests after the first
    # the most samples in one backbone pass: 16 (was 8) because on the 2-core load test the mini
    # Vim's cost per sample still fell from 8 to 16 (8.6 -> 6.1 CPU ms) and one pass then takes
    # every waiting request of 16 clients (docs/serving.md); a lone request still waits at most
    # window_s
    max_batch: int = 16
    max_upload_bytes: int = 10 << 20  # request body limit (image file or JSON with base64)
    max_pixels: int = 40_000_000     # decoded image limit (decompression bombs)
    max_topk: int = 100
    queue_limit: int = 1024          # requests waiting beyond this are refused with 503
    # Images of at most this many pixels (from the header) are decoded on the event loop: for a
    # small image (a 32x32 PNG decodes and transforms in ~0.1 ms) the hand-off to a thread and
    # back costs more CPU than the work; larger ones go to a decode thread so that they never
    # stall the loop (PIL's decoders and resizes release the GIL there).
    inline_decode_pixels: int = 64 * 64
    decode_threads: int = 2
    # 'mixed': one batch for any mix of adapters; 'per_adapter': a collected batch is split into
    # one pass per adapter (what serving each adapter as its own model gives; for comparison)
    batching: str = "mixed"
    # Host header names accepted (None: any). svp serve on a loopback address accepts loopback
    # names only: a web page whose own name resolves to 127.0.0.1 (DNS rebinding) is same-origin
    # with the server in the browser's eyes, and could read its answers otherwise.
    allowed_hosts: Optional[Tuple[str, ...]] = None
    # a request body that sends nothing for this long is answered 408: a client that stalls
    # half-way held its connection (a file descriptor) for as long as it stayed open
    body_idle_s: float = 30.0
    # ... and one that trickles (a byte every 29 s) is answered 408 once it is slower on the whole
    # than this many bytes a second, after body_idle_s of grace (review41: it held its
    # connection for as long as it liked)
    body_min_rate: float = 16384.0

    def __post_init__(self):
        if self.batching not in ("mixed", "per_adapter"):
            raise ValueError(f"batching={self.batching!r}; expected 'mixed' or 'per_adapter'")


# -- adapters folder -----------------------------------------------------------------------
def _check_recipe(files: AdapterFiles, recipe: Optional[str], normalization: Optional[tuple] = None) -> None:
    if recipe is None:
        return
    from ..build import read_backbone_spec
    from ..data.transforms import adapter_normalization, same_statistics
    # without backbone.json an adapter was made with the default recipe (svp.build.adapter_spec)
    raw = files.data[BACKBONE_SPEC]
    extra = {} if raw is None else read_backbone_spec(files.path(BACKBONE_SPEC), raw).extra
    own = extra.get("recipe", "svp")
    if own != recipe:
        raise AdapterError(f"{files.directory}: trained with the image recipe {own!r}, but this server "
                           f"prepares every image with {recipe!r} (its first adapter's); serve "
                           f"it from a server of its own")
    mine = adapter_normalization(extra, files.directory)
    if normalization is not None and not same_statistics(mine, normalization):
        raise AdapterError(f"{files.directory}: trained on images normalised with mean {list(mine[0])} and std "
                           f"{list(mine[1])}, but this server normalises every image with mean "
                           f"{list(normalization[0])} and std {list(normalization[1])} (its first adapter's, "
                           f"data.normalize); serve it from a server of its own")


def sync_adapters(model: MultiAdapterModel, root: str, stamps: Dict[str, tuple],
                  recipe: Optional[str] = None, normalization: Optional[tuple] = None) -> dict:
    """Make ``model``'s adapters those of the subfolders of ``root``: load new or changed ones,
    drop vanished ones. Returns {"loaded", "unchanged", "removed", "refused": {name: why}}.
    With ``recipe`` (the server's one preprocessing; ``normalization``: its (mean, std)), an adapter
    trained with another is refused: its answers would come from images prepared in a way it never saw."""
    if not os.path.isdir(root):
        raise AdapterError(f"adapters folder {root!r} does not exist")
    report = {"loaded": [], "unchanged": [], "removed": [], "refused": {}}
    present = []
    try:
        names = sorted(os.listdir(root))
    except OSError as e:   # (unreadable: the adapters served stay as they are)
        raise AdapterError(f"adapters folder {root!r}: cannot read it ({e.strerror or e})") from None
    for name in names:
        if name.startswith("."):
            continue
        full = os.path.join(root, name)
        if not (os.path.isdir(full) or os.path.islink(full)):
            continue
        present.append(name)
        try:
            real = check_adapter_dir(root, name)
            if stamps.get(name) == (real, adapter_files_stamp(real)) and name in model.adapters:
                report["unchanged"].append(name)
                continue
            # its files read once, as one state of one folder, and loaded from memory: a folder
            # replaced or swapped while it loaded gave one adapter's weights under the other's
            # class names; a file copied over a memory-mapped one killed the server (SIGBUS)
            files = read_adapter_files(real)
            # (another family's adapter first said so, not by its recipe or statistics: retest 98)
            check_family(read_adapter_config(real, files.data[ADAPTER_CONFIG]), real, model.backbone,
                         "the served backbone")
            _check_recipe(files, recipe, normalization)
            model.add_adapter(name, real, files)
            stamps[name] = (real, files.stamp)
            report["loaded"].append(name)
        except Exception as e:  # any folder that cannot be served is refused, never the reload itself
            report["refused"][name] = str(e) if isinstance(e, (SVPError, OSError)) else f"{type(e).__name__}: {e}"
            if name in model.adapters:  # a broken replacement must not keep serving stale weights
                model.remove_adapter(name)
                stamps.pop(name, None)
    for name in sorted(set(model.adapters) - set(present)):
        model.remove_adapter(name)
        stamps.pop(name, None)
        report["removed"].append(name)
    return report


# -- images ------------------------------------------------------------------------------------
SERVED_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "ICO", "TGA")


@functools.lru_cache(maxsize=None)
def _served_formats() -> tuple:
    from PIL import Image

    Image.init()  # every plugin registered (Image.open with formats= looks them up)
    return tuple(f for f in SERVED_FORMATS if f in Image.OPEN)


def open_image(data: bytes, cfg: ServeConfig):
    """Bytes of an image file -> a PIL image whose header was read and checked (size limits),
    not yet decoded."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError("the image is empty (0 bytes)")
    if len(data) > cfg.max_upload_bytes:
        raise RequestError(f"the image is {len(data)} bytes; the limit is {cfg.max_upload_bytes}", 413)
    try:  # raster formats only: EPS would hand a client's PostScript to Ghostscript where it is installed
        im = Image.open(io.BytesIO(data), formats=_served_formats())
    except UnidentifiedImageError:
        raise RequestError(f"the upload is not an image of a served format ({', '.join(SERVED_FORMATS)})",
                           415) from None
    except Image.DecompressionBombError as e:
        raise RequestError(f"the image is too large: {e}", 413) from None
    except (OSError, SyntaxError, ValueError) as e:   # a header cut short: Pillow's reader ran out
        raise RequestError(f"the image cannot be decoded (truncated or corrupt): {e}") from None
    w, h = im.size
    if w * h > cfg.max_pixels:
        raise RequestError(f"the image is {w}x{h} = {w * h} pixels; the limit is {cfg.max_pixels}", 413)
    return im


def check_resized(size, transform: Callable, cfg: ServeConfig) -> None:
    """The image as the transform's resize makes it, within ``max_pixels`` too: the shorter side
    goes to the model's size, so a thin image grows by its aspect ratio (a 370-byte 300000 x 1 PNG
    took the server from 1 to 3 GB)."""
    from ..data.transforms import resized_pixels

    n = resized_pixels(transform, *size)
    if n > cfg.max_pixels:
        raise RequestError(f"the image is {size[0]}x{size[1]}: resized for the model (its shorter side to the "
                           f"model's size) it would be {n} pixels; the limit is {cfg.max_pixels} (crop an image "
                           f"this elongated first)", 413)


def finish_image(im, transform: Callable) -> torch.Tensor:
    """Decode an ``open_image`` result and apply ``transform`` -> model input (C, H, W)."""
    from PIL import Image

    from ..data.base import to_rgb
    from ..errors import DatasetError

    try:
        im.load()
        # as training and svp predict read images: 16-bit and float pixels scaled, not clipped at 255
        rgb = to_rgb(im, "the image")
    except Image.DecompressionBombError as e:
        raise RequestError(f"the image is too large: {e}", 413) from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise RequestError(f"the image cannot be decoded (truncated or corrupt): {e}") from None
    except DatasetError as e:  # a pixel layout no RGB can be made of
        raise RequestError(str(e), 415) from None
    return transform(rgb)


def decode_image(data: bytes, cfg: ServeConfig, transform: Callable) -> torch.Tensor:
    """Bytes of an image file -> model input (C, H, W)."""
    im = open_image(data, cfg)
    check_resized(im.size, transform, cfg)
    return finish_image(im, transform)


class FastEvalTransform:
    """The same tensors as an evaluation transform ``Compose([PIL resize/crop steps..., ToTensor(),
    Normalize(mean, std)])``, cheaper per image: the PIL steps run as they are, and ToTensor +
    Normalize become one table lookup per channel. An 8-bit pixel has 256 values, so the table
    holds torchvision's own results for each of them (computed once with ToTensor's division
    and Normalize's arithmetic), and the output is bit-identical; per request this saves the
    small torch ops (to float, divide, subtract, divide) that cost more than the arithmetic on
    the tiny images of small models. Any other transform is used unchanged (``wrap``)."""

    def __init__(self, geometric: List[Callable], normalize):
        import numpy as np

        self.geometric, self.normalize = geometric, normalize
        levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256)
        from torchvision.transforms import functional as TF
        self.lut = normalize(TF.to_tensor(levels.permute(1, 2, 0).numpy())).reshape(3, 256).numpy().copy()
        self._chan = np.arange(3).reshape(3, 1, 1)

    @classmethod
    def wrap(cls, transform: Callable) -> Callable:
        from torchvision import transforms as T

        steps = getattr(transform, "transforms", None)
        if (not isinstance(transform, T.Compose) or len(steps) < 2 or not isinstance(steps[-2], T.ToTensor)
                or not isinstance(steps[-1], T.Normalize) or steps[-1].inplace
                or not all(isinstance(t, (T.Resize, T.CenterCrop)) for t in steps[:-2])):
            return transform
        return cls(steps[:-2], steps[-1])

    def __call__(self, rgb) -> torch.Tensor:
        import numpy as np

        for t in self.geometric:
            rgb = t(rgb)
        if rgb.mode != "RGB":  # the table is for 8-bit RGB; anything else goes the long way
            from torchvision.transforms import functional as TF
            return self.normalize(TF.to_tensor(rgb))
        return torch.from_numpy(self.lut[self._chan, np.asarray(rgb).transpose(2, 0, 1)])


def _topk(logits: torch.Tensor, classes: List[str], k: int) -> List[dict]:
    values, indices = top_classes(logits.float().softmax(-1), k)
    return [{"class": classes[i], "index": int(i), "prob": float(p)}
            for p, i in zip(values.tolist(), indices.tolist())]


# -- batching ----------------------------------------------------------------------------------
class Batcher:
    """Collects requests into mixed-adapter batches (see the module docstring)."""

    def __init__(self, run: Callable, executor, cfg: ServeConfig, metrics, n_adapters: Callable = lambda: 1):
        self.run = run
        self.n_adapters = n_adapters
        self.executor = executor
        self.cfg = cfg
        self.metrics = metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self._task: Optional[asyncio.Task] = None
        self._closing = False

    def start(self):
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self):
        """Finish what is queued, then stop."""
        self._closing = True
        await self.queue.put(None)
        if self._task is not None:
            try:
                await self._task
            except asyncio.CancelledError:
                # a forced exit (a second Ctrl-C: uvicorn cancels every task) cancelled the loop,
                # and the requests it held are dropped with it: a stop, not an error (uvicorn
                # printed a CancelledError traceback from the lifespan)
                if not self._task.cancelled():
                    raise   # this coroutine itself was cancelled

    async def submit(self, x: torch.Tensor, name: str):
        if self._closing:
            raise RequestError("the server is shutting down", 503)
        if self.queue.qsize() >= self.cfg.queue_limit:
            raise RequestError(f"too many requests waiting ({self.queue.qsize()}); retry later", 503)
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((x, name, fut))
        return await fut

    async def _loop(self):
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            item = await self.queue.get()
            if item is None:
                break
            batch = [item]
            deadline = loop.time() + self.cfg.window_s
            # per_adapter: up to max_batch requests *of each adapter*, as separate models would batch
            limit = self.cfg.max_batch * (self.n_adapters() if self.cfg.batching == "per_adapter" else 1)
            while len(batch) < limit:
                try:
                    nxt = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(self.queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            live = [b for b in batch if not b[2].done()]  # a client that went away cancelled its future
            if not live:
                continue
            if self.cfg.batching == "mixed":
                groups = [live]
            else:
                groups = []
                for n in dict.fromkeys(b[1] for b in live):
                    mine = [b for b in live if b[1] == n]
                    groups += [mine[i:i + self.cfg.max_batch] for i in range(0, len(mine), self.cfg.max_batch)]
            for group in groups:
                await self._run_group(loop, group)

    async def _run_group(self, loop, group):
        try:
            results = await loop.run_in_executor(self.executor, self.run,
                                                 [b[0] for b in group], [b[1] for b in group])
        except Exception as e:  # a bug: every request of the batch gets it
            _log.exception("batch of %d failed", len(group))
            results = [e] * len(group)
        # what reached the backbone: the requests of an adapter removed meanwhile were counted
        # as a batch (of 1 where all of it was, by a 404 after a reload)
        ran = sum(not isinstance(r, _AdapterRemoved) for r in results)
        if ran:
            self.metrics["batch_size"].observe(ran)
        for (_, _, fut), res in zip(group, results):
            if fut.done():
                continue
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)


def _run_batch(model: MultiAdapterModel):
    """Each request's (logits, class names), both of the adapter that ran it: a reload (on the same
    thread, so never within a batch) that replaced or dropped the adapter before the answer was
    written gave the old weights' logits the new class names, or digits."""
    def run(xs: List[torch.Tensor], names: List[str]):
        # An adapter removed by a reload after the request was accepted fails that request only.
        ok = [i for i, n in enumerate(names) if n in model.adapters]
        out: List[object] = [_AdapterRemoved(n) for n in names]
        if not ok:
            return out
        classes = {n: model.adapters[n].class_names for n in dict.fromkeys(names[i] for i in ok)}
        try:
            for i, lg in zip(ok, model(torch.stack([xs[i] for i in ok]), [names[i] for i in ok])):
                out[i] = (lg, classes[names[i]])
        except Exception:
            # One adapter that cannot run these inputs must not fail the others: rerun per adapter.
            _log.exception("mixed batch failed; running its adapters one by one")
            for name in classes:
                mine = [i for i in ok if names[i] == name]
                try:
                    for i, lg in zip(mine, model(torch.stack([xs[i] for i in mine]), [name] * len(mine))):
                        out[i] = (lg, classes[name])
                except Exception as e:
                    for i in mine:
                        out[i] = e
        return out
    return run


# -- the app -------------------------------------------------------------------------------------
def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    return {
        "registry": reg,
        "requests": Counter("svp_requests", "HTTP requests answered", ["endpoint", "code"], registry=reg),
        "errors": Counter("svp_request_errors", "requests answered with an error (4xx/5xx)",
                          ["endpoint", "code"], registry=reg),
        "predictions": Counter("svp_predictions", "images classified", ["adapter"], registry=reg),
        "batch_size": Histogram("svp_batch_size", "samples per backbone batch", registry=reg,
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128)),
        "latency": Histogram("svp_request_latency_seconds", "predict latency from request to answer",
                             registry=reg, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)),
        "adapters": Gauge("svp_adapters", "adapters loaded", registry=reg),
    }


def create_app(model: MultiAdapterModel, adapters_dir: Optional[str], transform: Callable,
               cfg: Optional[ServeConfig] = None, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
               stamps: Optional[Dict[str, tuple]] = None, recipe: Optional[str] = None):
    """The ASGI app serving ``model``; ``adapters_dir`` is rescanned by POST /v1/adapters/reload
    (refusing adapters trained with an image ``recipe`` other than the one ``transform`` applies, or
    with other statistics than ``mean``/``std``, which ``transform`` normalises with)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    cfg = cfg or ServeConfig()
    metrics = _metrics()
    metrics["adapters"].set(len(model.adapters))
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="svp-infer")
    decoder = concurrent.futures.ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="svp-decode")
    stamps = {} if stamps is None else stamps
    state = {}

    @asynccontextmanager
    async def lifespan(app):
        batcher = Batcher(_run_batch(model), executor, cfg, metrics, lambda: max(1, len(model.adapters)))
        batcher.start()
        state["batcher"] = batcher
        try:
            yield
        finally:
            await batcher.stop()
            executor.shutdown(wait=True)
            decoder.shutdown(wait=True)

    def error(endpoint: str, status: int, message: str, **extra) -> JSONResponse:
        metrics["requests"].labels(endpoint, str(status)).inc()
        metrics["errors"].labels(endpoint, str(status)).inc()
        # a body left unread (stalled, or over the limit): the connection closes after the answer.
        # uvicorn otherwise kept it open, and each byte the client sent after restarted its wait
        close = {"Connection": "close"} if status in (408, 413) else None
        return JSONResponse({"error": message, "status": status, **extra}, status_code=status, headers=close)

    def ok(endpoint: str, body, status: int = 200) -> JSONResponse:
        response = JSONResponse(body, status_code=status)   # counted once it is one (rendering can fail)
        metrics["requests"].labels(endpoint, str(status)).inc()
        return response

    # A refused body's rest is read and dropped, up to this many bytes over the limit and DRAIN_S
    # seconds, before the 413: a client that sends its whole body before it reads (Python's
    # http.client and urllib) got a reset connection instead of the answer when the server closed
    # on unread bytes (1 of 40 on an idle server, 29 of 80 under load, 1.2 MB against a 1 MB limit:
    # review47). Larger rests are not read (a 10 GB upload is refused at once, and such a client
    # sees the reset). (Over the limit: the first version's bound, compared with the whole body,
    # was at or under the limit itself for limits of 1 MiB and more, and never drained: review48.)
    drain_rest = min(max(cfg.max_upload_bytes, 1 << 20), 16 << 20)

    async def drain(stream, budget: int) -> None:
        until, got = time.monotonic() + DRAIN_S, 0
        while got <= budget:
            wait = until - time.monotonic()
            if wait <= 0:
                return
            try:
                got += len(await asyncio.wait_for(stream.__anext__(), wait))
            except Exception:   # the end, a timeout, the client gone: the answer goes as it can
                return

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        stream = request.stream().__aiter__()
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise RequestError(f"Content-Length {length!r} is not a number") from None
            if n > cfg.max_upload_bytes:
                if n <= cfg.max_upload_bytes + drain_rest:
                    await drain(stream, n)
                raise RequestError(f"the request body is {n} bytes; the limit is {cfg.max_upload_bytes}", 413)
        chunks, n = [], 0
        t0 = time.monotonic()
        while True:
            # by when the bytes so far must be joined by more: body_idle_s after the last chunk, and
            # no later than the minimum rate allows after body_idle_s of grace (the size a client
            # declares does not extend it: review43)
            behind = t0 + cfg.body_idle_s + n / cfg.body_min_rate
            wait = min(cfg.body_idle_s, behind - time.monotonic())
            try:
                if wait <= 0:
                    raise asyncio.TimeoutError
                chunk = await asyncio.wait_for(stream.__anext__(), wait)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                now = time.monotonic()
                if now >= behind:
                    raise RequestError(f"the request body is too slow: {n} bytes in {now - t0:.0f} s (at least "
                                       f"{cfg.body_min_rate / 1024:g} KiB/s after {cfg.body_idle_s:g} s)",
                                       408) from None
                raise RequestError(f"the request body stalled: nothing arrived for {cfg.body_idle_s:g} s "
                                   f"after {n} bytes", 408) from None
            n += len(chunk)
            if n > cfg.max_upload_bytes:
                await drain(stream, drain_rest)
                raise RequestError(f"the request body exceeds the limit of {cfg.max_upload_bytes} bytes", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse_input(request: Request, want_topk: bool):
        """(image bytes, adapter name, topk) from a multipart form or a JSON body."""
        body = await read_body(request)
        ctype = request.headers.get("content-type", "")
        kind = ctype.split(";")[0].strip().lower()  # media types are case-insensitive
        if kind == "application/json":
            try:
                obj = json.loads(body)
            except (ValueError, RecursionError) as e:  # not JSON or UTF-8, an over-long integer, deep nesting
                raise RequestError(f"the JSON body is malformed: {type(e).__name__}: {e}") from None
            if not isinstance(obj, dict):
                raise RequestError(f"the JSON body must be an object with keys image, adapter, topk; "
                                   f"got {type(obj).__name__}")
            b64 = obj.get("image")
            if not isinstance(b64, str):
                raise RequestError("the JSON body needs 'image': the image file in base64 (a string)")
            if b64.startswith("data:") and "," in b64:
                b64 = b64.split(",", 1)[1]
            try:   # (MIME base64, as `base64` without -w0 writes it, breaks its lines: not data)
                data = base64.b64decode("".join(b64.split()), validate=True)
            except (binascii.Error, ValueError) as e:
                raise RequestError(f"'image' is not valid base64: {e}") from None
            adapter, topk = obj.get("adapter"), obj.get("topk", 5)
        elif kind == "multipart/form-data":
            sent = {"done": False}

            async def replay():
                if sent["done"]:
                    return {"type": "http.disconnect"}
                sent["done"] = True
                return {"type": "http.request", "body": body, "more_body": False}
            try:
                form = await Request(request.scope, replay).form(max_files=2, max_fields=10,
                                                                 max_part_size=cfg.max_upload_bytes)
            except Exception as e:  # starlette's parser errors (bad boundary, too many parts, ...)
                raise RequestError(f"the multipart form cannot be parsed: {getattr(e, 'detail', e)}") from None
            for field in ("image", "adapter", "topk"):   # which of two would be used is not the client's to guess
                if len(form.getlist(field)) > 1:
                    raise RequestError(f"the form has {len(form.getlist(field))} fields {field!r}; send one")
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise RequestError("the form needs a file field 'image'")
            data = await upload.read()
            adapter, topk = form.get("adapter"), form.get("topk", "5")
        else:
            raise RequestError(f"Content-Type {ctype or '(none)'!r}: send multipart/form-data (fields image, "
                               f"adapter, topk) or application/json (image in base64)", 415)
        if adapter is None or adapter == "":
            raise RequestError("missing 'adapter': the name of a loaded adapter (GET /v1/adapters)")
        if not isinstance(adapter, str):
            raise RequestError(f"'adapter' must be a string, the name of a loaded adapter (GET /v1/adapters); "
                               f"got {type(adapter).__name__} {adapter!r}")
        if adapter not in model.adapters:
            raise RequestError(f"unknown adapter {adapter!r}; loaded: {sorted(model.adapters)}", 404)
        if want_topk:
            try:
                if isinstance(topk, str):   # a form's text: '3.0' as JSON's 3.0 (it was refused)
                    text = topk.strip()
                    topk = int(text) if text.lstrip("+-").isdigit() else float(text)
                if isinstance(topk, bool) or (isinstance(topk, float) and not topk.is_integer()):
                    raise ValueError
                topk = int(topk)
            except (TypeError, ValueError):
                raise RequestError(f"topk {topk!r} is not an integer") from None
            if not 1 <= topk <= cfg.max_topk:
                raise RequestError(f"topk {topk} is out of range; expected 1..{cfg.max_topk}")
        return data, adapter, topk

    async def to_input(data: bytes) -> torch.Tensor:
        im = open_image(data, cfg)  # the header only: the size limits, before any decoding
        check_resized(im.size, transform, cfg)
        if im.size[0] * im.size[1] <= cfg.inline_decode_pixels:
            return finish_image(im, transform)
        return await asyncio.get_running_loop().run_in_executor(decoder, finish_image, im, transform)

    def guard(endpoint: str):
        def wrap(fn):
            async def handler(request: Request):
                try:
                    return await fn(request)
                except RequestError as e:
                    return error(endpoint, e.status, str(e))
                except ClientDisconnect:
                    # the client hung up before its request was read: nobody to answer, no fault
                    # of the server (a 500 with a traceback each, ~1 KB of log a hang-up): counted
                    # as nginx counts it, 499
                    return error(endpoint, 499, "the client closed the connection before its request was read")
                except asyncio.CancelledError:  # uvicorn's shutdown timeout (--shutdown-timeout) ran out
                    return error(endpoint, 503, "the server is shutting down")
                except (SVPError, ValueError) as e:  # the adapter cannot run this input
                    return error(endpoint, 422, str(e))
                except Exception as e:  # a bug: still one JSON answer, and the server keeps serving
                    _log.exception("%s failed", endpoint)
                    return error(endpoint, 500, f"internal error: {type(e).__name__}: {e}")
            return handler
        return wrap

    @guard("predict")
    async def predict(request: Request):
        t0 = time.perf_counter()
        data, adapter, topk = await parse_input(request, want_topk=True)
        x = await to_input(data)
        logits, classes = await state["batcher"].submit(x, adapter)
        if not bool(torch.isfinite(logits).all()):   # (nan probabilities in an arbitrary order, then a
            # 422 from the JSON encoder, the request counted as a success too)
            raise RequestError(f"adapter {adapter!r}: no prediction, its outputs for this image are not finite "
                               f"(nan or inf logits): the adapter's weights, or this input, overflow", 500)
        metrics["latency"].observe(time.perf_counter() - t0)
        # a reload that removed the adapter after its batch ran has dropped its series: counting
        # now would bring it back, at 1, for a name no longer served (review49). (The count and the
        # reload's removal of the series both run on this event loop, and an adapter leaves
        # model.adapters before its series goes.)
        if adapter in model.adapters:
            metrics["predictions"].labels(adapter).inc()
        return ok("predict", {"adapter": adapter, "top": _topk(logits, classes, topk)})

    @guard("gates")
    async def gates(request: Request):
        data, adapter, _ = await parse_input(request, want_topk=False)
        x = await to_input(data)
        loop = asyncio.get_running_loop()
        try:
            pngs = await loop.run_in_executor(executor, _gate_pngs, model, x, adapter, mean, std)
        except AdapterError:
            if adapter in model.adapters:   # (an adapter that cannot draw its gates: 422 below)
                raise
            # a reload removed it after the request was read: as /v1/predict answers then (it was a 422)
            raise _AdapterRemoved(adapter) from None
        return ok("gates", {"adapter": adapter, "maps": pngs})

    async def adapters(request: Request):
        return ok("adapters", {"base_model_hash": model.base_hash,
                               "adapters": [e.describe() for _, e in sorted(model.adapters.items())]})

    @guard("reload")
    async def reload(request: Request):
        if adapters_dir is None:
            raise RequestError("this server was started without an adapters folder", 409)
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(executor, sync_adapters, model, adapters_dir, stamps, recipe,
                                            (tuple(mean), tuple(std)))
        metrics["adapters"].set(len(model.adapters))
        # a removed adapter's series goes with it: a deployment that names its folders by version
        # grew /metrics (and its scraper's series) by one series per name ever served (review47)
        for name in report["removed"] + [n for n in report["refused"] if n not in model.adapters]:
            try:
                metrics["predictions"].remove(name)
            except KeyError:   # (never predicted)
                pass
        if report["refused"]:
            return error("reload", 422, "some adapter folders were refused: " + "; ".join(
                f"{k}: {v}" for k, v in report["refused"].items()), **report)
        return ok("reload", report)

    async def healthz(request: Request):
        return ok("healthz", {"status": "ok", "adapters": len(model.adapters), "amp": model.amp})

    async def prom(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(metrics["registry"]), media_type=CONTENT_TYPE_LATEST)

    async def index(request: Request):
        with open(os.path.join(STATIC, "index.html"), encoding="utf-8") as f:
            return HTMLResponse(f.read())

    async def not_found(request: Request, exc):
        status = getattr(exc, "status_code", 500)
        # (a 405 carries the Allow header HTTP requires, which starlette puts on the exception)
        return JSONResponse({"error": f"{request.method} {request.url.path}: {getattr(exc, 'detail', exc)}",
                             "status": status}, status_code=status, headers=getattr(exc, "headers", None))

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", prom, methods=["GET"]),
        Route("/v1/adapters", adapters, methods=["GET"]),
        Route("/v1/adapters/reload", reload, methods=["POST"]),
        Route("/v1/predict", predict, methods=["POST"]),
        Route("/v1/gates", gates, methods=["POST"]),
    ]
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found},
                    middleware=[Middleware(OriginGuard, allowed_hosts=cfg.allowed_hosts)])
    app.state.model = model
    app.state.transform = transform
    app.state.metrics = metrics
    return app


def _host_name(netloc: str) -> str:
    """``host`` of ``host[:port]`` / ``[v6]:port``, lower case, without the trailing dot of a fully
    qualified name (``svp.lan.`` is ``svp.lan``)."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:netloc.find("]")] if "]" in netloc else netloc
    return (netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc).rstrip(".")


def request_refusal(host: str, origin: Optional[str], allowed_hosts: Optional[Sequence[str]]) -> Optional[str]:
    """Why a request is refused (403), or None. A browser attaches ``Origin`` to the requests a
    page makes; one from another origin may not call the API: a multipart or text/plain POST
    needs no CORS preflight, so any web page the user opened could reload the adapters or keep
    the inference thread drawing gate maps. Clients without an Origin (curl, scripts) and the
    page at / (same origin) are served."""
    if allowed_hosts is not None and _host_name(host) not in {h.lower() for h in allowed_hosts}:
        return (f"Host {host!r} is not a name this server answers to ({', '.join(allowed_hosts)}); "
                f"start svp serve with --allowed-host NAME to add one")
    if origin is not None:
        from urllib.parse import urlsplit
        parts = urlsplit(origin.strip())
        if origin.strip() == "null" or not parts.netloc or parts.netloc.lower() != host.strip().lower():
            return (f"cross-origin request refused: Origin {origin!r} is not this server ({host}); svp serve "
                    f"answers its own page and clients that send no Origin header (no CORS)")
    return None


class OriginGuard:
    """ASGI middleware: ``request_refusal`` before any route runs (404s and the page included)."""

    def __init__(self, app, allowed_hosts: Optional[Sequence[str]] = None):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            why = request_refusal(headers.get("host", ""), headers.get("origin"), self.allowed_hosts)
            if why is not None:
                from starlette.responses import JSONResponse
                await JSONResponse({"error": why, "status": 403}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _gate_pngs(model: MultiAdapterModel, x: torch.Tensor, name: str, mean, std) -> Dict[str, str]:
    """Frozen backbone vs adapter, one PNG (as a data URL) per gate quantity (svp.viz figures)."""
    from ..viz.plots import plot_comparison

    frozen, adapted = model.gate_maps(x[None], name)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    picture = (x.cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()
    depth = frozen.depth
    layers = sorted({0, depth // 2, depth - 1})
    out = {}
    with tempfile.TemporaryDirectory(prefix="svp-gates-") as tmp:
        for q in GATE_QUANTITIES:
            path = os.path.join(tmp, f"{q}.png")
            plot_comparison({"frozen": frozen, name: adapted}, picture, path, layers, q, panel=1.6)
            with open(path, "rb") as f:
                out[q] = "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")
    return out


def build_app(adapters_dir: str, model_name: Optional[str] = None, checkpoint: Optional[str] = None,
              cfg: Optional[ServeConfig] = None, amp: bool = False):
    """(app, load report): the backbone of ``backbone_spec``, every adapter of ``adapters_dir``;
    ``amp``: bfloat16 autocast (MultiAdapterModel)."""
    from ..data.transforms import adapter_normalization, build_transform
    from ..build import build_backbone
    from .backbone import backbone_spec

    spec = backbone_spec(adapters_dir, model_name, checkpoint)
    vim = build_backbone(spec)
    # the statistics the first adapter was trained and is evaluated with (its backbone.json's,
    # data.normalize: ImageNet's by default for every backbone), not the backbone's pretrained_cfg:
    # a ViT's (0.5, 0.5) served other predictions than svp predict's (retest 95)
    mean, std = adapter_normalization(spec.extra, adapters_dir)
    img_size = int(vim.patch_embed.img_size[0])
    recipe = spec.extra.get("recipe", "svp")
    transform = FastEvalTransform.wrap(build_transform(recipe, False, img_size=img_size, mean=mean, std=std))
    model = MultiAdapterModel(vim, amp=amp)
    stamps: Dict[str, tuple] = {}
    report = sync_adapters(model, adapters_dir, stamps, recipe, (mean, std))
    report["backbone"] = {"model": spec.model, "checkpoint": spec.checkpoint, "weights": spec.weights}
    app = create_app(model, adapters_dir, transform, cfg, mean=mean, std=std, stamps=stamps, recipe=recipe)
    return app, report
