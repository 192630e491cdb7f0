"""Vision Mamba models, registered with timm on import."""
from .loading import CheckpointError, extract_state_dict, load_checkpoint_into, read_checkpoint
from .vim import (BiMambaMixer, Block, PatchEmbed, VisionMamba, _patch_timm_checkpoint_path,
                  checkpoint_filter_fn, resample_pos_embed_midcls)

from . import vim_mini  # noqa: F401  (registers vim_mini_patch4_32, the bundled backbone)
_patch_timm_checkpoint_path()

__all__ = ["VisionMamba", "BiMambaMixer", "Block", "PatchEmbed", "checkpoint_filter_fn",
           "resample_pos_embed_midcls", "load_checkpoint_into", "read_checkpoint", "extract_state_dict",
           "CheckpointError"]
