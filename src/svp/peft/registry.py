"""Name -> (config dataclass, method module) registry of adaptation methods.

The built-in method modules register themselves when ``svp.peft`` is imported (its
``__init__`` imports them; a package's ``__init__`` runs before any of its modules), so
this module imports none of them."""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import warnings
from typing import Dict, List, Optional, Tuple

_METHODS: Dict[str, Tuple[type, type]] = {}

# Methods written outside the package: modules named in SVP_PLUGINS (comma-separated, importable
# from sys.path, e.g. with PYTHONPATH) and installed packages' entry points in this group. Each
# registers its methods when imported, as the built-ins do; `import svp` imports them once the
# package is whole, so every command, sweep worker and server has them (the environment is inherited).
PLUGINS_ENV = "SVP_PLUGINS"
ENTRY_POINT_GROUP = "svp.methods"
HINT = (f"a method of your own: name its module in {PLUGINS_ENV} (or an entry point in group "
        f"{ENTRY_POINT_GROUP!r}); docs/architecture.md, 'Adding an adaptation method'")
_loaded: List[str] = []


class PluginWarning(UserWarning):
    """A module named in SVP_PLUGINS, or an entry point, that could not be imported."""


def load_plugins() -> List[str]:
    """Import the method modules of ``SVP_PLUGINS`` and of the ``svp.methods`` entry points (once
    each); returns the names imported. One that fails is a :class:`PluginWarning` naming it and
    why, and the others are still imported (a command that does not use it still runs)."""
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    wanted = [(n, None) for n in names]
    try:
        from importlib.metadata import entry_points
        eps = entry_points()
        group = eps.select(group=ENTRY_POINT_GROUP) if hasattr(eps, "select") else eps.get(ENTRY_POINT_GROUP, [])
        wanted += [(f"{ep.name} = {ep.value}", ep) for ep in group]
    except Exception as e:  # noqa: BLE001  (broken installed metadata: said, the built-ins still work)
        warnings.warn(f"the {ENTRY_POINT_GROUP!r} entry points could not be read: {type(e).__name__}: {e}",
                      PluginWarning, stacklevel=2)
    done = []
    for name, ep in wanted:
        if name in _loaded:
            continue
        before = set(_METHODS)
        try:
            ep.load() if ep is not None else importlib.import_module(name)
        except Exception as e:  # noqa: BLE001  (its own error, whatever it is, named with the module)
            # what the modules that failed registered is taken back (a half-imported module's method
            # was listed and trained while the warning said it was not registered: retest 88): a
            # module whose import failed is no longer in sys.modules. A plugin it imported first,
            # which did import, keeps its methods (all were taken back, and its own turn, a module
            # already imported, registered nothing: retest 89). By the module that registered a
            # method, not the one its class lives in (a failed plugin registering a class of another
            # module kept it: retest 90)
            for added in set(_METHODS) - before:
                by = _REGISTERED_BY.get(added)
                if by is None or by not in sys.modules:
                    del _METHODS[added]
            where = f"{PLUGINS_ENV} names {name!r}" if ep is None else f"the entry point {name!r}"
            warnings.warn(f"{where}, which could not be imported ({type(e).__name__}: {e}); none of its methods "
                          f"is registered", PluginWarning, stacklevel=2)
            continue
        _loaded.append(name)
        done.append(name)
    return done


def register_method(name: str, config_cls: type, method_cls: type):
    """Register an adaptation method under ``name`` (its config's ``method`` field)."""
    if name in _METHODS and _METHODS[name] != (config_cls, method_cls):
        raise ValueError(f"adaptation method {name!r} is already registered")
    _METHODS[name] = (config_cls, method_cls)
    _REGISTERED_BY[name] = _importing_module()


# method name -> the module whose import registered it (None: registered after imports, by a call)
_REGISTERED_BY: Dict[str, Optional[str]] = {}


def _importing_module() -> Optional[str]:
    """The innermost module being imported on the caller's stack (its top-level code), if any."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "<module>":
            return frame.f_globals.get("__name__")
        frame = frame.f_back
    return None


def list_methods():
    return sorted(_METHODS)


def get_method(name: str) -> Tuple[type, type]:
    if name not in _METHODS:
        raise ValueError(f"unknown adaptation method {name!r}; known: {sorted(_METHODS)} ({HINT})")
    return _METHODS[name]


def setting_names(method_name: str) -> set:
    """The settings ``make_config(method_name, ...)`` takes."""
    config_cls, _ = get_method(method_name)
    return {f.name for f in dataclasses.fields(config_cls) if f.init}


def make_config(method_name: str, **settings):
    """The config dataclass of ``method_name`` with ``settings`` applied, e.g.
    ``make_config('svp', shared_layers=8, hidden=64, num_classes=100)``."""
    config_cls, _ = get_method(method_name)
    names = setting_names(method_name)
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for method {method_name!r}; valid settings: {sorted(names)}")
    return config_cls(**settings)


def config_from_dict(d: dict):
    """Rebuild a config from ``config.to_dict()`` (as stored in adapter_config.json)."""
    d = dict(d)
    if "method" not in d:
        raise ValueError(f"config dict has no 'method' key: {sorted(d)}")
    name = d.pop("method")
    for k, v in list(d.items()):
        if isinstance(v, list):
            d[k] = tuple(v)
    return make_config(name, **d)
