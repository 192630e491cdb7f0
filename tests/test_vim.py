"""The Vim backbone: parity with the official implementation, loading, resampling, errors."""
import re
import argparse
import copy
import json
import os
import shutil
import pickle
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import svp  # noqa: F401  (registers the models)
import vimref
from svp.models import CheckpointError, load_checkpoint_into, resample_pos_embed_midcls
from svp.ops import get_backend

FIXTURES = os.path.dirname(vimref.__file__)


def official_state_dict(variant="vim_tiny", num_classes=10, seed=1234):
    sd = vimref.draw(vimref.backbone_shapes(variant, num_classes), seed=seed)
    return {k: torch.from_numpy(v) for k, v in sd.items()}


def tiny_kwargs(**kw):
    """A small Vim with the official layout, for the fast tests."""
    return dict(dict(img_size=32, patch_size=8, stride=8, depth=2, embed_dim=32, num_classes=5), **kw)


def assert_backbone_loaded(model, src, **model_kw):
    """Every backbone tensor of ``model`` (head excluded) equals ``src``'s. RMSNorm weights, D and
    A_log start equal in every model, so this is only a proof of loading because the random ones
    (pos_embed, cls_token, projections) are compared too: checked against a fresh model built with
    ``model_kw``, which must differ from ``src``."""
    def backbone(m):
        return {k: v for k, v in m.state_dict().items() if not k.startswith("head.")}

    got, want = backbone(model), backbone(src)
    assert list(got) == list(want)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"not loaded: {differ[:5]}"
    unrelated = backbone(timm.create_model("vim_tiny_patch16_224", **model_kw))
    assert any(not torch.equal(unrelated[k], want[k]) for k in want), "the comparison cannot tell models apart"


@pytest.fixture(scope="module")
def reference():
    return torch.load(os.path.join(FIXTURES, "vim_tiny_reference.pt"), weights_only=True)["vim_tiny_backbone"]


def test_fixture_parity_vim_tiny(reference):
    model = timm.create_model("vim_tiny_patch16_224", num_classes=10).eval()
    load_checkpoint_into(model, {"model": official_state_dict()})
    x = torch.from_numpy(vimref.images(2, 224, seed=99))
    with torch.no_grad():
        feats, cls_pos = model.forward_features(x, return_cls_pos=True)
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model(x)
    assert cls_pos == 98 and feats.shape == (2, 197, 192)
    torch.testing.assert_close(pooled, reference["features"], rtol=0, atol=1e-4)
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant,name", [("vim_tiny", "vim_tiny_patch16_224"), ("vim_small", "vim_small_patch16_224")])
def test_names_shapes_and_order_match_official_checkpoints(variant, name):
    want = json.load(open(os.path.join(FIXTURES, "vim_checkpoint_keys.json")))[variant]
    model = timm.create_model(name)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(want)
    assert got == want


def test_parameter_counts():
    small = timm.create_model("vim_small_patch16_224")
    n = sum(p.numel() for p in small.parameters())
    assert n == 25_796_584
    assert n - sum(p.numel() for p in small.head.parameters()) == 25_411_584


def test_drop_path_schedule():
    model = timm.create_model("vim_tiny_patch16_224", drop_path_rate=0.1)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.layers]
    assert rates[0] == 0.0 and rates[1] == 0.0
    assert rates[23] == pytest.approx(0.1 * 22 / 23)
    assert model.drop_path.drop_prob == pytest.approx(0.1)


def write_training_checkpoint(path, sd, ema_sd):
    """An official-style training checkpoint: model, EMA, optimizer, epoch and pickled args."""
    torch.save({"model": sd, "model_ema": ema_sd, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 299, "args": argparse.Namespace(model="vim_tiny", lr=5e-4)}, path)


def test_official_training_checkpoint_loads_model_not_ema(tmp_path):
    src = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs())
    sd = src.state_dict()
    ema = {k: v + 1.0 for k, v in sd.items()}
    path = tmp_path / "vim_t_midclstok_76p1acc.pth"
    write_training_checkpoint(path, sd, ema)
    for kw in (dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path))), dict(checkpoint_path=str(path))):
        model = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs(), **kw)
        for k, v in model.state_dict().items():
            assert torch.equal(v, sd[k]), (kw, k)
    # timm's public loader too (it took model_ema, silently)
    for load in (timm.models.load_checkpoint, timm.models._helpers.load_checkpoint):
        model = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs())
        load(model, str(path))
        for k, v in model.state_dict().items():
            assert torch.equal(v, sd[k]), k
    # asked for by name or place, use_ema=True is not followed: said so (it was dropped silently)
    for args, kwargs in (((), {"use_ema": True}), ((True,), {})):
        with pytest.warns(UserWarning, match="use_ema=True is not followed"):
            timm.models.load_checkpoint(timm.create_model("vim_tiny_patch16_224", **tiny_kwargs()), str(path),
                                        *args, **kwargs)


def test_the_mini_backbone_loads_a_file_as_the_full_models_do(tmp_path):
    """vim_mini_patch4_32 went through timm's own loader: a file overlay took model_ema, and a
    mismatched file was timm's RuntimeError instead of svp's CheckpointError naming each tensor."""
    src = timm.create_model("vim_mini_patch4_32", num_classes=7)
    sd = src.state_dict()
    path = tmp_path / "mini.pth"
    write_training_checkpoint(path, sd, {k: v + 1.0 for k, v in sd.items()})
    model = timm.create_model("vim_mini_patch4_32", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=7)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith("layers.3.")}}, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match=r"cut\.pth does not match VisionMamba:\n  \d+ missing: layers\.3\."):
        timm.create_model("vim_mini_patch4_32", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path /
                                                                                                   "cut.pth")))


