"""svp.runtime: the OpenMP wait policy is set before torch loads libgomp, never over the user's."""
import os
import subprocess
import sys

import pytest

CODE = "import svp, os, torch; print(os.environ.get('OMP_WAIT_POLICY'), svp.runtime.status()['applied_before_torch'])"


def _run(code, **env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "SVP_NO_RUNTIME_DEFAULTS")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.slow  # starts processes
def test_passive_wait_policy_when_svp_comes_first():
    assert _run(CODE) == ["PASSIVE", "True"]


@pytest.mark.slow  # starts processes
def test_user_choice_and_opt_out_are_kept():
    assert _run(CODE, OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "True"]
    assert _run(CODE, GOMP_SPINCOUNT="1000")[0] == "None"
    assert _run(CODE, SVP_NO_RUNTIME_DEFAULTS="1")[0] == "None"
    # torch first: too late for libgomp, so svp leaves the environment alone and says so
    assert _run("import torch, os, svp; print(os.environ.get('OMP_WAIT_POLICY'), "
                "svp.runtime.status()['applied_before_torch'])") == ["None", "False"]
