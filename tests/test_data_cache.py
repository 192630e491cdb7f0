"""Decoded images kept in memory (svp/data/cache.py, data.cache_images): which transforms
allow it, that a kept image gives the same tensor bits, which splits a run keeps, and that a
run keeping them trains to the same bits as one that reads every image each epoch."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms as T

from svp.cli import main as svp_main
from svp.data.base import FileListDataset
from svp.data.cache import PixelCache, split_fixed
from svp.data.transforms import build_transform
from svp.engine import config as C
from svp.engine import setup as S
from svp.engine.distributed import SeededDataset
from test_cli_train import tiny_config


def _names(compose):
    return [type(t).__name__ for t in compose.transforms]


def test_split_fixed_finds_the_fixed_steps_of_each_recipe():
    fixed, rest = split_fixed(build_transform("vtab", True, img_size=24))
    assert _names(fixed) == ["Resize"] and _names(rest) == ["ToTensor", "Normalize"]
    fixed, rest = split_fixed(build_transform("svp", False, img_size=24))
    assert _names(fixed) == ["Resize", "CenterCrop"] and _names(rest) == ["ToTensor", "Normalize"]
    assert split_fixed(build_transform("plain", True, img_size=24)) is not None
    # a random step before ToTensor: the pixels differ per epoch
    assert split_fixed(build_transform("svp", True, img_size=24)) is None
    assert split_fixed(build_transform("plain", True, img_size=24, hflip=0.5)) is None
    assert split_fixed(T.Compose([T.RandomResizedCrop(8), T.ToTensor()])) is None
    # nothing before ToTensor, no ToTensor, not a Compose
    assert split_fixed(T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.5,))])) is None
    assert split_fixed(T.Compose([T.Resize(8)])) is None
    assert split_fixed(T.Resize(8)) is None


def _images(tmp_path, n=6):
    """JPEG files of several sizes and one greyscale (load_image makes it RGB)."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        h, w = (30 + 7 * i, 41 - 3 * i)
        arr = (rng.random((h, w) if i == 2 else (h, w, 3)) * 255).astype(np.uint8)
        p = tmp_path / f"{i}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        samples.append((str(p), i % 3))
    return FileListDataset(samples, ["a", "b", "c"], name="files", split="train")


@pytest.mark.parametrize("recipe,training", [("vtab", True), ("svp", False)])
def test_kept_images_give_the_same_tensors_and_are_read_once(tmp_path, recipe, training):
    ds = _images(tmp_path)
    tf = build_transform(recipe, training, img_size=24)
    fixed, rest = split_fixed(tf)
    kept = S.Limited(ds, None)
    kept.cache = PixelCache(fixed, len(kept))
    plain = SeededDataset(S.Limited(ds, None), tf)
    cached = SeededDataset(kept, rest)
    for _ in range(2):   # the first pass reads the files, the second uses the kept pixels
        for i in range(len(ds)):
            (a, ya), (b, yb) = plain[(i, 1000 + i)], cached[(i, 1000 + i)]
            assert ya == yb and a.dtype == b.dtype == torch.float32 and torch.equal(a, b), i
    assert kept.cache.reads == len(ds)
    assert kept.cache.nbytes == len(ds) * 24 * 24 * 3


def _splits(ds, recipe="vtab"):
    return {name: (S.Limited(ds, None), build_transform(recipe, name == "train", img_size=24))
            for name in ("train", "val", "test")}


def _kept(out):
    return sorted(k for k, v in out.items() if v is not None and v[0].cache is not None)