def _flip_a_byte(path, member_size):
    """Flip one bit in the middle of the (only) zip member of ``member_size`` bytes, as a bad
    disk or a resumed copy would; returns the member's name."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        (info,) = [i for i in z.infolist() if i.file_size == member_size]
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        head = f.read(30)
        at = info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
        f.seek(at + member_size // 2)
        byte = f.read(1)[0]
        f.seek(at + member_size // 2)
        f.write(bytes([byte ^ 1]))
    return info.filename


def test_a_damaged_checkpoint_is_said_and_unread_parts_are_not_checked(tmp_path, monkeypatch):
    """torch.load never checks the CRC-32 sums torch.save's zip stores: a file with a flipped bit
    in a weight loaded silently, mapped or not. The weights read are checked against them; a
    training checkpoint's optimizer state, never read, is not."""
    import shutil
    import zipfile

    import svp.models.loading as loading
    src = timm.create_model("vim_mini_patch4_32", num_classes=7)
    sd = src.state_dict()
    path = tmp_path / "mini.pth"
    torch.save({"model": sd, "optimizer": {"state": {0: {"exp_avg": torch.ones(1234)}}}}, path)
    # (pos_embed's and the moment's byte counts are their files' alone)
    assert sum(v.numel() == sd["pos_embed"].numel() for v in sd.values()) == 1
    for what, size, damaged in (("pos_embed", sd["pos_embed"].numel() * 4, True), ("optimizer", 1234 * 4, False)):
        bad = tmp_path / f"bad_{what}.pth"
        shutil.copy(path, bad)
        member = _flip_a_byte(bad, size)
        model = timm.create_model("vim_mini_patch4_32", num_classes=7)
        if damaged:
            with pytest.raises(loading.UnreadableCheckpoint, match=rf"bad_pos_embed\.pth: the file is damaged: the "
                               rf"bytes of 'pos_embed' do not match the CRC-32 checksum .*member: {member}\).* again"):
                load_checkpoint_into(model, str(bad))
            with pytest.raises(loading.UnreadableCheckpoint, match="the file is damaged"):   # (convert's reader)
                loading.read_state_dict(str(bad))
        else:
            load_checkpoint_into(model, str(bad))
            assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    # its index, data.pkl, damaged: a key name's letter (on torch < 2.5 a flipped storage key pointed
    # a weight at another storage of its size, and it loaded silently: retest 59)
    bad = tmp_path / "bad_index.pth"
    shutil.copy(path, bad)
    with zipfile.ZipFile(bad) as z:
        (info,) = [i for i in z.infolist() if i.filename.endswith("/data.pkl")]
    raw = bad.read_bytes()
    at = raw.index(b"pos_embed", info.header_offset)
    bad.write_bytes(raw[:at] + b"q" + raw[at + 1:])
    with pytest.raises(loading.UnreadableCheckpoint, match=r"bad_index\.pth: the file is damaged: its index of the "
                       r"tensors' bytes does not match the CRC-32 checksum .*member: mini/data\.pkl\).* again"):
        load_checkpoint_into(timm.create_model("vim_mini_patch4_32", num_classes=7), str(bad))
    # files with nothing to check load as torch reads them: a zip saved without checksums
    # (torch.serialization.set_crc32_options(False): every stored CRC 0, which zipfile's reads
    # refuse) and a legacy file whose bytes hold a zip's end-of-directory record (is_zipfile said yes)
    nocrc = tmp_path / "nocrc.pth"
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        infos, at = z.infolist(), z.start_dir
    for info in infos:
        raw[info.header_offset + 14:info.header_offset + 18] = bytes(4)
        assert raw[at:at + 4] == b"PK\x01\x02"
        raw[at + 16:at + 20] = bytes(4)
        at += 46 + sum(int.from_bytes(raw[at + o:at + o + 2], "little") for o in (28, 30, 32))
    nocrc.write_bytes(bytes(raw))
    assert torch.equal(torch.load(nocrc, weights_only=True)["model"]["pos_embed"], sd["pos_embed"])
    model = timm.create_model("vim_mini_patch4_32", num_classes=7)
    load_checkpoint_into(model, str(nocrc))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    legacy = tmp_path / "legacy.pth"   # (small: the record is within the 64 KB is_zipfile searches)
    eocd = torch.frombuffer(bytearray(bytes(100) + b"PK\x05\x06" + bytes(118)), dtype=torch.uint8)
    weights = {"w": torch.randn(4, 4), "buf": eocd.clone()}
    torch.save(weights, legacy, _use_new_zipfile_serialization=False)
    assert zipfile.is_zipfile(legacy)
    got = loading.read_state_dict(str(legacy))
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)
    # a storage matching no stored sum in a file whose every member matches its sum is not called
    # damaged (zipfile's own check has the last word)
    monkeypatch.setattr(loading, "zlib", type("Z", (), {"crc32": staticmethod(lambda data: 1)}))
    model = timm.create_model("vim_mini_patch4_32", num_classes=7)
    load_checkpoint_into(model, str(path))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_a_checkpoint_of_another_size_of_vim_names_both_sizes_and_the_model_to_build(tmp_path):
    """A checkpoint of another Vim (the mini file given to the default Vim-S, an adapter's
    backbone.json whose kwargs changed its depth) listed hundreds of tensors under "does not match
    VisionMamba", blaming the file without saying which model it fits."""
    sd = timm.create_model("vim_mini_patch4_32").state_dict()
    path = tmp_path / "mini.pth"
    torch.save({"model": sd}, path)
    other = timm.create_model("vim_tiny_patch16_224", depth=2, num_classes=10)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_into(other, str(path))
    first = str(e.value).splitlines()[0]
    assert "mini.pth does not match VisionMamba (the file holds a Vim of width 64, depth 8, patch 4" in first
    assert "'vim_tiny_patch16_224' is one of width 192, depth 2, patch 16" in first
    assert "build vim_mini_patch4_32 (--model / model.name)" in first and "unexpected: layers.2." in str(e.value)
    shallow = timm.create_model("vim_mini_patch4_32", depth=3)
    with pytest.raises(CheckpointError, match=r"depth 8, .*'vim_mini_patch4_32' is one of width 64, depth 3, .*"
                                              r"built with arguments .* which is the file's\):\n  \d+ unexpected"):
        load_checkpoint_into(shallow, str(path))
    # a file of the model's own size with a tensor missing: the list alone, as before
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith("layers.3.")}}, path)
    with pytest.raises(CheckpointError, match=r"mini\.pth does not match VisionMamba:\n  \d+ missing: layers\.3\."):
        load_checkpoint_into(timm.create_model("vim_mini_patch4_32"), str(path))


@pytest.mark.parametrize("in_chans", [1, 4])
def test_a_pretrained_backbone_takes_another_input_channel_count(tmp_path, in_chans):
    """timm adapts a pretrained first conv to in_chans (the sum for one channel, repeated and scaled
    for more); the full models' files bypass timm's loader and were refused ("wrong shape:
    patch_embed.proj.weight"), the mini's went through it."""
    src = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs())
    w = src.patch_embed.proj.weight.detach()
    want = w.sum(1, keepdim=True) if in_chans == 1 else w.repeat(1, 2, 1, 1)[:, :in_chans] * (3 / in_chans)
    path = tmp_path / "w.pth"
    torch.save({"model": src.state_dict()}, path)
    for kw in (dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path))), dict(checkpoint_path=str(path))):
        model = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs(), in_chans=in_chans, **kw)
        assert torch.allclose(model.patch_embed.proj.weight, want, atol=1e-6), kw
        assert torch.equal(model.layers[1].mixer.in_proj.weight, src.layers[1].mixer.in_proj.weight)
        assert model(torch.randn(1, in_chans, 32, 32)).shape == (1, 5)
    mini = timm.create_model("vim_mini_patch4_32", pretrained=True, in_chans=in_chans)
    base = timm.create_model("vim_mini_patch4_32", pretrained=True).patch_embed.proj.weight
    base = base.sum(1, keepdim=True) if in_chans == 1 else base.repeat(1, 2, 1, 1)[:, :in_chans] * (3 / in_chans)
    assert torch.allclose(mini.patch_embed.proj.weight, base, atol=1e-6)


def test_load_save_load_round_trip(tmp_path):
    src = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs()).eval()
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    a = timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **tiny_kwargs()).eval()
    st = tmp_path / "w.safetensors"
    save_file(a.state_dict(), str(st))
    b = timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(st), **tiny_kwargs()).eval()
    bare = tmp_path / "bare.pth"
    torch.save(b.state_dict(), bare)
    c = timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(bare), **tiny_kwargs()).eval()
    with torch.no_grad():
        ref = src(x)
        for m in (a, b, c):
            assert torch.equal(m(x), ref)


