"""`svp doctor` runs here and finds every available scan backend correct."""
import importlib.util

import pytest

from svp.cli import main


@pytest.mark.slow  # every backend, with timings
def test_doctor_passes(capsys):
    rc = main(["doctor", "--no-timing"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "selective-scan backends" in out and "all available backends agree" in out
    assert "FAIL" not in out
    import svp
    # how torch's threads wait, as svp.runtime set it (or found it)
    assert f"{'libgomp wait':14s} {svp.runtime.status()['omp_wait_policy']}" in out, out
    # and what it did with the cyclic collector around svp's imports
    assert svp.runtime.status()["gc"] and f"{'collector':14s} {svp.runtime.status()['gc']}" in out, out
    # whether bfloat16 products (train.amp, --amp) have instructions on this CPU
    from svp.compat import cpu_bf16_instructions
    found = cpu_bf16_instructions()
    row = next(line for line in out.splitlines() if line.strip().startswith("CPU bfloat16"))
    assert (", ".join(found) + ":" in row) if found else ("slower" in row or "unknown" in row), row
    if importlib.util.find_spec("triton") is not None:
        # listed with its version and checked (through the interpreter when there is no GPU)
        assert any(line.split()[:1] == ["triton"] and line.split()[1][0].isdigit() for line in out.splitlines()), out
        from svp.ops import dispatch
        if dispatch._load("triton") is not None:
            assert any(line.split()[:3] in (["cpu", "triton", "ok"], ["cuda", "triton", "ok"])
                       for line in out.splitlines()), out
        else:  # a Triton too old for the backend (Triton 2, with torch < 2.4): doctor says why
            assert any(line.split()[:2] == ["triton", "unavailable:"] and "too old" in line
                       for line in out.splitlines()), out
