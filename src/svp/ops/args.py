"""Argument checks shared by the public entry points of the fused prompt operators (CPU and
Triton): the kernels compare each row's index with ``skip`` and would silently prompt every row for
an index they never meet."""
from __future__ import annotations

import numbers


def check_skip(skip, length: int, op: str) -> int:
    """``skip`` as an int: a row index in [0, length), or -1 for none. Python's other negative
    indices are refused: the kernels would read -2 as "no row" where ``h[:, -2]`` is a row."""
    if isinstance(skip, bool) or not isinstance(skip, numbers.Integral) or not -1 <= int(skip) < length:
        raise ValueError(f"{op}: skip must be a row index in [0, {length}) or -1 for none; got {skip!r}")
    return int(skip)