def test_checkpoint_variants_users_hold_load_as_their_float32_weights(tmp_path):
    """Review 76: a torch.compile'd DDP model's keys (_orig_mod.module.*) were refused (each
    wrapper prefix was stripped once, in a fixed order); a float16 file's position embedding was
    resampled and rounded back to float16 before it went into the float32 model; a stray key
    'layers.5.*' beside a depth-2 Vim made the size hint say "depth 6"."""
    from svp.errors import CheckpointError
    from svp.models.loading import vim_shape
    src = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs()).eval()
    sd = src.state_dict()
    path = tmp_path / "w.pth"
    torch.save({"model": {"_orig_mod.module." + k: v for k, v in sd.items()}}, path)
    m = timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(path), **tiny_kwargs())
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    # a float16 file of an 8x8 grid into a 4x4 model: resampled from the file's values in float32
    big = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs(img_size=64)).state_dict()
    torch.save({"model": {k: v.half() for k, v in big.items()}}, path)
    m = timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(path), **tiny_kwargs())
    want = resample_pos_embed_midcls(big["pos_embed"].half().float(), m.patch_embed.grid_size)
    assert torch.equal(m.pos_embed.detach(), want)
    assert vim_shape(dict(sd, **{"layers.5.mixer.foo": torch.zeros(1)}))["depth"] == vim_shape(sd)["depth"]
    torch.save({"model": dict(sd, **{"layers.5.mixer.foo": torch.zeros(1)})}, path)
    with pytest.raises(CheckpointError, match=r"1 unexpected: layers\.5\.mixer\.foo") as e:
        timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(path), **tiny_kwargs())
    assert "depth 6" not in str(e.value), e.value
    # retest 77: one tensor missing does not shorten the depth the hint gives (no hint: same size) ...
    torch.save({"model": {k: v for k, v in sd.items() if k != "layers.1.mixer.A_log"}}, path)
    with pytest.raises(CheckpointError, match=r"1 missing: layers\.1\.mixer\.A_log") as e:
        timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(path), **tiny_kwargs())
    assert "the file holds" not in str(e.value), e.value
    # ... and two keys that are one tensor once the prefixes are off are refused, naming both
    torch.save({"model": dict(sd, **{"backbone.module.pos_embed": sd["pos_embed"] + 1})}, path)
    with pytest.raises(CheckpointError, match=r"keys 'pos_embed' and 'backbone.module.pos_embed' are the same tensor"
                       ) as e:
        timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(path), **tiny_kwargs())
    assert str(e.value).startswith(f"{path}: keys"), e.value   # (it said "the checkpoint": retest 80)


def test_head_dropped_when_class_count_differs(tmp_path):
    src = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs(num_classes=1000))
    path = tmp_path / "w.pth"
    torch.save({"model": src.state_dict()}, path)
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **tiny_kwargs(num_classes=7))
    assert model.head.weight.shape == (7, 32)
    assert_backbone_loaded(model, src, **tiny_kwargs(num_classes=7))
    assert not torch.equal(model.head.weight[:7], src.head.weight[:7])


def test_a_head_of_the_right_class_count_but_other_shapes_is_an_error(tmp_path):
    """The head was dropped tensor by tensor on their shapes: a head of the model's class count but
    another width vanished silently, and one of mixed shapes came in half (the file's bias beside a
    random weight). Only a different class count drops it (all of it)."""
    from svp.errors import CheckpointError
    src = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs(num_classes=1000)).state_dict()
    for name, shape in (("head.weight", (1000, 5)), ("head.weight", (10, 32))):
        bad = dict(src, **{name: torch.zeros(shape)})
        path = tmp_path / "bad.pth"
        torch.save({"model": bad}, path)
        with pytest.raises(CheckpointError, match=r"head\.weight"):
            timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(path), **tiny_kwargs(num_classes=1000))
    # another class count (the bias says 1000, the model 7): the whole head is dropped, as before
    model = timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(path), **tiny_kwargs(num_classes=7))
    assert model.head.weight.shape == (7, 32) and not model.head_from_checkpoint


def test_pos_embed_resampling_keeps_class_row_224_to_160():
    torch.manual_seed(0)
    pe = torch.randn(1, 197, 8)
    out = resample_pos_embed_midcls(pe, (10, 10))
    assert out.shape == (1, 101, 8)
    assert torch.equal(out[:, 50], pe[:, 98])  # class row moved to the new middle, unchanged
    grid = torch.cat([pe[:, :98], pe[:, 99:]], 1).reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(10, 10), mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(1, 100, 8)
    torch.testing.assert_close(torch.cat([out[:, :50], out[:, 51:]], 1), want)


def test_pos_embed_resampling_stride16_to_stride8_checkpoint(tmp_path):
    src = timm.create_model("vim_tiny_patch16_224", num_classes=10)
    path = tmp_path / "t.pth"
    torch.save({"model": src.state_dict()}, path)
    plus = timm.create_model("vim_tiny_patch16_stride8_224", pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(path)), num_classes=10)
    assert plus.pos_embed.shape == (1, 730, 192)
    assert torch.equal(plus.pos_embed[:, 364], src.pos_embed[:, 98])
    assert torch.equal(plus.patch_embed.proj.weight, src.patch_embed.proj.weight)


def test_any_input_size_the_grid_allows():
    model = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs()).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)  # 6x6 grid, pos_embed resampled on the fly
        feats, pos = model.forward_features(torch.randn(1, 3, 48, 48), return_cls_pos=True)
    assert feats.shape == (1, 37, 32) and pos == 18
    with pytest.raises(ValueError, match="does not fit the patch grid"):
        model(torch.randn(1, 3, 30, 32))


def test_timm_api():
    model = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs())
    assert model.num_features == 32
    feats = model.forward_features(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 17, 32)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 32)
    model.reset_classifier(3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert model.pretrained_cfg["hf_hub_id"] == "hustvl/Vim-tiny-midclstok"
    assert timm.create_model("vim_small_patch16_224", pretrained=False).pretrained_cfg["hf_hub_filename"] == \
        "vim_s_midclstok_80p5acc.pth"


def test_strict_errors_list_every_problem(tmp_path):
    model = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs())
    sd = model.state_dict()
    del sd["layers.0.mixer.D"]
    del sd["norm_f.weight"]
    sd["layers.0.mixer.bogus"] = torch.zeros(1)
    sd["layers.1.mixer.A_log"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_into(model, {"model": sd})
    msg = str(err.value)
    for name in ("layers.0.mixer.D", "norm_f.weight", "layers.0.mixer.bogus", "layers.1.mixer.A_log", "(3, 3)"):
        assert name in msg
    assert "2 missing" in msg and "1 unexpected" in msg and "1 wrong shape" in msg


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_untrusted_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "payload": Evil()}, f)
    model = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs())
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint_into(model, str(path))


def test_missing_file_and_bad_content_errors(tmp_path):
    model = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs())
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_checkpoint_into(model, str(tmp_path / "nothere.pth"))
    path = tmp_path / "list.pth"
    torch.save({"model": [1, 2]}, path)
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_checkpoint_into(model, str(path))


class Foreign:
    pass


