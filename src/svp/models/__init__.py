"""Vision Mamba models, registered with timm on import."""
from .loading import CheckpointError, extract_state_dict, load_checkpoint_into, read_checkpoint
from .vim import (BiMambaMixer, Block, PatchEmbed, VisionMamba, _patch_timm_checkpoint_path,
                  checkpoint_filter_fn, resample_pos_embed_midcls)

from . import vim_mini  # noqa: F401  (registers vim_mini_patch4_32, the bundled backbone)
from .vit import HookedViT, NotAViTBackbone, as_backbone, is_vit
_patch_timm_checkpoint_path()

# the models svp registers with timm, whose files svp's loader reads: a backbone.json read from a
# folder may give timm's loader arguments (checkpoint_path, pretrained_cfg) to these alone (another
# model's would be read by timm's own loader, which before timm 1.0.31 unpickled anything: svp.build)
MODEL_NAMES = ("vim_tiny_patch16_224", "vim_tiny_patch16_stride8_224", "vim_small_patch16_224",
               "vim_small_patch16_stride8_224", "vim_base_patch16_224", "vim_mini_patch4_32")

__all__ = ["VisionMamba", "BiMambaMixer", "Block", "PatchEmbed", "checkpoint_filter_fn",
           "resample_pos_embed_midcls", "load_checkpoint_into", "read_checkpoint", "extract_state_dict",
           "CheckpointError", "MODEL_NAMES", "HookedViT", "NotAViTBackbone", "as_backbone", "is_vit"]
