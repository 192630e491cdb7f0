"""Which backbone a server shares; it is built by svp's model builder (``svp.build.build_backbone``)
and frozen by ``MultiAdapterModel``."""
from __future__ import annotations

import os
from typing import Optional

from ..build import ModelSpec, adapter_spec
from ..errors import ConfigError


def backbone_spec(adapters_dir: str, model_name: Optional[str] = None,
                  checkpoint: Optional[str] = None) -> ModelSpec:
    """Which backbone to serve: that of the first adapter folder (``svp.build.adapter_spec``:
    its ``backbone.json``, else its ``base_model_name``), with ``--model``/``--checkpoint``
    overriding it; with no adapter folder, ``--model`` alone."""
    from .model import check_adapter_dir

    names = sorted(n for n in os.listdir(adapters_dir) if not n.startswith(".")) if os.path.isdir(adapters_dir) else []
    for name in names:
        try:
            real = check_adapter_dir(adapters_dir, name)
        except Exception:  # refused folders are reported when the adapters load
            continue
        spec = adapter_spec(real, model_name, checkpoint)
        spec.num_classes = None  # the backbone keeps its own head; each adapter brings its own
        return spec
    if not model_name:
        raise ConfigError(f"{adapters_dir}: no adapter folder to take the backbone from; pass --model "
                          f"(and --checkpoint)")
    return ModelSpec(model=model_name, checkpoint=checkpoint, init_seed=0, extra={"recipe": "svp"})