def test_unreadable_files_are_named_with_what_was_wrong(tmp_path):
    """A foreign pickled class used to be refused without its name (torch's paragraph naming it
    was dropped with its advice); a text file ended in a bare ': 101', an empty file in
    ': EOFError', a folder in 'file not found'."""
    from svp.models.loading import read_checkpoint
    torch.save({"model": Foreign()}, tmp_path / "foreign.pth")
    (tmp_path / "notes.pth").write_text("epoch 1 notes\n")
    # a file cut to a few bytes, its first 0x80 as a pickle's (one cut in 256 of a safetensors file:
    # "its content is torch.save's format; name it .pth", then torch's own error: retest 82)
    for name in ("cut.safetensors", "cut.pth"):
        (tmp_path / name).write_bytes(bytes([0x80, 1, 0, 0, 0]))
    (tmp_path / "one.pth").write_bytes(b"\x80")
    # torch.save's zip cut in half: "name it .pth" under a .safetensors name, then torch's
    # "failed finding central directory" (retest 84)
    torch.save({"w": torch.arange(4096.0)}, tmp_path / "whole.pth")
    whole = (tmp_path / "whole.pth").read_bytes()
    for name in ("half.pth", "half.safetensors"):
        (tmp_path / name).write_bytes(whole[:len(whole) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "adir.pth").mkdir()
    # a plain pickle (not torch.save's zip): torch's reason came after a blank line, and was dropped
    with open(tmp_path / "plain.pth", "wb") as f:
        pickle.dump({"model": {"w": torch.zeros(2)}}, f, protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # torch's "Detected pickle protocol 4" went raw to stderr
        # (torch < 2.5, svp's own allow-list unpickler: the global the plain pickle names)
        with pytest.raises(CheckpointError, match=r"never run\): (Unsupported operand \d+ \(a plain pickle\?|"
                                                  r"it pickles torch\.storage\._load_from_bytes)"):
            read_checkpoint(str(tmp_path / "plain.pth"))
    assert read_checkpoint(str(tmp_path / "whole.pth"))["w"].shape == (4096,)
    for name, words in (("foreign.pth", r"it pickles test_vim\.Foreign, which is not on the allow-list"),
                        ("notes.pth", r"notes.pth: no checkpoint format svp reads \(it begins b'epoch 1 notes\\n'\)"),
                        ("cut.safetensors", r"cut.safetensors: 5 bytes, too short to be a checkpoint \(cut off\?\): "
                                            "download or copy it again"),
                        ("cut.pth", r"cut.pth: 5 bytes, too short to be a checkpoint"),
                        ("one.pth", r"one.pth: 1 byte, too short to be a checkpoint"),
                        *((name, rf"{name}: torch.save's format, but without the directory a whole file ends with "
                                 rf"\({len(whole) // 2} bytes: cut off\?\): download or copy it again")
                          for name in ("half.pth", "half.safetensors")),
                        ("empty.pth", "the file is empty"), ("adir.pth", "is a folder; expected a checkpoint file")):
        with pytest.raises(CheckpointError, match=words):
            read_checkpoint(str(tmp_path / name))


def test_files_that_are_no_pickle_are_said_as_what_they_are(tmp_path, monkeypatch):
    """An HTML page saved as .pth, a Git LFS pointer (a clone without git-lfs) and a safetensors
    file named .bin were each "cannot be read with torch.load(weights_only=True) ... Unsupported
    operand 60 (a plain pickle?": an allow-list refusal; an unreadable .safetensors was "No such
    file or directory" (QA 15f)."""
    from safetensors.torch import save_file

    from svp.models.loading import UnreadableCheckpoint, read_checkpoint
    (tmp_path / "page.pth").write_text("<!DOCTYPE html><html><body>502 Bad Gateway</body></html>")
    (tmp_path / "vim_t_midclstok_76p1acc.pth").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 28000000\n")
    save_file({"w": torch.arange(3.0)}, str(tmp_path / "weights.bin"))
    for name, words in (("page.pth", "an HTML/XML page, not weights"),
                        ("vim_t_midclstok_76p1acc.pth", r"a Git LFS pointer, not the weights .*git lfs pull")):
        with pytest.raises(UnreadableCheckpoint, match=words) as e:
            read_checkpoint(str(tmp_path / name))
        assert "weights_only" not in str(e.value) and "operand" not in str(e.value)
    assert torch.equal(read_checkpoint(str(tmp_path / "weights.bin"))["w"], torch.arange(3.0))
    # a safetensors file whose header length's low byte is 0x80, a pickle's first byte (one file in
    # 256, svp's own checkpoints among them): refused as torch.save's format (review 74)
    for pad in range(256):
        save_file({"w": torch.arange(3.0)}, str(tmp_path / "odd.safetensors"), metadata={"pad": "x" * pad})
        if (tmp_path / "odd.safetensors").read_bytes()[:1] == b"\x80":
            break
    assert (tmp_path / "odd.safetensors").read_bytes()[:1] == b"\x80"
    shutil.copy(tmp_path / "odd.safetensors", tmp_path / "odd.pth")
    for name in ("odd.safetensors", "odd.pth"):
        assert torch.equal(read_checkpoint(str(tmp_path / name))["w"], torch.arange(3.0)), name
    # cut off inside its header, it is said as such (retest 75: read as torch.save's format, a pickle)
    # (also cut right after its '{', and without "expected a checkpoint written by torch.save" after
    # it: retest 80)
    for name, keep in (("cut.safetensors", 40), ("cut.pth", 40), ("cut9.pth", 9), ("cut10.pth", 10)):
        (tmp_path / name).write_bytes((tmp_path / "odd.safetensors").read_bytes()[:keep])
        with pytest.raises(UnreadableCheckpoint, match=r"a safetensors file cut off inside its header") as e:
            read_checkpoint(str(tmp_path / name))
        assert "torch.save" not in str(e.value) and "operand" not in str(e.value), e.value
    import builtins
    real_open = builtins.open

    def no_permission(path, *a, **k):
        if str(path).endswith("locked.safetensors"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "locked.safetensors"))
    monkeypatch.setattr(builtins, "open", no_permission)
    with pytest.raises(UnreadableCheckpoint, match=r"locked.safetensors: cannot be read \(Permission denied\)"):
        read_checkpoint(str(tmp_path / "locked.safetensors"))


@pytest.mark.parametrize("change, words", [
    ({"layers.0.mixer.D": "text"}, r"\['model'\]: expected a name -> tensor mapping; not tensors: layers.0.mixer.D \(str\)"),
    ({"pos_embed": torch.zeros(1, 20, 32)}, r"pos_embed has shape \(1, 20, 32\), expected \(1, 17, 32\)"),
    ({"pos_embed": torch.zeros(17, 32)}, r"pos_embed has shape \(17, 32\), expected \(1, 17, 32\)"),
])
def test_malformed_tensors_are_a_checkpoint_error(tmp_path, change, words):
    """A non-tensor value (AttributeError) and a position embedding that is no square grid or of
    another rank (ValueError from the resampler) used to end in tracebacks."""
    model = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs(img_size=64, patch_size=16, stride=16))
    sd = dict(model.state_dict(), **change)
    torch.save({"model": sd}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint_into(timm.create_model("vim_tiny_patch16_224", **tiny_kwargs(img_size=64, patch_size=16,
                                                                                      stride=16)),
                             str(tmp_path / "m.pth"))


def test_a_stride8_grid_loaded_into_a_stride16_model_warns(caplog):
    """The official *_ft_* files are stride 8 (27 x 27 at 224 px): loaded into a stride-16 model
    they were resampled silently. A 224-px stride-16 file (14 x 14) into a model of another size,
    or the mini's 8 x 8 grid into a 64-px mini (patch 4), resamples without a word."""
    import logging
    model = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs(img_size=64, patch_size=16, stride=16))
    sd = model.state_dict()
    with caplog.at_level(logging.WARNING, logger="svp.models.loading"):
        load_checkpoint_into(model, dict(sd, pos_embed=torch.randn(1, 27 * 27 + 1, 32)))
    assert "27x27 grid is that of an official stride-8 model at 224 px" in caplog.text and "_stride8_" in caplog.text
    caplog.clear()
    # the other way: the advice named a *_stride16_* model, which does not exist
    fine = timm.create_model("vim_tiny_patch16_stride8_224", **tiny_kwargs(img_size=64, patch_size=16, stride=8))
    with caplog.at_level(logging.WARNING, logger="svp.models.loading"):
        load_checkpoint_into(fine, dict(fine.state_dict(), pos_embed=torch.randn(1, 14 * 14 + 1, 32)))
    assert "14x14 grid is that of an official stride-16 model" in caplog.text
    assert "build the model without _stride8_" in caplog.text and "stride16_" not in caplog.text
    caplog.clear()
    mini = timm.create_model("vim_mini_patch4_32", img_size=64)
    with caplog.at_level(logging.WARNING, logger="svp.models.loading"):
        load_checkpoint_into(model, dict(sd, pos_embed=torch.randn(1, 14 * 14 + 1, 32)))
        load_checkpoint_into(mini, dict(mini.state_dict(), pos_embed=torch.randn(1, 8 * 8 + 1, mini.embed_dim)))
    assert "stride" not in caplog.text


