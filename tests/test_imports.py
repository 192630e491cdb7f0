"""Import structure: no cycle between svp modules (function-local imports included, so a
cycle cannot hide behind one), and every module imports on its own in a fresh process."""
import ast
import os
import subprocess
import sys
import textwrap

import pytest

import svp

SRC = os.path.dirname(os.path.dirname(os.path.abspath(svp.__file__)))


def package_modules(src_root, package="svp"):
    """{module name: (path, is_package)} for every .py file of ``package`` under ``src_root``."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(src_root, package)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, src_root)[:-3].replace(os.sep, ".")
                is_pkg = name.endswith(".__init__")
                out[name[:-len(".__init__")] if is_pkg else name] = (path, is_pkg)
    return out


def imported_modules(name, path, is_pkg, known):
    """{imported module of ``known``: line} for every import statement in the file, at any
    depth (inside functions too). ``from pkg import sub`` counts as importing ``pkg.sub``."""
    package = name if is_pkg else name.rpartition(".")[0]
    found = {}
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                module = base + ("." + node.module if node.module else "")
            else:
                module = node.module or ""
            targets = [module + "." + a.name if module + "." + a.name in known else module for a in node.names]
        for t in targets:
            if t in known and t != name:
                found.setdefault(t, node.lineno)
    return found


def import_cycles(modules):
    """Strongly connected components (size > 1) of the import graph, each as a sorted list,
    with the edges inside it for the error message."""
    edges = {n: imported_modules(n, p, pkg, modules) for n, (p, pkg) in modules.items()}
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [[f"{a} -> {b} (line {edges[a][b]})" for a in comp for b in sorted(edges[a]) if b in comp]
            for comp in comps]


def test_no_import_cycle_between_svp_modules():
    cycles = import_cycles(package_modules(SRC))
    assert cycles == [], "import cycles (move the shared part to a module both can import):\n" + "\n".join(
        "\n".join(c) + "\n" for c in cycles)


def test_the_cycle_check_sees_function_local_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (pkg / "c.py").write_text("from . import a\n")  # imports into the cycle, is not part of it
    assert import_cycles(package_modules(str(tmp_path), "pkg")) == [
        ["pkg.a -> pkg.sub.b (line 1)", "pkg.sub.b -> pkg.a (line 2)"]]


# Each module is imported in a child forked from a process that has loaded the third-party
# libraries svp uses (torch alone takes seconds to import) but no svp module.
_ISOLATED = textwrap.dedent("""
    import importlib, os, sys, traceback
    preload, names = sys.argv[1].split(","), sys.argv[2].split(",")
    for lib in preload:
        try:
            importlib.import_module(lib)
        except Exception:
            pass  # optional (mamba_ssm, tensorboard): the svp module handles its absence
    assert not any(m == "svp" or m.startswith("svp.") for m in sys.modules)
    failed = []
    for name in names:
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
                code = 0
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        if os.waitpid(pid, 0)[1] != 0:
            failed.append(name)
    print("FAILED:" + ",".join(failed))
