"""Pixel-space visual prompting (Bahng et al. 2022, "padding" prompter): a learned
frame of width ``pad`` pixels added to the border of the (normalised) input image; the
interior is untouched. Zero-initialised, so the untrained model is the backbone.
Parameters: 2 * 3 * pad * W (top, bottom) + 2 * 3 * (H - 2 pad) * pad (left, right)."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .base import PeftConfig, PeftMethod
from .registry import register_method


@dataclasses.dataclass
class VisualPromptConfig(PeftConfig):
    """pad: border width in pixels; image_size: (H, W) the prompt is made for (None = the
    model's input size)."""
    pad: int = 30
    image_size: tuple = None

    method = "visual_prompt"

    def __post_init__(self):
        super().__post_init__()
        if int(self.pad) <= 0:
            raise ValueError(f"visual_prompt: pad must be positive, got {self.pad}")
        if self.image_size is not None:
            sides = self.image_size if isinstance(self.image_size, (list, tuple)) else (self.image_size,) * 2
            if len(sides) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in sides):
                raise ValueError(f"visual_prompt: image_size={self.image_size!r}; expected a positive integer "
                                 f"or (height, width)")
            self.image_size = tuple(sides)


class VisualPrompt(PeftMethod):
    serve_shared = True   # a frame added to each row's own image
    def __init__(self, config: VisualPromptConfig, model: nn.Module):
        super().__init__(config, model)
        h, w = config.image_size or tuple(model.patch_embed.img_size)
        p = int(config.pad)
        if 2 * p >= min(h, w):
            raise ValueError(f"visual_prompt: pad {p} leaves no interior in a {h}x{w} image; choose a pad below "
                             f"{(min(h, w) + 1) // 2} (svp train: method.settings.pad=N)")
        c = model.patch_embed.proj.in_channels
        self.size, self.pad = (h, w), p
        self.pad_top = nn.Parameter(torch.zeros(1, c, p, w))
        self.pad_bottom = nn.Parameter(torch.zeros(1, c, p, w))
        self.pad_left = nn.Parameter(torch.zeros(1, c, h - 2 * p, p))
        self.pad_right = nn.Parameter(torch.zeros(1, c, h - 2 * p, p))

    def frame(self) -> torch.Tensor:
        h, w = self.size
        p = self.pad
        c = self.pad_top.shape[1]
        inner = self.pad_top.new_zeros(1, c, h - 2 * p, w - 2 * p)
        middle = torch.cat([self.pad_left, inner, self.pad_right], dim=3)
        return torch.cat([self.pad_top, middle, self.pad_bottom], dim=2)

    def transform_input(self, x):
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError(f"visual_prompt was built for {self.size[0]}x{self.size[1]} images, "
                             f"got {x.shape[-2]}x{x.shape[-1]}")
        return x + self.frame().to(x.dtype)


register_method("visual_prompt", VisualPromptConfig, VisualPrompt)