def test_train_mode_drop_path_is_stochastic_and_eval_is_deterministic():
    model = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs(depth=3), drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_pretrained_true_downloads_from_the_hub_entry(tmp_path, monkeypatch):
    """pretrained=True with no overlay resolves hustvl/Vim-tiny-midclstok and its file name,
    then loads through the same safe loader (the download itself is replaced by a local file)."""
    import timm.models._hub as hub

    src = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs())
    path = tmp_path / "vim_t_midclstok_76p1acc.pth"
    write_training_checkpoint(path, src.state_dict(), {k: v * 0 for k, v in src.state_dict().items()})
    asked = {}

    def fake_download(repo_id, filename=None, **kw):
        asked.update(repo=repo_id, filename=filename)
        return str(path)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True, **tiny_kwargs())
    assert asked == {"repo": "hustvl/Vim-tiny-midclstok", "filename": "vim_t_midclstok_76p1acc.pth"}
    assert_backbone_loaded(model, src, **tiny_kwargs())  # the 'model' weights, not the zero EMA


def test_official_svp_checkpoint_loads_as_backbone():
    model = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd.update({"prompt_scale": torch.zeros(24, 32), "prompt_generator.0.0.weight": torch.zeros(64, 32)})
    fresh = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs())
    load_checkpoint_into(fresh, {"model": sd})
    assert_backbone_loaded(fresh, model, **tiny_kwargs())


def _small_vim(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=2, embed_dim=32,
                             num_classes=5).eval()


def test_A_is_kept_while_A_log_is_unchanged_and_follows_every_change():
    """A = -exp(A_log) is formed once while A_log keeps its values and requires no gradient
    (BiMambaMixer._neg_exp), and every way A_log changes (in place, load_state_dict, a new
    parameter) gives the output of a model that forms A afresh. An A_log that requires grad
    keeps nothing, also under no_grad: torch's fused AdamW steps it without bumping its
    version counter, and an evaluation after such steps once got the A kept at the first one."""
    model = _small_vim()
    mixer = model.layers[0].mixer
    x = torch.randn(2, 3, 32, 32)

    def fresh():   # a copy that keeps nothing: A formed again
        other = copy.deepcopy(model)
        for p in other.parameters():
            p.__dict__.pop("_svp_kept", None)
        with torch.no_grad():
            return other(x)

    model.requires_grad_(False)
    with torch.no_grad():
        y1 = model(x)
        kept = mixer.A_log._svp_kept["-exp"][1]
        assert torch.equal(model(x), y1) and mixer.A_log._svp_kept["-exp"][1] is kept
    assert torch.equal(fresh(), y1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        mixer.A_log.add_(0.5)
        mixer.A_b_log.mul_(1.5)
        y2 = model(x)
    assert not torch.equal(y2, y1) and torch.equal(y2, fresh())
    model.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(model(x), y1)
    mixer.A_log = torch.nn.Parameter(mixer.A_log.detach() - 0.25, requires_grad=False)
    with torch.no_grad():
        y4 = model(x)
    assert not torch.equal(y4, y1) and torch.equal(y4, fresh())
    # trained with the engine's AdamW (fused where torch has a CPU kernel), evaluated under
    # no_grad between steps
    from svp.engine.optim import fused_available
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=fused_available("cpu") or None)
    with torch.no_grad():
        model(x)
    for _ in range(2):
        model.train()
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x), fresh())


def test_forget_drops_what_weights_edited_through_data_kept():
    """``p.data.mul_()`` bypasses the version counter ``kept`` keys on: the next forward used the
    values kept before the edit (A from the old A_log, 1.4e-2 off; the halved out_proj, the conv's
    and dt_proj's transposes); ``svp.ops.kept.forget(model)`` is the documented way out."""
    from svp.ops.kept import forget
    model = _small_vim().requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        mixer = model.layers[0].mixer
        for p in (mixer.A_log, mixer.out_proj.weight, mixer.conv1d.weight, mixer.dt_proj.weight):
            p.data.mul_(1.5)
        other = copy.deepcopy(model)
        forget(other)   # (a deep copy may carry entries along)
        fresh = other(x)
        assert not torch.equal(model(x), fresh)   # (what forget is for)
        assert forget(model) > 0
        assert torch.equal(model(x), fresh)
        assert forget(mixer.A_log) == 1 and forget([mixer, model.layers[1]]) >= 1


def test_a_model_with_kept_A_pickles_and_deep_copies(tmp_path):
    """What the mixers keep (A, the scan's tables on it) goes along with torch.save of the
    whole module and copy.deepcopy, and the copies give the same output, also after their own
    A_log changes."""
    model = _small_vim().requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert "-exp" in model.layers[1].mixer.A_log._svp_kept
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for other in (loaded, copy.deepcopy(model)):
        with torch.no_grad():
            assert torch.equal(other(x), y)
            other.layers[1].mixer.A_log.mul_(1.1)
            assert not torch.equal(other(x), y)
    with torch.no_grad():
        assert torch.equal(model(x), y)


def test_A_kept_under_inference_mode_is_a_normal_tensor():
    """Under torch.inference_mode the kept A is still a normal tensor (an inference tensor
    could not be saved by autograd): a frozen model trains after an inference-mode forward,
    with the same A and the same output."""
    model = _small_vim()
    for p in model.parameters():
        p.requires_grad_(False)
    model.head.weight.requires_grad_(True)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        y = model(x)
    kept = model.layers[0].mixer.A_log._svp_kept["-exp"][1]
    assert not kept.is_inference()
    if get_backend() == "cpu":   # the fused scan kept its tables on it (no version counter: it could not)
        assert any(k[0] == "scan_cpu tables" for k in kept._svp_kept)
    out = model(x)
    assert model.layers[0].mixer.A_log._svp_kept["-exp"][1] is kept
    out.square().sum().backward()
    assert torch.equal(out.detach(), y) and model.head.weight.grad is not None


def test_a_gradient_through_the_frozen_backbone_after_an_inference_mode_forward():
    """What the fused conv and scan keep on frozen weights (their transposes) was formed as an
    inference tensor in an inference-mode forward (a validation pass), and the next training step
    whose gradient runs through the backbone (SVP, LoRA, VPT, adapters, BitFit) stopped:
    "Inference tensors cannot be saved for backward"."""
    model = _small_vim()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        y = model(x)
    for p in model.parameters():
        for tag, (_, value) in getattr(p if p._base is None else p._base, "_svp_kept", {}).items():
            if isinstance(value, torch.Tensor):
                assert not value.is_inference(), tag
    x.requires_grad_(True)
    out = model(x)
    out.square().sum().backward()
    assert torch.equal(out.detach(), y) and x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("low_rank_max", [48, 0])
def test_values_kept_while_frozen_are_dropped_once_the_tensors_train(monkeypatch, low_rank_max):
    """A fused optimizer steps without bumping version counters, so what a frozen backbone kept
    (A, the halved out_proj weight) matched again once it was frozen after full fine-tuning
    (PeftModel.unload()): its outputs were the old weights' (0.35 off in a QA run). Above rank 48
    (here forced with 0) dt_proj trains through F.linear, which never passed its kept transpose
    through kept(): dropped after each optimizer step (3.9 off at dt_rank 50)."""
    import copy

    import svp.models.vim as vim
    monkeypatch.setattr(vim, "_LOW_RANK_TRAIN_MAX", low_rank_max)
    model = _small_vim()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    model.requires_grad_(False)
    with torch.no_grad():
        model(x)   # keeps values on the frozen tensors
    assert "-exp" in model.layers[0].mixer.A_log._svp_kept
    model.requires_grad_(True)
    from svp.engine.optim import fused_available   # (torch < 2.4 has no fused AdamW on the CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused_available("cpu") or None)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.requires_grad_(False)
    clean = copy.deepcopy(model)
    for t in list(clean.parameters()) + list(clean.buffers()):
        t.__dict__.pop("_svp_kept", None)
    with torch.no_grad():
        assert torch.equal(model(x), clean(x))


