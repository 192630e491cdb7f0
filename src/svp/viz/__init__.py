"""Gate-activation and information-propagation analysis of Vision Mamba models
(frozen backbones and PEFT models alike), and the pictures made from it.

``analyze(model, images)`` / ``GateRecorder`` live in :mod:`svp.viz.gates`; the
figures in :mod:`svp.viz.plots`; the ``svp visualize`` command in :mod:`svp.viz.cli`.
"""
from .gates import (CLS, DIRECTIONS, EXTRA, QUANTITIES, GateMaps, GateRecorder, analyze, find_vim,
                    record_gates)

__all__ = ["GateRecorder", "GateMaps", "record_gates", "analyze", "find_vim", "QUANTITIES", "DIRECTIONS",
           "CLS", "EXTRA"]
