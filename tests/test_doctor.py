"""`svp doctor` runs here and finds every available scan backend correct."""
import importlib.util

from svp.cli import main


def test_doctor_passes(capsys):
    rc = main(["doctor", "--no-timing"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "selective-scan backends" in out and "all available backends agree" in out
    assert "FAIL" not in out
    if importlib.util.find_spec("triton") is not None:
        # listed with its version and checked (through the interpreter when there is no GPU)
        assert any(line.split()[:1] == ["triton"] and line.split()[1][0].isdigit() for line in out.splitlines()), out
        assert any(line.split()[:3] in (["cpu", "triton", "ok"], ["cuda", "triton", "ok"])
                   for line in out.splitlines()), out
