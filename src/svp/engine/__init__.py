"""Training and evaluation engine: configuration, the official recipe, run folders,
resume, multi-process training, and the ``svp train/eval/predict/sweep`` commands.

Python API::

    from svp.engine import train
    results = train({"data": {"dataset": "digits"}, "method": {"name": "svp"}, ...})
"""
from .config import ConfigError, defaults, resolve
from .loop import NonFiniteLoss, TrainingStopped, evaluate, train

__all__ = ["train", "evaluate", "resolve", "defaults", "ConfigError", "TrainingStopped", "NonFiniteLoss"]
