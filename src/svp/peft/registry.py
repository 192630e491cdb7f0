"""Name -> (config dataclass, method module) registry of adaptation methods.

The built-in method modules register themselves when ``svp.peft`` is imported (its
``__init__`` imports them; a package's ``__init__`` runs before any of its modules), so
this module imports none of them."""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

_METHODS: Dict[str, Tuple[type, type]] = {}


def register_method(name: str, config_cls: type, method_cls: type):
    """Register an adaptation method under ``name`` (its config's ``method`` field)."""
    if name in _METHODS and _METHODS[name] != (config_cls, method_cls):
        raise ValueError(f"adaptation method {name!r} is already registered")
    _METHODS[name] = (config_cls, method_cls)


def list_methods():
    return sorted(_METHODS)


def get_method(name: str) -> Tuple[type, type]:
    if name not in _METHODS:
        raise ValueError(f"unknown adaptation method {name!r}; known: {sorted(_METHODS)}")
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
