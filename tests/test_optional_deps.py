"""svp where an optional dependency is missing: numba (svp's fused CPU kernels) and Triton (which
macOS and Windows do not have). Each case runs in a fresh process in which importing the missing
packages fails, as it does on such a machine."""
import json
import os
import re
import subprocess
import sys

import pytest

BLOCK = "import sys\nfor _m in {blocked!r}:\n    sys.modules[_m] = None   # `import _m` raises ImportError\n"

# one SVP training step of the bundled mini Vim, and its output on the reference scan
STEP = """
import json, torch, timm
import svp
from svp.ops import available_backends, get_backend, set_backend
from svp.peft import get_peft_model, make_config
torch.manual_seed(0)
model = get_peft_model(timm.create_model("vim_mini_patch4_32", pretrained=True),
                       make_config("svp", num_classes=3, shared_layers=4, hidden=8)).train()
for p in model.parameters():
    if p.requires_grad:
        torch.nn.init.normal_(p, std=0.05)
x = torch.randn(2, 3, 32, 32)
out = {}
for backend in (None, "reference"):
    set_backend(backend)
    torch.manual_seed(1)
    y = model(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    out[backend or "auto"] = (y.detach(), grads)
set_backend(None)
(ya, ga), (yr, gr) = out["auto"], out["reference"]
err = max([float((ya - yr).abs().max() / yr.abs().max())] +
          [float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(ga, gr)])
print(json.dumps({"available": available_backends(), "cpu": get_backend("cpu"), "grads": len(ga), "err": err}))
"""


def _run(code: str, blocked, env=None):
    full = BLOCK.format(blocked=tuple(blocked)) + code
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    e.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", full], capture_output=True, text=True, timeout=600, env=e)


@pytest.mark.parametrize("blocked, env", [(("numba", "triton"), {}), (("triton",), {"SVP_SCAN_BACKEND": "torch"})],
                         ids=["no-numba-no-triton", "no-triton-torch-backend"])
def test_the_model_trains_on_the_torch_backend_without_triton(blocked, env):
    """The 'torch' backend needs neither numba nor Triton: the model's check for the joint Triton
    scan imported Triton before it asked which backend runs, so a machine without Triton (macOS,
    or numba missing; any forced non-cpu backend) crashed at the first forward."""
    r = _run(STEP, blocked, env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["cpu"] == "torch" and got["grads"] > 2
    assert "triton" not in got["available"] and ("cpu" not in got["available"]) == ("numba" in blocked)
    assert got["err"] < 1e-4, got


def test_doctor_checks_the_model_without_numba_and_says_how_to_get_the_kernels():
    """svp doctor without numba checked the scan alone (the model's crash above passed it), and
    without Triton it failed its fused-model check on the same crash; numba's row said only
    "not importable"."""
    # (llvmlite too: pip installs neither where numba has no wheel, and the reason named llvmlite)
    r = _run("from svp.cli import main\nsys.exit(main(['doctor', '--no-timing']))\n", ("numba", "llvmlite", "triton"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "`pip install numba` gives svp's fused CPU kernels" in r.stdout
    assert re.search(r"cpu +unavailable: numba is not installed \(.*\); `pip install numba`", r.stdout), r.stdout
    assert "automatic choice on cpu: torch" in r.stdout
    assert "cpu   model      ok   15 of 15 tensors finite" in r.stdout, r.stdout


def test_numba_cache_falls_back_to_a_private_temp_folder(tmp_path, monkeypatch):
    """A read-only install with no writable home (a service account, `docker --user`): numba
    refused to decorate the cached kernels ("no locator available") and the CPU kernels were
    unavailable, silently. The last resort is a folder of this user's in the temp folder, taken
    only while no other user can write it (numba's cache index is a pickle); numba imported
    before svp gets the folder too."""
    numba = pytest.importorskip("numba")
    from svp.ops import scan_cpu
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # (set, so that teardown restores its absence: delenv of an absent name records nothing, and
    # the folder chosen below leaked into every later test's processes, which compiled afresh)
    monkeypatch.setenv("NUMBA_CACHE_DIR", "")
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp))
    monkeypatch.setattr(numba.config, "CACHE_DIR", numba.config.CACHE_DIR)
    real = scan_cpu._writable
    monkeypatch.setattr(scan_cpu, "_writable", lambda f, private=False: private and real(f, private))
    scan_cpu._default_cache_dir()
    want = str(tmp / f"svp-numba-{os.getuid()}")
    assert os.environ["NUMBA_CACHE_DIR"] == want and numba.config.CACHE_DIR == want
    assert os.stat(want).st_mode & 0o777 == 0o700
    os.chmod(want, 0o777)   # writable by others: refused, nothing set
    monkeypatch.setenv("NUMBA_CACHE_DIR", "")
    scan_cpu._default_cache_dir()
    assert os.environ["NUMBA_CACHE_DIR"] == ""
