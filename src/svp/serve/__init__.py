"""Serving many adapters from one frozen backbone: :class:`MultiAdapterModel` (mixed-adapter
batches), the ASGI app (:mod:`svp.serve.app`) and ``svp serve`` (:mod:`svp.serve.cli`)."""
from .backbone import backbone_spec
from .model import MultiAdapterModel, check_adapter_dir, shadow

__all__ = ["MultiAdapterModel", "backbone_spec", "check_adapter_dir", "shadow"]