def test_a_frozen_out_proj_keeps_its_halved_weight_and_follows_its_changes():
    """Training a frozen backbone, each mixer multiplies y + y_b by a halved out_proj weight kept
    on the weight (BiMambaMixer._half): the same output and input gradient, bit for bit, as the
    model with the weight halved on every call (full fine-tuning's path), also after the weight
    changes; a weight that trains is halved on every call and gets its gradient."""
    model = _small_vim()   # (eval: no drop path; gradients still flow)
    x = torch.randn(2, 3, 32, 32)

    def run(m):
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        out.square().sum().backward()
        return out.detach(), xi.grad

    ref = copy.deepcopy(model)   # every parameter trains: halved per call
    for p in model.parameters():
        p.requires_grad_(False)
    w = model.layers[0].mixer.out_proj.weight
    for step in range(3):
        got, want = run(model), run(ref)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert torch.equal(w._svp_kept["half"][1], w * 0.5)
        with torch.no_grad():   # an optimizer-like in-place change of the frozen weight
            for m in (model, ref):
                m.layers[0].mixer.out_proj.weight.mul_(1.5)
    run(model)
    kept_before = w._svp_kept["half"][1]
    run(model)
    assert w._svp_kept["half"][1] is kept_before   # unchanged weight: the same tensor
    w.requires_grad_(True)
    ref.zero_grad(set_to_none=True)   # (its gradients summed over the runs above)
    got, want = run(model), run(ref)
    assert torch.equal(got[0], want[0]) and torch.equal(w.grad, ref.layers[0].mixer.out_proj.weight.grad)


@pytest.mark.parametrize("used", ["both", "x", "z"])
def test_in_proj_node_forms_the_inputs_gradient_once_with_the_halves_products(used):
    """_InProj: x and z with the bits of the two halves' products; backward, the input's gradient
    formed by one product and the second added in place, and the weight's gradient written by
    halves (a half whose output is unused gets zeros), against autograd through two products."""
    from svp.models.vim import _InProj
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(2, 9, 12, generator=g), torch.randn(2 * 20, 12, generator=g)
    hr, wr, hg, wg = (t.clone().requires_grad_() for t in (h, w, h, w))
    x, z = _InProj.apply(hg, wg, 20)
    xr, zr = F.linear(hr, wr[:20]), F.linear(hr, wr[20:])
    assert torch.equal(x, xr) and torch.equal(z, zr) and x.is_contiguous() and z.is_contiguous()
    gx, gz = torch.randn(x.shape, generator=g), torch.randn(z.shape, generator=g)
    loss = {"both": lambda a, b: (a * gx).sum() + (b * gz).sum(), "x": lambda a, b: (a * gx).sum(),
            "z": lambda a, b: (b * gz).sum()}[used]
    loss(x, z).backward()
    loss(xr, zr).backward()
    torch.testing.assert_close(hg.grad, hr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wg.grad, wr.grad, rtol=1e-5, atol=1e-5)
    if used != "both":
        assert not wg.grad[20:].any() if used == "x" else not wg.grad[:20].any()


def test_in_proj_node_under_autocast_casts_the_input_once():
    """_InProj.cast_once, the mixer's in_proj under a GPU's autocast (here the CPU's, on the
    GPU's path): the input cast once forward and its gradient once backward, with nothing
    added, where autocast's two half products cast the input twice, and autograd cast both
    gradients back and added them. The same outputs and gradients, to bfloat16 rounding (the
    node's second product adds its gradient to the first's in float32 before rounding)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from svp.models.vim import _InProj
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(2, 9, 12, generator=g), torch.randn(2 * 20, 12, generator=g)
    gx, gz = torch.randn(2, 9, 20, generator=g), torch.randn(2, 9, 20, generator=g)
    ops = {}

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ("_to_copy", "add", "add_") and tuple(out.shape) == tuple(h.shape):
                ops[name] = ops.get(name, 0) + 1
            return out

    res = []
    for node in (True, False):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        hn = hh * 1.0   # not a leaf, as the norm's output in the model (autocast caches a leaf's cast)
        ops.clear()
        with Ops():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                x, z = _InProj.cast_once(hn, ww, 20, torch.bfloat16) if node else \
                    (F.linear(hn, ww[:20]), F.linear(hn, ww[20:]))
            assert x.dtype == z.dtype == torch.bfloat16
            torch.autograd.backward([x, z], [gx.bfloat16(), gz.bfloat16()])
        res.append((ops.copy(), x.detach(), z.detach(), hh.grad, ww.grad))
    assert res[0][0] == {"_to_copy": 2}, res[0][0]   # forward and backward, once each
    assert res[1][0]["_to_copy"] == 4 and res[1][0]["add"] == 1, res[1][0]
    assert torch.equal(res[0][1], res[1][1]) and torch.equal(res[0][2], res[1][2])
    for a, b in zip(res[0][3:], res[1][3:]):
        assert a.dtype == b.dtype == torch.float32 and (a - b).abs().max() <= 1e-2 * b.abs().max()
    # a frozen weight (every method but full fine-tuning) is cast once, then its cast is kept
    from dispatch_helpers import casts_of
    frozen = w.clone()
    with casts_of(w.shape) as casts, torch.autocast("cpu", dtype=torch.bfloat16):
        a = _InProj.cast_once(h, frozen, 20, torch.bfloat16)
        b = _InProj.cast_once(h, frozen, 20, torch.bfloat16)
    assert casts.count == 1 and all(torch.equal(p, q) for p, q in zip(a, b))


def test_in_proj_halves_train_like_the_whole_product():
    """The mixer multiplies by in_proj's two row halves (_InProj); with a hook on
    in_proj it runs the module and chunks its output. Both give the same output and the same
    gradients of in_proj's weight (full fine-tuning), to rounding."""
    model = _small_vim()
    hooked = copy.deepcopy(model)
    for blk in hooked.layers:
        blk.mixer.in_proj.register_forward_hook(lambda mod, inp, out: None)
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for m in (model, hooked):
        out = m(x)
        out.square().sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(model.layers, hooked.layers):
        g, h = a.mixer.in_proj.weight.grad, b.mixer.in_proj.weight.grad
        assert g.abs().max() > 0
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_inference_halves_the_mixer_output_in_the_product_with_the_same_bits(batch):
    """Without gradients the mixer halves its output through out_proj's product (addmm's
    alpha) instead of multiplying the weight: the same bits."""
    model = _small_vim(1)
    x = torch.randn(batch, 3, 32, 32)
    with torch.enable_grad():
        want = model(x).detach()
    with torch.no_grad():
        got = model(x)
    assert torch.equal(got, want)


