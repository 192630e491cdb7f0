"""Pre-training of the bundled mini Vim on procedural (formula-driven) data."""
from .fractals import FractalDataset, generate_split, make_categories, render_instances

__all__ = ["FractalDataset", "generate_split", "make_categories", "render_instances"]
