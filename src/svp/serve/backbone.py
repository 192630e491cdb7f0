"""Which backbone a server shares; it is built by svp's model builder (``svp.build.build_backbone``)
and frozen by ``MultiAdapterModel``."""
from __future__ import annotations

import json
import os
from typing import Optional

from ..build import ModelSpec, adapter_spec, check_recorded_checkpoint, converted_origin
from ..data.transforms import adapter_normalization, adapter_recipe
from ..errors import ConfigError, SVPError
from ..peft.io import ADAPTER_CONFIG


def backbone_spec(adapters_dir: str, model_name: Optional[str] = None,
                  checkpoint: Optional[str] = None) -> ModelSpec:
    """Which backbone to serve: that of the first adapter folder (``svp.build.adapter_spec``:
    its ``backbone.json``, else its ``base_model_name``), with ``--model``/``--checkpoint``
    overriding it; with no adapter folder, ``--model`` alone."""
    from .model import check_adapter_dir

    if not os.path.isdir(adapters_dir):
        raise ConfigError(f"--adapters {adapters_dir}: no such folder (expected a folder whose subfolders are "
                          f"adapters)")
    try:
        # folders (and links: refused by check_adapter_dir if they leave the folder), as the adapters load:
        # files beside them were counted as "subfolders" that are no adapters
        names = sorted(n for n in os.listdir(adapters_dir) if not n.startswith(".") and (
            os.path.isdir(os.path.join(adapters_dir, n)) or os.path.islink(os.path.join(adapters_dir, n))))
    except OSError as e:
        raise ConfigError(f"--adapters {adapters_dir}: cannot read the folder ({e.strerror or e})") from None
    refused = []
    for name in names:
        try:
            real = check_adapter_dir(adapters_dir, name)
            spec = adapter_spec(real, model_name, checkpoint)
            adapter_recipe(spec.extra, real)  # it would become the server's one preprocessing
            adapter_normalization(spec.extra, real)
        except (SVPError, OSError) as e:  # a refused folder is reported when the adapters load; the next decides
            refused.append(f"{name}: {e}" if isinstance(e, SVPError) else
                           f"{name}: cannot read {e.filename or name} ({e.strerror or e})")
            continue
        if not spec.random_init:
            # the backbone keeps its own head; each adapter brings its own. (A random backbone is
            # drawn with the recorded head: a head of another size draws other random numbers for
            # the backbone after it, whose weight hash then refused every adapter, QA 16c)
            spec.num_classes = None
        check_recorded_checkpoint(spec, real, checkpoint)
        return _with_weights(spec, f"adapter {name}", real)
    if not model_name:
        if os.path.isfile(os.path.join(adapters_dir, ADAPTER_CONFIG)):
            raise ConfigError(f"--adapters {adapters_dir}: this is one adapter folder; pass the folder that "
                              f"holds it (each subfolder is served as one adapter)")
        found = ("no subfolders" if not names else f"none of its {len(names)} subfolders is a readable adapter ("
                 + "; ".join(refused[:3]) + (" ..." if len(refused) > 3 else "") + ")")
        raise ConfigError(f"--adapters {adapters_dir}: {found}, so no backbone to take; pass --model "
                          f"(and --checkpoint), or add adapter folders (adapter_config.json + adapter.safetensors)")
    return _with_weights(ModelSpec(model=model_name, checkpoint=checkpoint, init_seed=0, extra={"recipe": "svp"}),
                         "--model")


def _with_weights(spec: ModelSpec, where: str, adapter_dir: Optional[str] = None) -> ModelSpec:
    """The builder's own message names train's and eval's --pretrained and --random-init, which a
    server (serving trained adapters) does not take: here the answer is a checkpoint, and the one
    an older converted folder was converted from where it records it."""
    try:
        spec.weights
    except ConfigError:
        info = None
        if adapter_dir is not None:
            try:
                with open(os.path.join(adapter_dir, ADAPTER_CONFIG), "rb") as f:
                    info = json.loads(f.read().decode("utf-8"))
            except (OSError, ValueError):   # (read and checked again where the adapters load)
                pass
        raise ConfigError(f"model {spec.model!r} ({where}): no weights given, and none recorded (no backbone.json "
                          f"naming a checkpoint){converted_origin(info)}; pass --checkpoint FILE, the backbone "
                          f"the adapters were trained on") from None
    return spec