""")


@pytest.mark.slow
def test_every_svp_module_imports_on_its_own():
    modules = package_modules(SRC)
    names = sorted(n for n in modules if n != "svp.__main__")  # importing __main__ runs the CLI
    third_party = set()
    for path, _ in modules.values():
        with open(path, encoding="utf-8") as f:
            for node in ast.walk(ast.parse(f.read())):
                if isinstance(node, ast.Import):
                    third_party.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    third_party.add(node.module)
    third_party = sorted(m for m in third_party if m.split(".")[0] != "svp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    if hasattr(os, "fork"):
        runs = [[sys.executable, "-c", _ISOLATED, ",".join(third_party), ",".join(names)]]
    else:  # one fresh interpreter per module: slow, but the same check
        runs = [[sys.executable, "-c", f"import {n}"] for n in names]
    failed, output = [], []
    for cmd in runs:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        output.append(r.stderr[-4000:])
        if hasattr(os, "fork"):
            assert r.returncode == 0 and "FAILED:" in r.stdout, r.stdout + r.stderr
            failed += [n for n in r.stdout.rsplit("FAILED:", 1)[1].strip().split(",") if n]
        elif r.returncode:
            failed.append(cmd[-1])
    assert not failed, f"these modules fail to import on their own: {failed}\n" + "\n".join(output)


# Which rooms each room may import (docs/architecture.md). A room is the first name under
# svp (svp.engine.loop -> engine; svp/build.py -> build). Lower rooms never import higher ones,
# so a change high up (a command, the server) cannot break the library below it.
BASE = {"errors", "io", "compat", "_version"}
ALLOWED = {
    "_version": set(),
    "errors": set(),
    "io": set(),
    "runtime": {"errors"},   # (launch's ConfigError; errors imports nothing)
    "compat": set(),
    "ops": BASE | {"runtime"},   # (scan_cpu reads SVP_CPU_DEDICATED through runtime.dedicated)
    "models": BASE | {"ops"},
    "peft": BASE | {"ops", "models"},
    "build": BASE | {"ops", "models", "peft"},
    "data": BASE,
    "engine": BASE | {"ops", "models", "peft", "build", "data", "runtime"},   # (runtime.held_heap)
    "viz": BASE | {"ops", "models", "peft", "build", "data"},
    "serve": BASE | {"ops", "models", "peft", "build", "data", "viz"},
    "pretrain": BASE | {"ops", "models", "peft", "build", "data", "engine"},
    "demo": BASE | {"ops", "models", "peft", "build", "data", "engine", "viz"},
    "doctor": BASE | {"ops", "models", "peft", "runtime"},
}
# Entry points may import anything: the package root (registers the models), the CLI.
UNRESTRICTED = {"svp", "cli", "__main__"}
# A module that stands above its room: importing an official SVP checkpoint builds a backbone.
EXCEPTIONS = {"svp.peft.convert": {"build"}}


def _room(name):
    parts = name.split(".")
    return "svp" if len(parts) == 1 else parts[1]


def layering_violations(modules):
    out = []
    for name, (path, is_pkg) in sorted(modules.items()):
        room = _room(name)
        if room in UNRESTRICTED:
            continue
        allowed = ALLOWED.get(room)
        if allowed is None:
            out.append(f"{name}: room {room!r} has no entry in ALLOWED (add it and to docs/architecture.md)")
            continue
        for target, line in sorted(imported_modules(name, path, is_pkg, modules).items()):
            t_room = _room(target)
            if t_room != room and t_room not in allowed | EXCEPTIONS.get(name, set()):
                out.append(f"{name} (line {line}) imports {target}: room {room!r} may import only {sorted(allowed)}")
    return out


def test_rooms_import_only_the_rooms_below_them():
    bad = layering_violations(package_modules(SRC))
    assert bad == [], "layering (docs/architecture.md):\n" + "\n".join(bad)


def test_the_layering_check_sees_an_upward_import(tmp_path):
    pkg = tmp_path / "svp"
    (pkg / "ops").mkdir(parents=True)
    for f in ("__init__.py", "ops/__init__.py", "errors.py"):
        (pkg / f).write_text("")
    (pkg / "engine.py").write_text("")
    (pkg / "ops" / "scan.py").write_text("from .. import errors\n\ndef f():\n    from ..engine import x\n")
    assert layering_violations(package_modules(str(tmp_path))) == [
        "svp.ops.scan (line 4) imports svp.engine: room 'ops' may import only ['_version', 'compat', 'errors', 'io', 'runtime']"]


def test_the_scripts_beside_the_package_import_names_svp_has():
    """docs/make_viz_examples.py (which docs/visualize.md says to rerun) imported write_json from
    svp.viz.cli after it had moved, inside main(): it failed only when run (QA 15c). Every
    `from svp... import name` in the scripts of docs/ and benchmarks/ must name what svp has."""
    import ast
    import glob
    import importlib
    root = os.path.dirname(SRC)
    missing = []
    scripts = sorted(glob.glob(os.path.join(root, "docs", "*.py")) + glob.glob(os.path.join(root, "benchmarks", "*.py")))
    assert len(scripts) > 10, scripts
    for path in scripts:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "svp":
                try:
                    mod = importlib.import_module(node.module)
                except ImportError as e:
                    if "triton" in str(e) or "mamba_ssm" in str(e):
                        continue   # (a GPU script's module on a machine without them)
                    missing.append(f"{os.path.relpath(path, root)}:{node.lineno}: {node.module} ({e})")
                    continue
                for a in node.names:
                    if a.name != "*" and not hasattr(mod, a.name):
                        try:   # a submodule imported by name
                            importlib.import_module(f"{node.module}.{a.name}")
                        except ImportError:
                            missing.append(f"{os.path.relpath(path, root)}:{node.lineno}: {node.module}.{a.name}")
    assert not missing, "\n".join(missing)
