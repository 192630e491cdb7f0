"""The CPU benchmark scripts that docs/benchmarks.md quotes run as quoted (a record whose
command no longer runs cannot be reproduced). Numbers are meaningless here. (Named to run after
the kernels' own tests: its process then loads the compiled kernels from the cache instead of
compiling them, a minute or more of a cold CI run.)"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_ab_switches_every_fused_path_off_and_on_on_the_mini_vim():
    """`step_ab.py --ab all` failed: the conv's fused path, switched off by a lambda taking no
    keywords, is called with bf16_x=...; and the issue's 6 shared layers do not divide the
    mini Vim's 8 (every SVP script failed on it)."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "step_ab.py"), "--model",
                        "vim_mini_patch4_32", "--batch", "1", "--reps", "1", "--ab", "all"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "A/B conv_proj+prompts: largest relative gradient difference" in r.stdout
    assert "B (fused): CPU ms per step" in r.stdout
