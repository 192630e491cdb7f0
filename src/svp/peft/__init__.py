"""Adaptation methods for Vision Mamba on one harness (modelled on HF peft).

    cfg = make_config('svp', shared_layers=8, hidden=64, num_classes=100)
    model = get_peft_model(vim, cfg)        # only SVP params + head trainable
    print(model.trainable_report())
    model.save('out/adapter', class_names=classes)
    model2 = load_adapter(fresh_vim, 'out/adapter')  # refuses other base weights

Built-in methods: svp, linear, full, vpt_shallow, vpt_deep, visual_prompt, bitfit, lora, adapter;
``list_methods()`` gives every registered one (``register_method``; docs/architecture.md).
"""
from .base import PeftConfig, PeftMethod, PeftModel, get_peft_model, load_adapter
from .heads import build_head, simam
from .io import AdapterError, base_weights_hash, read_adapter_config, save_adapter
from .registry import config_from_dict, get_method, list_methods, make_config, register_method, setting_names

# The built-in methods register themselves on import; the user's (SVP_PLUGINS, entry points) are
# imported by svp's own __init__, once the package is whole (a plugin may `from svp import ...`).
from . import adapter, bitfit, full, linear, lora, svp, visual_prompt, vpt  # noqa: E402,F401
from .registry import load_plugins  # noqa: E402

__all__ = ["PeftConfig", "PeftMethod", "PeftModel", "get_peft_model", "make_config", "config_from_dict",
           "list_methods", "setting_names", "get_method", "register_method", "load_adapter", "save_adapter",
           "read_adapter_config", "base_weights_hash", "AdapterError", "build_head", "simam", "load_plugins"]
