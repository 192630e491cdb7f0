"""Shared by the serve tests and benchmarks/serve.py: adapters of every method on the
bundled mini Vim, with randomly perturbed parameters (nothing is trained)."""
from __future__ import annotations

import os

import torch

MINI = "vim_mini_patch4_32"

# name -> (method, settings); every method and both SVP modes, several head kinds and class counts
SPECS = {
    "svp": ("svp", dict(shared_layers=4, hidden=16, num_classes=10)),
    "svp_official": ("svp", dict(shared_layers=8, hidden=8, compat="official", simam=True, num_classes=5)),
    "linear2": ("linear", dict(head="two_layer", num_classes=7)),
    "vpt_deep": ("vpt_deep", dict(num_tokens=4, placement="middle", num_classes=10)),
    "vpt_shallow": ("vpt_shallow", dict(num_tokens=4, placement="middle", num_classes=3)),
    "visual_prompt": ("visual_prompt", dict(pad=4, num_classes=10)),
    "bitfit": ("bitfit", dict(num_classes=10)),
    "lora": ("lora", dict(r=4, alpha=8.0, num_classes=10)),
    "adapter": ("adapter", dict(bottleneck=8, num_classes=6)),
    "full": ("full", dict(num_classes=4)),
}


def mini_backbone(random_init=False):
    """The bundled mini Vim (its bundled weights), or a random one (another weight hash)."""
    from svp.build import ModelSpec
    from svp.build import build_backbone
    return build_backbone(ModelSpec(MINI, random_init=random_init, init_seed=0)).requires_grad_(False).eval()


def make_adapter(directory, method, settings, seed=0, scale=0.05, backbone=None, base_model_name=MINI):
    """Save an adapter of ``method`` whose trainable tensors are perturbed (so that it does
    something) and return the directory. ``backbone``: a function giving the backbone (default
    the bundled mini Vim), named ``base_model_name``."""
    import svp.peft as peft

    torch.manual_seed(seed)
    model = peft.get_peft_model((backbone or mini_backbone)(), peft.make_config(method, **settings))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (scale if "head" not in n else 0.5))
    n = model.base_model.num_classes
    model.save(directory, base_model_name=base_model_name, class_names=[f"{method}-class-{i}" for i in range(n)])
    return os.fspath(directory)


def make_adapters(root, names=None, seed=0):
    os.makedirs(root, exist_ok=True)
    for k, name in enumerate(names or SPECS):
        method, settings = SPECS[name]
        make_adapter(os.path.join(root, name), method, settings, seed=seed + k)
    return root


def png_bytes(size=40, seed=0, fmt="PNG") -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(buf, format=fmt)
    return buf.getvalue()


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a daemon thread; ``stop()`` ends it."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                   lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout=60.0):
        import time

        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > timeout or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def stop(self, timeout=30.0):
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError("the test server did not stop")


def http(method, url, body=None, headers=None, timeout=60.0):
    """(status, parsed JSON or text) with urllib; never raises for 4xx/5xx."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, data, ctype = r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, data, ctype = e.code, e.read(), e.headers.get("content-type", "")
    return status, (json.loads(data) if "json" in ctype else data.decode("utf-8", "replace"))


def multipart(fields: dict, files: dict):
    """(body, content-type) of a multipart/form-data request."""
    import uuid

    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{filename}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def predict(url, image: bytes, adapter: str, topk=5, timeout=60.0):
    body, ctype = multipart({"adapter": adapter, "topk": topk}, {"image": ("x.png", image)})
    return http("POST", url + "/v1/predict", body, {"Content-Type": ctype}, timeout)