@pytest.mark.parametrize("training", [True, False])
def test_out_proj_takes_the_scan_output_as_a_devices_autocast_gives_it(training):
    """Under a device's autocast (a GPU's; here the CPU's, on the path a GPU takes: amp is the
    CPU mixer's own bfloat16 path) the scan's bfloat16 y reaches out_proj as it is. It was cast
    to the float32 stream and back to bfloat16 by the product: the same bits after two passes
    over a (b, l, E) tensor forward and two backward (4 ms of a Vim-S step on an H200)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from svp.models.vim import BiMambaMixer
    torch.manual_seed(0)
    m = BiMambaMixer(16, d_state=4, expand=2)
    hidden = torch.randn(2, 5, 16)
    y = torch.randn(2, 5, m.d_inner).to(torch.bfloat16).requires_grad_()
    casts = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == tuple(y.shape):
                casts.append((args[0].dtype, (kwargs or {}).get("dtype")))
            return func(*args, **(kwargs or {}))

    with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=torch.bfloat16), Casts():
        out = m._out_proj(y, hidden, amp=False)
        if training:
            (gy,) = torch.autograd.grad(out.float().square().sum(), [y])
    assert casts == []
    # what autocast's product computes on y cast up and back: the weight halved, cast to bfloat16
    w = (m.out_proj.weight * 0.5).to(torch.bfloat16)
    want = F.linear(y.detach().float().to(torch.bfloat16), w)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    if training:
        assert gy.dtype == torch.bfloat16


def test_bad_sizes_and_unbatched_images_are_named():
    """img_size="64" / num_classes="10" were comparison TypeErrors, num_classes=-1 built a
    headless model claiming -1 classes, and one (3, H, W) image failed in a concatenation."""
    for kw, words in ((dict(img_size="64"), "img_size='64'"), (dict(img_size=(32, 32, 32)), "img_size=(32, 32, 32)"),
                      (dict(num_classes="10"), "num_classes='10'"), (dict(num_classes=-1), "num_classes=-1")):
        with pytest.raises(ValueError, match=re.escape(words)):
            timm.create_model("vim_tiny_patch16_224", **dict(tiny_kwargs(), **kw))
    model = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs()).eval()
    with pytest.raises(ValueError, match="num_classes=-1"):
        model.reset_classifier(-1)
    with pytest.raises(ValueError, match=r"got shape \(3, 32, 32\) \(one image: add a batch dimension"):
        model(torch.randn(3, 32, 32))
    # an HWC batch was "image width 3 does not fit the patch grid"; integer pixels torch's words
    # on the conv's bias
    with pytest.raises(ValueError, match=re.escape("got shape (2, 32, 32, 3), 32 channels (channels last? "
                                                   "x.permute(0, 3, 1, 2))")):
        model(torch.randn(2, 32, 32, 3))
    with pytest.raises(ValueError, match=re.escape("(batch, 3, height, width); got shape (2, 1, 32, 32), 1 ch")):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="expected floating-point images .*; got torch.uint8"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=re.escape("expected torch.float32 images, the model's dtype; got "
                                                   "torch.float16")):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.float16))
    with torch.autocast("cpu", dtype=torch.bfloat16):   # mixed precision takes them
        assert model(torch.zeros(2, 3, 32, 32, dtype=torch.bfloat16)).shape == (2, 5)
    # the methods check before they transform the input: SimAM's mean failed on integers, the pixel
    # prompt said "built for 32x32 images, got 32x3" of an HWC batch and took one unbatched image
    from svp.peft import get_peft_model, make_config
    for cfg, bad, words in ((make_config("svp", shared_layers=1, simam=True), torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
                             "expected floating-point images"),
                            (make_config("visual_prompt", image_size=32, pad=4), torch.zeros(2, 32, 32, 3),
                             "(channels last? x.permute(0, 3, 1, 2))"),
                            (make_config("visual_prompt", image_size=32, pad=4), torch.zeros(3, 32, 32),
                             "add a batch dimension")):
        peft = get_peft_model(timm.create_model("vim_tiny_patch16_224", **tiny_kwargs()), cfg)
        with pytest.raises(ValueError, match=re.escape(words)):
            peft(bad)
    assert timm.create_model("vim_tiny_patch16_224", **dict(tiny_kwargs(), num_classes=0))(
        torch.randn(1, 3, 32, 32)).shape == (1, 32)


@pytest.mark.parametrize("backend", ["reference"])
def test_a_float64_model_computes_in_float64(backend):
    """`.double()` on the float64 backends ('reference', 'torch'): the residual stream, A, D and
    dt_proj's bias were cast with .float(), so the model was float32-accurate and gradcheck of
    the image gradient failed (saliency checks in float64, as the cpu backend's float64 warning
    advises)."""
    from svp.ops import set_backend
    from svp.peft import get_peft_model, make_config
    torch.manual_seed(0)
    vim = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs(img_size=8, patch_size=4, stride=4, embed_dim=16))
    model = get_peft_model(vim, make_config("svp", num_classes=5, shared_layers=1)).double().eval()
    dtypes = set()
    model.base_model.layers[1].norm.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    set_backend(backend)
    try:
        assert torch.autograd.gradcheck(model, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)
    finally:
        set_backend(None)
    assert dtypes == {torch.float64}


def test_a_hook_the_mixer_cannot_call_is_said_once():
    """The mixer reads conv1d's and dt_proj's weights itself: a forward hook on them (feature
    extraction, ablations) was never called and changed nothing, silently."""
    import warnings
    vim = timm.create_model("vim_tiny_patch16_224", **tiny_kwargs()).eval()
    x = torch.randn(1, 3, 32, 32)
    seen = []
    h = vim.layers[0].mixer.x_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vim(x)   # x_proj's hook is called, nothing said
    assert seen
    h.remove()
    vim.layers[1].mixer.dt_proj_b.register_forward_hook(lambda m, i, o: o.zero_())
    with pytest.warns(UserWarning, match=r"conv1d/conv1d_b or dt_proj/dt_proj_b is never called.*delta_hook"):
        vim(x)


@pytest.mark.parametrize("method", [None, "svp", "lora"])
def test_trace_and_export_record_pytorch_operators(method, monkeypatch):
    """torch.jit.trace failed inside numba ("Cannot determine Numba type of torch.Tensor") and
    torch.export on the fake tensors' .numpy(): while they record, the automatic choice leaves
    every fused kernel and svp autograd Function out (a trace holding one, prim::PythonOp, could
    not be saved), what the model derives from its weights is recorded, not kept, and nothing an
    export made (a fake tensor) stays behind for the eager forwards after it."""
    import io
    import svp.ops.kept as kept
    from svp.errors import BackendError
    from svp.peft import get_peft_model, make_config
    monkeypatch.delenv("SVP_SCAN_BACKEND", raising=False)
    monkeypatch.setattr(kept, "_ZEROS", {})   # (as in a fresh process)
    torch.manual_seed(0)
    model = timm.create_model("vim_mini_patch4_32", depth=2, num_classes=5)
    if method:
        model = get_peft_model(model, make_config(method, **({"shared_layers": 1} if method == "svp" else {})))
    model.eval()
    with torch.no_grad():   # (a random init's logits barely move with the weights below)
        (model.base_model if method else model).head.weight.mul_(100.0)
    # 12x12: 10 tokens (a trace and an export unroll the recorded scan's time loop); the weights'
    # check at the end takes 32x32, where the mixer's weights move this random model's logits more
    x = torch.randn(2, 3, 12, 12)
    # (~2 s a block to export; torch < 2.5 cannot say that it exports: the floor's 2.1 records
    # the fused kernels and fails, as README says)
    exporting = method is None and getattr(getattr(torch, "compiler", None), "is_exporting", None) is not None
    with torch.no_grad():
        if exporting:   # first, before any eager forward
            exported = torch.export.export(model, (x,)).module()
            assert all(type(t) is torch.Tensor for t in kept._ZEROS.values())
        ref = model(x)   # (the fused CPU kernels: what the model keeps is made here)
        if exporting:
            assert torch.allclose(exported(x), ref, atol=1e-4)
    # a fresh model, torch's own checks (it traces twice and compares); in grad mode too, where
    # LoRA's training forward took its factored products' autograd Function
    for grad in ((False, True) if method == "lora" else (False,)):
        other = copy.deepcopy(model)
        other.apply(lambda m: [p.__dict__.pop("_svp_kept", None) for p in m.parameters(recurse=False)])
        with torch.set_grad_enabled(grad), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # (TracerWarnings of shape-dependent Python values)
            traced = torch.jit.trace(other, x)
        assert [n.kind() for n in traced.inlined_graph.nodes() if n.kind() == "prim::PythonOp"] == []
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        buf.seek(0)
        traced = torch.jit.load(buf)
        with torch.no_grad():
            assert torch.allclose(traced(x), ref, atol=1e-4)
            assert torch.allclose(traced(torch.cat([x, x]))[2:], ref, atol=1e-4)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        ref = model(x)
        traced = torch.jit.trace(model, x, check_trace=False)
        # the weights are the module's, not constants of the recording: A = -exp(A_log) included
        model.base_model.layers[0].mixer.A_log.sub_(3.0) if method else model.layers[0].mixer.A_log.sub_(3.0)
        now = model(x)
        assert (now - ref).abs().max() > 1e-3, (now - ref).abs().max()
        assert torch.allclose(traced(x), now, atol=1e-4)
    monkeypatch.setenv("SVP_SCAN_BACKEND", "cpu")
    with pytest.raises(BackendError, match=r"scan backend 'cpu' \(forced by SVP_SCAN_BACKEND\) cannot be recorded by "
                                           r"torch\.jit\.trace or torch\.export.*\['torch', 'reference'\]"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(model, x, check_trace=False)


def test_timm_training_helpers_group_blocks_and_checkpoint_gradients():
    """Without group_matcher, timm's layer decay split the parameter list evenly (one block's
    in_proj and out_proj at different scales); set_grad_checkpointing was missing (timm's
    --grad-checkpointing failed); features_only died on a missing attribute."""
    from timm.optim import create_optimizer_v2
    from svp.peft import get_peft_model, make_config
    model = timm.create_model("vim_mini_patch4_32", num_classes=5)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    for i, layer in enumerate(model.layers):
        block = {scale[id(p)] for p in layer.parameters()}
        assert block == {0.5 ** (len(model.layers) + 1 - (i + 1))}, (i, block)   # (stem is group 0)
    assert scale[id(named["pos_embed"])] == scale[id(named["patch_embed.proj.weight"])] == 0.5 ** 9
    # timm's convention (its ViT's final norm): the final norm with the last block, the head at 1
    assert scale[id(named["norm_f.weight"])] == scale[id(named["layers.7.mixer.in_proj.weight"])] == 0.5
    assert scale[id(named["head.weight"])] == 1.0
    # the same gradients, bit for bit, with each block recomputed in the backward (DropPath on)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for method in (None, "svp"):
        grads = []
        for enable in (False, True):
            torch.manual_seed(0)
            m = timm.create_model("vim_mini_patch4_32", pretrained=True, num_classes=5, drop_path_rate=0.1)
            if method:
                m = get_peft_model(m, make_config(method))
            (m.base_model if method else m).set_grad_checkpointing(enable)
            m.train()
            torch.manual_seed(1)
            F.cross_entropy(m(x), y).backward()
            grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
        for n in grads[0]:
            assert torch.equal(grads[0][n], grads[1][n]), (method, n)
    with pytest.raises(ValueError, match="features_only is not supported: a Vim has one token sequence"):
        timm.create_model("vim_tiny_patch16_224", features_only=True)


def test_global_pool_empty_returns_every_token():
    """timm's idiom for unpooled features, num_classes=0 and global_pool='', was refused."""
    from svp.peft import get_peft_model, make_config
    x = torch.randn(2, 3, 32, 32)
    model = timm.create_model("vim_mini_patch4_32", pretrained=True, num_classes=0, global_pool="").eval()
    pooled = timm.create_model("vim_mini_patch4_32", pretrained=True, num_classes=0).eval()
    with torch.no_grad():
        tokens = model(x)
        assert tokens.shape == (2, 65, 64) and torch.equal(tokens, pooled.forward_features(x))
        assert torch.equal(tokens[:, 32], pooled(x))   # the middle class token is what 'token' pools
        pooled.reset_classifier(0, "")
        assert torch.equal(pooled(x), tokens)
        pooled.reset_classifier(3, "token")
        assert pooled(x).shape == (2, 3)
    with pytest.raises(ValueError, match=r"global_pool='avg'"):
        timm.create_model("vim_mini_patch4_32", global_pool="avg")
    with pytest.raises(ValueError, match=r"returns every token \(global_pool=''\); the methods classify"):
        get_peft_model(model, make_config("linear"))


