"""What `pip install svp-vim` gets: the wheel built from the tree. Every other test runs the
editable install (`make install`), which reads the source tree itself, so a file the wheel lacks
(a data file outside pyproject's package-data globs: a new asset, recipe folder or page) would
pass them all and fail only for users."""
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest

import svp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(svp.__file__))))
PACKAGE = os.path.join(ROOT, "src", "svp")


def _tracked_files():
    """The files a clean checkout has: git's tracked files; without git (a source archive, or a
    repository git refuses), the tree less what builds and installs leave there (an editable
    install's *.egg-info, whose SOURCES.txt setuptools would read back into the wheel, build/)."""
    try:
        out = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached"], capture_output=True, check=True).stdout
        return [p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        found = []
        for dirpath, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", ".git", "build", "dist", ".pytest_cache")
                       and not d.startswith(".venv") and not d.endswith(".egg-info")]
            found += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in files]
        return found


def _setuptools_version() -> tuple:
    try:
        from importlib.metadata import version
        return tuple(int(p) for p in version("setuptools").split(".")[:2] if p.isdigit())
    except Exception:   # (not installed)
        return ()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel, built (as pip builds it for an install) from a copy of the checkout, so that
    the build's own folders (build/, *.egg-info) stay out of the tree."""
    copy = tmp_path_factory.mktemp("tree")
    for rel in _tracked_files():
        if rel.startswith(("src/", "src" + os.sep)) or rel in ("pyproject.toml", "README.md", "LICENSE"):
            dst = copy / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(os.path.join(ROOT, rel), "rb") as f:
                dst.write_bytes(f.read())
    out = tmp_path_factory.mktemp("wheel")
    # with this environment's setuptools (torch's dependency) where it is new enough for
    # pyproject's build-system: then no download
    isolation = ["--no-build-isolation"] if _setuptools_version() >= (77,) else []
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
                        "-w", str(out), str(copy)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = out.glob("svp_vim-*.whl")
    return path


@pytest.mark.slow
def test_the_wheel_holds_every_file_of_the_package_and_the_command(wheel):
    tree = sorted(rel.replace(os.sep, "/")[len("src/"):] for rel in _tracked_files()
                  if rel.replace(os.sep, "/").startswith("src/svp/"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        in_wheel = sorted(n for n in names if n.startswith("svp/"))
        (entry,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = z.read(entry).decode()
    assert any(f.endswith(".safetensors") for f in tree) and any(f.endswith(".yaml") for f in tree)
    assert set(tree) - set(in_wheel) == set(), "files of the package the wheel lacks (pyproject.toml, package-data)"
    assert set(in_wheel) - set(tree) == set(), "files in the wheel that the checkout lacks"
    assert "svp = svp.cli:run" in entry_points
    # the version pip records is svp.__version__ (pyproject reads it from there: one place to change)
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    with zipfile.ZipFile(wheel) as z:
        assert f"\nVersion: {svp.__version__}\n" in z.read(meta).decode()


@pytest.mark.slow
def test_the_installed_wheel_finds_its_data_outside_the_source_tree(wheel, tmp_path):
    """Unpacked (as pip installs it) and imported from there, in a folder outside the checkout:
    the bundled backbone's weights, the dataset recipes, the demo's preset and the server's page
    are read from the installed package."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    script = textwrap.dedent("""
        import os, sys
        import svp
        site = sys.argv[1]
        assert svp.__file__.startswith(site), svp.__file__
        import timm, torch
        from svp.demo import load_preset
        from svp.serve.app import STATIC
        from svp.models.vim_mini import mini_asset_path
        from safetensors.torch import load_file
        m = timm.create_model("vim_mini_patch4_32", pretrained=True)   # (weights read from the asset)
        assert mini_asset_path().startswith(site)
        weights = load_file(mini_asset_path())
        state = m.state_dict()
        assert set(state) == set(weights) and all(torch.equal(v, weights[k]) for k, v in state.items())
        assert load_preset()["lr"], "demo preset"
        assert os.path.isfile(os.path.join(STATIC, "index.html")) and STATIC.startswith(site)
        from svp.cli import main
        sys.exit(main(["data", "list"]))
    """)
    env = dict(os.environ, PYTHONPATH=str(site))
    r = subprocess.run([sys.executable, "-c", script, str(site)], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "vtab/cifar" in r.stdout and "digits" in r.stdout, r.stdout
