"""svp serve's FastEvalTransform gives the very tensors of the torchvision transform it replaces."""
import numpy as np
import pytest
import torch

pytest.importorskip("starlette")

from svp.data.transforms import build_transform  # noqa: E402
from svp.serve.app import FastEvalTransform  # noqa: E402


@pytest.mark.parametrize("recipe", ["svp", "vtab", "plain"])
@pytest.mark.parametrize("stats", [(None, None), ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))])
def test_fast_eval_transform_is_bit_identical(recipe, stats):
    from PIL import Image

    tf = build_transform(recipe, False, img_size=32, mean=stats[0], std=stats[1])
    fast = FastEvalTransform.wrap(tf)
    assert isinstance(fast, FastEvalTransform)
    rng = np.random.default_rng(0)
    for w, h in ((32, 32), (50, 37), (7, 90)):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]  # the table's ends
        im = Image.fromarray(pixels)
        a, b = tf(im), fast(im)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_other_transforms_are_left_alone():
    tf = build_transform("svp", True, img_size=32)  # training: random steps, not a table's job
    assert FastEvalTransform.wrap(tf) is tf