def test_a_zip_that_is_not_torchs_and_a_torch_file_named_safetensors(tmp_path):
    """A zipped .pth and an .npz renamed .pth were "not a readable torch checkpoint (RuntimeError:
    [enforce fail at inline_container.cc:180])"; a torch.save file named .safetensors was "not a
    readable safetensors file (header too large)" (review)."""
    import zipfile

    import numpy as np

    from svp.models.loading import UnreadableCheckpoint, read_checkpoint
    torch.save({"w": torch.arange(4.0)}, tmp_path / "real.pth")
    with zipfile.ZipFile(tmp_path / "zipped.pth", "w") as z:
        z.write(tmp_path / "real.pth", "vim_t.pth")
    np.savez(tmp_path / "arrays.npz", w=np.zeros(3))
    os.replace(tmp_path / "arrays.npz", tmp_path / "arrays.pth")
    for name, said in (("zipped.pth", "a zip archive, not a torch.save file (it holds vim_t.pth): unpack it"),
                       ("arrays.pth", "a numpy .npz archive (it holds w.npy), not a torch.save file: Google's ViT "
                                      "format")):
        with pytest.raises(UnreadableCheckpoint, match=re.escape(said)):
            read_checkpoint(str(tmp_path / name))
    os.replace(tmp_path / "real.pth", tmp_path / "real.safetensors")
    with pytest.raises(UnreadableCheckpoint, match="not a safetensors file: its content is torch.save's format; "
                                                   "name it .pth"):
        read_checkpoint(str(tmp_path / "real.safetensors"))


def test_timm_conventions_a_whole_pretrained_cfg_factory_arguments_and_numpy_sizes(tmp_path, monkeypatch):
    """Review of models/vim.py: a whole pretrained_cfg dict with a file went through timm's loader
    (the EMA weights); timm's device=/dtype= factory arguments were a TypeError; numpy integers were
    refused as sizes; a one-element img_size was an IndexError; the mini Vim wanted its bundled
    file even when given one of the caller's."""
    import numpy as np

    import svp.models.vim_mini as vm
    from svp.models.vim import VisionMamba
    src = timm.create_model("vim_mini_patch4_32", pretrained=True)
    sd = src.state_dict()
    path = tmp_path / "train.pth"
    write_training_checkpoint(path, sd, {k: v + 0.5 for k, v in sd.items()})
    cfg = dict(timm.models.get_pretrained_cfg("vim_mini_patch4_32").to_dict(), file=str(path))
    cfg.pop("custom_load", None)
    m = timm.create_model("vim_mini_patch4_32", pretrained=True, pretrained_cfg=cfg)
    assert torch.equal(m.cls_token, src.cls_token)   # 'model', not 'model_ema'
    meta = timm.create_model("vim_mini_patch4_32", device="meta")
    assert meta.cls_token.device.type == "meta"
    half = timm.create_model("vim_mini_patch4_32", pretrained=True, dtype=torch.bfloat16)
    assert half.cls_token.dtype == torch.bfloat16 and torch.equal(half.cls_token, src.cls_token.bfloat16())
    v = VisionMamba(img_size=(np.int64(32),), patch_size=np.int64(4), stride=4, embed_dim=np.int32(16), depth=2,
                    num_classes=3)
    assert v.patch_embed.grid_size == (8, 8) and v(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    monkeypatch.setattr(vm, "mini_asset_path", lambda *a: str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="bundled mini Vim weights not found"):
        timm.create_model("vim_mini_patch4_32", pretrained=True)
    mine = timm.create_model("vim_mini_patch4_32", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(mine.cls_token, src.cls_token)
