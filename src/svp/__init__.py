"""svp: Selective Visual Prompting for Vision Mamba.

Importing svp registers the Vim models in timm's registry.
"""
from ._version import __version__  # noqa: F401 (svp.__version__)

from . import runtime as _runtime

if _runtime.started_as_command() and __import__("sys").argv[1:] == ["--version"]:
    # `svp --version` answered before torch and timm are imported: it took 2.5-3.6 s (retest 82)
    from .cli import version_only as _version_only

    raise SystemExit(_version_only())

_runtime.configure()  # before torch is imported: libgomp spin count (see svp.runtime)
_runtime.guard_command_imports()  # the svp command: a Ctrl-C while it imports is one line, exit 130
_runtime.hide_leak_report_at_exit()  # first: runs after torch's and the others' (svp.runtime)

with _runtime.imports_outside_gc():  # torch, timm, svp: ~0.5 s of collections less (svp.runtime)
    from .compat import numpy_bridge_problem as _numpy_bridge_problem  # noqa: E402

    _problem = _numpy_bridge_problem()
    if _problem:   # (torch < 2.3 beside NumPy 2: every batch would fail)
        _runtime.install_problem(_problem)
    try:
        from . import models  # noqa: E402,F401  (registers vim_* with timm)
    except (ImportError, RuntimeError) as _e:   # (timm imports torchvision: one built for another torch?)
        from .compat import torchvision_problem as _torchvision_problem

        _problem = _torchvision_problem(_e)
        if not _problem:
            raise
        _runtime.install_problem(_problem, _e)
    from .peft import load_adapter  # noqa: E402,F401  (svp.load_adapter)
    from .peft.registry import load_plugins as _load_plugins  # noqa: E402

    # the user's methods (SVP_PLUGINS, entry points), once svp is whole: a plugin's `from svp import
    # load_adapter` failed while svp.peft imported it (retest 88)
    _load_plugins()
