"""Process settings that decide CPU speed on a shared machine, applied once when ``svp`` is
imported (before torch), and only where the user has not chosen them.

* ``OMP_WAIT_POLICY=PASSIVE`` (unless ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set).
  torch's CPU wheel runs its intra-op threads on libgomp, whose default is to spin for a
  long time at the end of every parallel region. A training step is thousands of small
  parallel regions; when another process shares the cores, the thread that finishes first
  spins while its partner waits to be scheduled, and the spinning itself takes the CPU the
  partner needs. Measured here (Vim-Tiny SVP step, batch 8, 2 threads, load ~12 on 2 cores):
  default 72-76 s wall / 19-20 s CPU per step, PASSIVE 13-16 s wall / 3.8-3.9 s CPU (one
  thread: 3.1 s CPU). libgomp reads the variable once, when torch loads it, so this only
  works if ``svp`` is imported before ``torch``; ``status()`` says whether it took effect.
  The price on a machine nobody else uses: each of a step's thread-pool launches wakes a
  sleeping thread. Vim-Tiny SVP step, batch 8, 2 threads, quiet (2026-11-30, alternated runs
  of ``benchmarks/model.py --contend``): PASSIVE 826-872 ms, ACTIVE 713-760 ms; beside one
  busy process PASSIVE 1429-1611 ms, ACTIVE 1809-2051 ms; ``GOMP_SPINCOUNT`` 10^3-10^5 fell in
  between or worse (the machine's noise was +-10%). Set ``OMP_WAIT_POLICY=ACTIVE`` yourself on
  a dedicated machine.

Set ``SVP_NO_RUNTIME_DEFAULTS=1`` to leave the environment untouched.
"""
from __future__ import annotations

import os
import sys

_state = {"omp_wait_policy": None, "applied_before_torch": None}


def configure() -> dict:
    """Apply the defaults above (idempotent). Returns ``status()``."""
    if _state["applied_before_torch"] is not None or os.environ.get("SVP_NO_RUNTIME_DEFAULTS"):
        return status()
    before_torch = "torch" not in sys.modules
    if before_torch and not (os.environ.get("OMP_WAIT_POLICY") or os.environ.get("GOMP_SPINCOUNT")):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        _state["omp_wait_policy"] = "PASSIVE (set by svp)"
    else:
        _state["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY") or (
            f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}" if os.environ.get("GOMP_SPINCOUNT")
            else "libgomp default (torch was imported before svp)")
    _state["applied_before_torch"] = before_torch
    return status()


def status() -> dict:
    """What ``configure`` found and did: {'omp_wait_policy': ..., 'applied_before_torch': ...}."""
    return dict(_state)
