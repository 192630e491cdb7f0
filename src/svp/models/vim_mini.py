"""The bundled mini Vim: ``vim_mini_patch4_32``.

Same :class:`~svp.models.vim.VisionMamba` code as the full models, sized for CPUs:
32x32 input, 4x4 patches (stride 4, 64 patch tokens + the middle class token),
width 64, depth 8. Its pre-trained weights ship inside the package
(``svp/assets/vim_mini_patch4_32.safetensors``, trained by ``svp pretrain`` on IFS
fractal categories; see ``svp/assets/MODEL_CARD.md`` and docs/mini_backbone.md), so
``timm.create_model('vim_mini_patch4_32', pretrained=True, num_classes=N)`` works
offline: the source-task head is dropped when ``N`` differs from it.
"""
from __future__ import annotations

import os

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from .vim import VisionMamba, _create_vim

__all__ = ["MINI_ARCH", "MINI_ASSET", "mini_asset_path", "vim_mini_patch4_32"]

MINI_ARCH = dict(img_size=32, patch_size=4, stride=4, embed_dim=64, depth=8, d_state=16, expand=2)
MINI_ASSET = "vim_mini_patch4_32.safetensors"
MINI_SOURCE_CLASSES = 32


def mini_asset_path(name: str = MINI_ASSET) -> str:
    """Filesystem path of a file in the installed ``svp/assets`` folder."""
    try:
        from importlib.resources import files
        return os.fspath(files("svp").joinpath("assets", name))
    except Exception:  # pragma: no cover - very old importlib
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", name)


default_cfgs = generate_default_cfgs({
    "vim_mini_patch4_32.ifs32_fractal": {
        "file": mini_asset_path(), "num_classes": MINI_SOURCE_CLASSES, "input_size": (3, 32, 32),
        "pool_size": None, "crop_pct": 1.0, "interpolation": "bilinear", "fixed_input_size": False,
        # the pretraining normalised with timm's ImageNet statistics, as the data recipes do by default
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        # through VisionMamba.load_pretrained, as the full models' files: svp's checks, errors and
        # adaptations (another channel count, grid or head), not timm's loader
        "custom_load": True,
    },
})


@register_model
def vim_mini_patch4_32(pretrained=False, **kwargs) -> VisionMamba:
    args = dict(MINI_ARCH, drop_path_rate=0.0)
    given = [c for c in (kwargs.get("pretrained_cfg_overlay"), kwargs.get("pretrained_cfg")) if isinstance(c, dict)]
    own_file = any(c.get("file") or c.get("state_dict") is not None for c in given)   # (weights of the caller's)
    if pretrained and not own_file and not os.path.isfile(mini_asset_path()):
        raise FileNotFoundError(f"bundled mini Vim weights not found at {mini_asset_path()}; the package "
                                f"install is incomplete (svp/assets must be package data)")
    return _create_vim("vim_mini_patch4_32", pretrained, **dict(args, **kwargs))
