"""`svp doctor` runs here and finds every available scan backend correct."""
import importlib.util
import os

import pytest

from svp.cli import main


@pytest.mark.slow  # every backend, with timings
def test_doctor_passes(capsys):
    rc = main(["doctor", "--no-timing", "--amp"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "selective-scan backends" in out and "all available backends agree" in out
    assert "FAIL" not in out
    import svp
    # svp's own version first, and where it is imported from (a checkout, or an environment's site-packages)
    assert out.startswith(f"svp doctor\n  {'svp':14s} {svp.__version__} ({os.path.dirname(os.path.abspath(svp.__file__))})\n"), out
    # how torch's threads wait, as svp.runtime set it (or found it)
    assert f"{'libgomp wait':14s} {svp.runtime.status()['omp_wait_policy']}" in out, out
    # and what it did with the cyclic collector around svp's imports
    assert svp.runtime.status()["gc"] and f"{'collector':14s} {svp.runtime.status()['gc']}" in out, out
    # malloc's thresholds as svp.runtime set them (or found them), whether CPU runs hold the heap,
    # and the heap's huge pages
    held = "; CPU runs hold the heap (svp.runtime.held_heap)" if svp.runtime.holds_heap() else ""
    assert f"{'malloc':14s} {svp.runtime.status()['malloc']}{held}; {svp.runtime.huge_pages()}" in out, out
    # the trio whose builds must match (a torchvision of another torch breaks timm's import)
    import timm
    import torchvision
    assert f"  {'torchvision':14s} {torchvision.__version__}\n  {'timm':14s} {timm.__version__}\n" in out, out
    # which CPU: speed depends on it more than on anything else
    from svp.doctor import cpu_name
    assert f"{'CPU':14s} {cpu_name()}, " in out, out
    # whether bfloat16 products (train.amp, --amp) have instructions on this CPU
    from svp.compat import cpu_bf16_instructions
    found = cpu_bf16_instructions()
    row = next(line for line in out.splitlines() if line.strip().startswith("CPU bfloat16"))
    assert (", ".join(found) + ":" in row) if found else ("slower" in row or "unknown" in row), row
    # what float32 products run on (oneDNN or torch's BLAS, and why)
    from svp.ops import matmul_cpu
    assert f"{'CPU products':14s} {matmul_cpu.status()}" in out, out
    # the threads the CPU kernels run on: as many as torch's, not numba's whole pool
    import numba
    import torch
    used = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    assert f"(kernels on {used} of a pool of {numba.config.NUMBA_NUM_THREADS} threads" in out, out
    assert "automatic choice on cpu:" in out, out
    from svp.ops import available_backends
    if "cpu" in available_backends():
        # the fused kernels checked inside a model (conv, norm, prompts too), against plain PyTorch
        assert any(line.split()[:3] == ["cpu", "model", "ok"] for line in out.splitlines()), out
        # and, with --amp, their bfloat16 paths (train.amp) against float32 casts
        assert any(line.split()[:3] == ["cpu", "amp", "ok"] for line in out.splitlines()), out
    if importlib.util.find_spec("triton") is not None:
        # listed with its version and checked (through the interpreter when there is no GPU)
        assert any(line.split()[:1] == ["triton"] and line.split()[1][0].isdigit() for line in out.splitlines()), out
        from svp.ops import dispatch
        if dispatch._load("triton") is not None:
            assert any(line.split()[:3] in (["cpu", "triton", "ok"], ["cuda", "triton", "ok"])
                       for line in out.splitlines()), out
            # and the model's Triton kernels around the scan
            for name in ("conv", "add+RMSNorm", "SVP prompts"):
                assert any(line.split()[0] in ("cpu", "cuda") and f" {name:11s} ok  " in line
                           for line in out.splitlines() if line.strip()), (name, out)
        else:  # a Triton too old for the backend (Triton 2, with torch < 2.4): doctor says why
            assert any(line.split()[:2] == ["triton", "unavailable:"] and "too old" in line
                       for line in out.splitlines()), out


@pytest.mark.parametrize("kernel", ["norm", "conv", "prompts"])
def test_the_fused_model_check_finds_a_wrong_kernel(kernel, monkeypatch):
    """Each fused kernel the scan check does not run, made slightly wrong, fails the model check
    (and the unchanged kernels pass it)."""
    from svp import doctor
    from svp.ops import available_backends
    if "cpu" not in available_backends():
        pytest.fail("the numba cpu backend is not available", pytrace=False)
    import torch
    from svp.ops import dispatch, set_backend
    state = torch.random.get_rng_state()
    set_backend("cpu")
    try:
        err, _, n = doctor.check_fused_cpu_model()
        assert dispatch._forced == "cpu"   # the caller's forced backend is restored
    finally:
        set_backend(None)
    assert torch.equal(torch.random.get_rng_state(), state)   # and its random state untouched
    assert err <= doctor.TOLERANCE_FUSED_MODEL and n > 2
    from svp.ops import conv_cpu, norm_cpu, prompt_cpu
    # (the checked entries the model calls: the public *_cpu functions check, then call these)
    mod, name = {"norm": (norm_cpu, "add_rms_norm"), "conv": (conv_cpu, "bi_conv_proj"),
                 "prompts": (prompt_cpu, "svp_prompts")}[kernel]
    real = getattr(mod, name)

    def off(*a, **k):   # 0.1% off in its first output
        out = real(*a, **k)
        return (out[0] * 1.001,) + tuple(out[1:]) if isinstance(out, tuple) else out * 1.001
    monkeypatch.setattr(mod, name, off)   # (svp imports the kernels inside the functions that call them)
    bad, where, _ = doctor.check_fused_cpu_model()
    assert bad > doctor.TOLERANCE_FUSED_MODEL, (kernel, bad, where)


def test_the_amp_check_finds_a_kernel_that_handles_bfloat16_wrongly(monkeypatch):
    """check_fused_cpu_amp: the same bits with the kernels reading and writing bfloat16 as with
    float32 casts around them (random state and forced backend left as they were); a scan whose
    bfloat16 output is 1% off fails it, and doctor says which tensors differ."""
    from svp import doctor
    from svp.ops import available_backends
    if "cpu" not in available_backends():
        pytest.fail("the numba cpu backend is not available", pytrace=False)
    import torch
    from svp.ops import dispatch, scan_cpu
    state = torch.random.get_rng_state()
    differ, n = doctor.check_fused_cpu_amp()
    assert differ == [] and n > 2
    assert torch.equal(torch.random.get_rng_state(), state) and dispatch._forced is None
    real = scan_cpu.bidirectional_scan

    def off(z, fwd, bwd):
        out = real(z, fwd, bwd)
        return out * 1.01 if z.dtype == torch.bfloat16 else out   # (0.1% would round away in bfloat16)
    monkeypatch.setattr(scan_cpu, "bidirectional_scan", off)
    differ, n = doctor.check_fused_cpu_amp()
    assert "output" in differ and len(differ) > 1, differ


def test_cpu_name_reads_the_model_name_else_says_the_platform(tmp_path):
    import platform

    from svp.doctor import cpu_name
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                   "flags\t\t: fpu avx512f\n\nprocessor\t: 1\nmodel name\t: another core's name\n")
    assert cpu_name(str(x86)) == "Intel(R) Xeon(R) Platinum 8480+"
    # Arm's /proc/cpuinfo has no model name (and an empty one says nothing either)
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\nmodel name\t:\n")
    fallback = platform.processor() or platform.machine() or "unknown"
    assert cpu_name(str(arm)) == fallback
    assert cpu_name(str(tmp_path / "missing")) == fallback


@pytest.mark.parametrize("module,fn,row", [("conv_triton", "causal_conv1d_triton", "conv"),
                                           ("norm_triton", "add_rms_norm_triton", "add+RMSNorm"),
                                           ("prompt_triton", "add_silu_prompts_triton", "SVP prompts"),
                                           ("prompt_triton", "svp_prompts_triton", "SVP prompts")])
def test_the_triton_ops_check_finds_a_wrong_kernel(module, fn, row, monkeypatch):
    """Each Triton kernel around the scan, its output made 1e-4 wrong, fails its own row of
    doctor's check and no other (under the interpreter, as doctor runs it without a GPU)."""
    import importlib

    import torch
    from svp import doctor
    from svp.ops import dispatch
    pytest.importorskip("triton")
    if dispatch._load("triton") is None:
        pytest.skip(dispatch.unavailable_backends()["triton"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mod = importlib.import_module(f"svp.ops.{module}")
    real = getattr(mod, fn)

    def wrong(*a, **k):
        out = real(*a, **k)
        return (out[0] * (1 + 1e-4), out[1]) if isinstance(out, tuple) else out * (1 + 1e-4)

    monkeypatch.setattr(mod, fn, wrong)
    for name, err, where in doctor.check_triton_ops(torch.device("cpu")):
        assert err is not None, where
        assert (err > doctor.TOLERANCE_TRITON_OPS) == (name == row), (name, err, where)


def test_doctor_says_a_forced_backend_is_forced(monkeypatch):
    """SVP_SCAN_BACKEND=torch printed "automatic choice on cpu: torch"."""
    import torch
    from svp.doctor import backend_choice
    from svp.ops import dispatch
    monkeypatch.setattr(dispatch, "_forced", None)
    monkeypatch.setenv("SVP_SCAN_BACKEND", "torch")
    assert backend_choice(torch.device("cpu")) == "forced by SVP_SCAN_BACKEND on cpu: torch"
    monkeypatch.setattr(dispatch, "_forced", "reference")
    assert backend_choice(torch.device("cpu")) == "forced by set_backend on cpu: reference"
    monkeypatch.setattr(dispatch, "_forced", None)
    monkeypatch.delenv("SVP_SCAN_BACKEND")
    assert backend_choice(torch.device("cpu")).startswith("automatic choice on cpu: ")


def test_a_numba_whose_import_breaks_is_a_row_not_a_traceback(monkeypatch):
    """A broken llvmlite install makes `import numba` raise an OSError (its shared library), not
    an ImportError: `svp doctor` stopped in a traceback there, while `svp train` fell back."""
    import builtins
    from svp import doctor
    real = builtins.__import__

    raised = [OSError("Could not find/load shared object file: libllvmlite.so")]

    def broken(name, *a, **kw):
        if name == "numba":
            raise raised[0]
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", broken)
    row = doctor._numba_row()
    assert row.startswith("installed, but its import fails (OSError: Could not find/load shared object"), row
    raised[0] = SystemExit(3)   # (a module that exits as it is imported: the doctor ended there, silently)
    assert doctor._numba_row().startswith("installed, but its import fails (SystemExit: 3)")


def test_doctor_with_the_interpreter_set_checks_triton_on_cpu_tensors(capsys, monkeypatch):
    """TRITON_INTERPRET=1 set by the user on a machine without a GPU (as docs/performance.md
    says to run the triton backend on CPU): doctor dropped the Triton scan's parity row (it paired
    'triton' with CUDA only) and checked the kernels around the scan on CUDA ("Found no NVIDIA
    driver"): three FAIL rows and exit 1 (QA 15b)."""
    import torch
    from svp.ops import dispatch
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: Triton is checked on CUDA tensors")
    if dispatch._load("triton") is None:
        pytest.skip(dispatch.unavailable_backends()["triton"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rc = main(["doctor", "--no-timing"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    assert rc == 0 and "FAIL" not in out, out
    assert not any(r[:1] == ["cuda"] and "ok" in r for r in rows), out   # nothing checked on CUDA
    assert any(r[:3] == ["cpu", "triton", "ok"] and r[-1] == "[interpreter]" for r in rows), out
    for name in ("conv", "add+RMSNorm", "SVP prompts"):
        assert any(line.startswith(f"  cpu   {name:11s} ok  ") and line.endswith("[interpreter]")
                   for line in out.splitlines()), (name, out)
    assert "under Triton's interpreter (TRITON_INTERPRET=1 is set)" in out, out


@pytest.mark.slow  # a doctor in a process of its own (SVP_CPU_MATMUL is read once)
def test_a_bad_cpu_matmul_setting_fails_its_row_not_the_kernels(tmp_path):
    """SVP_CPU_MATMUL=bogus: the SVP prompts and fused-model checks, which stopped on it, were named
    as failed kernels (review of svp doctor)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, SVP_CPU_MATMUL="bogus", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "svp", "doctor", "--no-timing"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert "FAILED: SVP_CPU_MATMUL (the 'CPU products' row above)" in lines, out.stdout
    assert any("not run SVP_CPU_MATMUL" in ln for ln in lines), out.stdout
    assert not any(" FAIL " in ln for ln in lines if "CPU products" not in ln), out.stdout


def test_the_openmp_spin_line_says_where_the_setting_is_read(monkeypatch):
    """svp doctor said "GOMP_SPINCOUNT=1000 (set by svp)" on every system, but libgomp alone reads
    it (Linux's torch; macOS's uses LLVM's libomp): elsewhere the line says it does nothing (review45)."""
    import svp.doctor as d
    if d.sys.platform.startswith("linux"):
        assert "does not read it" not in d._wait_policy()
    monkeypatch.setattr(d.sys, "platform", "darwin")
    assert "read by libgomp (Linux's torch) alone" in d._wait_policy()


def test_cpu_name_asks_macos_and_windows_for_the_brand_name(tmp_path, monkeypatch):
    """platform.processor() says 'arm' or 'i386' on a Mac and 'Intel64 Family 6 ...' on Windows
    (review45): there the OS's own brand string is read (emulated: no such machine here)."""
    import subprocess
    import sys
    import types

    from svp import doctor
    missing = str(tmp_path / "missing")
    calls = []

    def sysctl(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="Apple M2 Pro\n", stderr="")
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(subprocess, "run", sysctl)
    assert doctor.cpu_name(missing) == "Apple M2 Pro"
    assert calls == [["sysctl", "-n", "machdep.cpu.brand_string"]]

    def no_sysctl(argv, **kw):
        raise FileNotFoundError(2, "No such file or directory", argv[0])
    monkeypatch.setattr(subprocess, "run", no_sysctl)
    monkeypatch.setattr(doctor.platform, "processor", lambda: "arm")
    assert doctor.cpu_name(missing) == "arm"   # (what there is left to say)

    opened = []

    class Key:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False
    reg = types.SimpleNamespace(HKEY_LOCAL_MACHINE="HKLM",
                                OpenKey=lambda root, path: opened.append((root, path)) or Key(),
                                QueryValueEx=lambda k, name: ("Intel(R) Core(TM) i7-9700K CPU @ 3.60GHz  ", 1))
    monkeypatch.setitem(sys.modules, "winreg", reg)
    monkeypatch.setattr(sys, "platform", "win32")
    assert doctor.cpu_name(missing) == "Intel(R) Core(TM) i7-9700K CPU @ 3.60GHz"
    assert opened == [("HKLM", r"HARDWARE\DESCRIPTION\System\CentralProcessor\0")]


def test_the_mamba_ssm_row_tells_installed_but_broken_from_missing(tmp_path, monkeypatch):
    """mamba_ssm installed without its CUDA extension (spec checkpoints-and-install.md 1.3) was
    "not installed" in `svp doctor`; and one whose import exits ended the doctor silently, where
    `svp train` went on (review 54)."""
    import importlib
    import sys

    from svp.ops import scan_cuda
    monkeypatch.delitem(sys.modules, "mamba_ssm", raising=False)
    assert scan_cuda.version() == "not installed"   # (none here)
    pkg = tmp_path / "mamba_ssm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import selective_scan_cuda\n")
    meta = tmp_path / "mamba_ssm-1.1.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: mamba_ssm\nVersion: 1.1.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert scan_cuda.version() == ("1.1.1 installed, not importable (ModuleNotFoundError: No module named "
                                   "'selective_scan_cuda')")
    (pkg / "__init__.py").write_text("raise SystemExit(3)\n")
    importlib.invalidate_caches()
    assert scan_cuda.version() == "1.1.1 installed, not importable (SystemExit: 3)"
    # the backend module's own import of it: unavailable, saying why (it exited the doctor)
    spec = importlib.util.spec_from_file_location("svp.ops._scan_cuda_probe", scan_cuda.__file__)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert not probe.available() and probe.unavailable_reason() == "mamba_ssm not importable (SystemExit: 3)"
    # its metadata left where its folder is gone: a broken install, not "not installed"
    import shutil
    shutil.rmtree(pkg)
    monkeypatch.delitem(sys.modules, "mamba_ssm", raising=False)
    importlib.invalidate_caches()
    assert scan_cuda.version() == "1.1.1 installed, not importable (ModuleNotFoundError: No module named 'mamba_ssm')"
    # the doctor's other package rows say it in the same words (they said "not importable" of both)
    from svp.compat import module_version
    assert module_version("svp_no_such_package") == "not installed"
    assert module_version("mamba_ssm") == scan_cuda.version()
    # a package without __version__: pip's metadata's (it said "unknown")
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "mamba_ssm", raising=False)
    importlib.invalidate_caches()
    assert module_version("mamba_ssm") == "1.1.1"
    monkeypatch.delitem(sys.modules, "mamba_ssm", raising=False)
