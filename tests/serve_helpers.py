"""Shared by the serve tests and benchmarks/serve.py: adapters of every method on the
bundled mini Vim, with randomly perturbed parameters (nothing is trained)."""
from __future__ import annotations

import os

import torch

MINI = "vim_mini_patch4_32"

# name -> (method, settings); every method and both SVP modes, several head kinds and class counts
SPECS = {
    "svp": ("svp", dict(shared_layers=4, hidden=16, num_classes=10)),
    "svp_official": ("svp", dict(shared_layers=8, hidden=8, compat="official", simam=True, num_classes=5)),
    "linear2": ("linear", dict(head="two_layer", num_classes=7)),
    "vpt_deep": ("vpt_deep", dict(num_tokens=4, placement="middle", num_classes=10)),
    "vpt_shallow": ("vpt_shallow", dict(num_tokens=4, placement="middle", num_classes=3)),
    "visual_prompt": ("visual_prompt", dict(pad=4, num_classes=10)),
    "bitfit": ("bitfit", dict(num_classes=10)),
    "lora": ("lora", dict(r=4, alpha=8.0, num_classes=10)),
    "adapter": ("adapter", dict(bottleneck=8, num_classes=6)),
    "full": ("full", dict(num_classes=4)),
}


def mini_backbone():
    from svp.serve.backbone import build_backbone
    return build_backbone(MINI)


def make_adapter(directory, method, settings, seed=0, scale=0.05):
    """Save an adapter of ``method`` whose trainable tensors are perturbed (so that it does
    something) and return the directory."""
    import svp.peft as peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(mini_backbone(), peft.make_config(method, **settings))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (scale if "head" not in n else 0.5))
    n = model.base_model.num_classes
    model.save(directory, base_model_name=MINI, class_names=[f"{method}-class-{i}" for i in range(n)])
    return os.fspath(directory)


def make_adapters(root, names=None, seed=0):
    os.makedirs(root, exist_ok=True)
    for k, name in enumerate(names or SPECS):
        method, settings = SPECS[name]
        make_adapter(os.path.join(root, name), method, settings, seed=seed + k)
    return root
