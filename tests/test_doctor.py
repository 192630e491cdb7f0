"""`svp doctor` runs here and finds every available scan backend correct."""
from svp.cli import main


def test_doctor_passes(capsys):
    rc = main(["doctor", "--no-timing"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "selective-scan backends" in out and "all available backends agree" in out
    assert "FAIL" not in out