def test_keep_pixels_keeps_the_splits_read_more_than_once_within_the_limit(tmp_path, monkeypatch):
    ds = _images(tmp_path)
    cfg = lambda *o: C.resolve(overrides=("data.dataset=digits",) + o)  # noqa: E731
    assert _kept(S.keep_pixels(cfg(), _splits(ds))) == ["train", "val"]   # auto: test is read once or twice
    assert _kept(S.keep_pixels(cfg("eval.test_every_epoch=true"), _splits(ds))) == ["test", "train", "val"]
    assert _kept(S.keep_pixels(cfg("data.cache_images=true"), _splits(ds))) == ["test", "train", "val"]
    assert _kept(S.keep_pixels(cfg("data.cache_images=false"), _splits(ds))) == []
    # svp's training augmentation is random: its split is read each time, its evaluations are kept
    assert _kept(S.keep_pixels(cfg(), _splits(ds, "svp"))) == ["val"]
    # a kept split hands on the steps from ToTensor on, and nothing is read until asked for
    out = S.keep_pixels(cfg("data.num_workers=1"), _splits(ds))
    assert _names(out["train"][1]) == ["ToTensor", "Normalize"] and out["train"][0].cache.reads == 0
    assert _names(out["test"][1]) == ["Resize", "ToTensor", "Normalize"] and out["test"][0].cache is None
    # with workers the kept splits are read once before they start (without, on first use)
    S.fill_kept(cfg("data.num_workers=0"), out.values())
    assert out["train"][0].cache.reads == 0
    S.fill_kept(cfg("data.num_workers=1"), out.values())
    assert out["train"][0].cache.reads == out["val"][0].cache.reads == len(ds)
    # the limit holds for the splits together: the first fits, the second no longer does
    one = len(ds) * 24 * 24 * 3
    monkeypatch.setattr(S, "cache_limit_bytes", lambda: one + one // 2)
    assert _kept(S.keep_pixels(cfg(), _splits(ds))) == ["train"]
    assert _kept(S.keep_pixels(cfg("data.cache_images=true"), _splits(ds))) == ["test", "train", "val"]


def test_fixed_bytes_reads_the_size_from_the_last_fixed_step():
    from svp.data.cache import fixed_bytes
    assert fixed_bytes(split_fixed(build_transform("vtab", True, img_size=24))[0]) == 24 * 24 * 3
    assert fixed_bytes(split_fixed(build_transform("svp", False, img_size=24))[0]) == 24 * 24 * 3
    assert fixed_bytes(T.Compose([T.Resize(16)])) is None            # keeps the aspect ratio
    assert fixed_bytes(T.Compose([T.Resize([16, 8])])) == 16 * 8 * 3
    assert fixed_bytes(T.Compose([T.CenterCrop([10])])) == 10 * 10 * 3


def test_cache_images_is_validated():
    with pytest.raises(C.ConfigError, match="data.cache_images=1 is not one of auto, true, false"):
        C.resolve(overrides=("data.cache_images=1",))


def test_a_run_keeping_decoded_images_trains_to_the_same_bits(tmp_path):
    cfg = tiny_config(tmp_path, data={"recipe": "vtab"}, eval={"test_every_epoch": True},
                      train={"epochs": 2})
    runs = {}
    for mode in ("true", "false"):
        assert svp_main(["train", "-c", cfg, "--name", mode, f"data.cache_images={mode}"]) == 0
        runs[mode] = tmp_path / "runs" / mode
    assert "train split kept in memory" in (runs["true"] / "train.log").read_text()
    assert "kept in memory" not in (runs["false"] / "train.log").read_text()
    a, b = (load_file(os.path.join(r, "final_state.safetensors")) for r in runs.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_transforms_that_draw_nothing_run_without_seeding_and_give_the_same_tensors(tmp_path, monkeypatch):
    from svp.data.cache import is_fixed
    assert is_fixed(build_transform("vtab", True, img_size=24)) and is_fixed(build_transform("svp", False))
    assert is_fixed(split_fixed(build_transform("vtab", True, img_size=24))[1])
    assert not is_fixed(build_transform("svp", True, img_size=24))
    assert not is_fixed(build_transform("plain", True, img_size=24, hflip=0.5))
    assert not is_fixed(lambda x: x) and not is_fixed(T.Compose([]))
    ds = _images(tmp_path, n=3)
    tf = build_transform("vtab", True, img_size=24)
    fast = SeededDataset(S.Limited(ds, None), tf)
    seeded = SeededDataset(S.Limited(ds, None), tf)
    seeded.seeded = True   # what every transform got before
    seeds = []
    monkeypatch.setattr(torch, "manual_seed", lambda s: seeds.append(s))
    for i in range(len(ds)):
        assert torch.equal(fast[(i, 7 + i)][0], seeded[(i, 7 + i)][0])
    assert fast.seeded is False and seeds == [7, 8, 9]   # only the seeded wrapper drew its seeds


def test_the_auto_limit_is_shared_by_the_processes_of_a_node(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    one = S.cache_limit_bytes()
    assert 0 < one <= 2 << 30
    monkeypatch.setattr(os, "sysconf", lambda k: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (16 << 30) // 4096}[k])
    assert S.cache_limit_bytes() == 2 << 30          # 16 GiB / 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")   # (alone: one process, not a launch)
    assert S.cache_limit_bytes() == 2 << 30
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    assert S.cache_limit_bytes() == (16 << 30) // 32  # shared by four ranks
    monkeypatch.delenv("LOCAL_WORLD_SIZE")   # a launcher that does not say (Kubeflow without torchrun)
    assert S.cache_limit_bytes() == 2 << 30       # one process a pod, as before launch() read it
