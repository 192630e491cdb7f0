"""Official SVP checkpoints: conversion to adapter directories and parity with an
independent re-statement of the official forward (docs/methods.md, notes D1, D2, D5, D6, D7)."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F

import svp
import vimref
from svp.cli import main as svp_main
from svp.models import load_checkpoint_into
from svp.errors import ConfigError
from svp.peft import AdapterError, load_adapter
from svp.peft.convert import official_backbone, official_state_dict

IMG = 64  # 4 x 4 patches of 16 px: 17 tokens, class token at index 8


def official_weights(variant, depth, S, hidden, num_classes, two_layer, seed):
    """Official-layout backbone + SVP tensors drawn by the shared fixture, shrunk to
    ``depth`` layers and a 64-px grid; prompt_scale keeps the official 24 rows (docs/methods.md, note D5)."""
    shapes = vimref.backbone_shapes(variant, num_classes)
    dim = shapes["cls_token"][-1]
    shapes = {k: v for k, v in shapes.items()
              if not (k.startswith("layers.") and int(k.split(".")[1]) >= depth)}
    shapes["pos_embed"] = [1, (IMG // 16) ** 2 + 1, dim]
    if two_layer:
        del shapes["head.weight"], shapes["head.bias"]
        shapes.update({"head.0.weight": [dim // 2, dim], "head.0.bias": [dim // 2],
                       "head.1.weight": [num_classes, dim // 2], "head.1.bias": [num_classes]})
    shapes.update(vimref.svp_shapes(dim, depth, S, hidden))
    sd = {k: torch.from_numpy(v) for k, v in vimref.draw(shapes, seed=seed).items()}
    assert sd["prompt_scale"].shape[0] == 24 and sd["prompt_scale"].abs().sum() > 0
    return sd


def official_reference(model, sd, x, depth, S, simam, two_layer):
    """The official SVP forward restated from docs/methods.md (notes D1, D2), with its in-place semantics:
    before layer l, the first half (before the class token) gets alpha*G^C + beta*G^I of
    itself; then the second half gets beta*G^I of itself plus alpha*G^C of the already
    updated first-half token at the same offset. Layer 0 works on the embedded tokens,
    later layers on the previous mixer output (the hidden stream)."""
    if simam:
        mu = x.mean(dim=(2, 3), keepdim=True)
        var = x.var(dim=(2, 3), keepdim=True, unbiased=True)
        x = x * torch.sigmoid((x - mu) ** 2 / (4 * (var + 1e-3)) + 0.5)
    hidden, c = model.embed(x)
    residual = None
    for l in range(depth):
        g = l // S
        Wc, bc = sd[f"prompt_generator_shared.{g}.0.weight"], sd[f"prompt_generator_shared.{g}.0.bias"]
        W0, b0 = sd[f"prompt_generator.{l}.0.weight"], sd[f"prompt_generator.{l}.0.bias"]
        W1, b1 = sd[f"prompt_generator.{l}.1.weight"], sd[f"prompt_generator.{l}.1.bias"]
        alpha, beta = sd["prompt_shared_scale"][g], sd["prompt_scale"][l]
        cross = lambda t: F.silu(F.linear(t, Wc, bc))
        inner = lambda t: F.silu(F.linear(F.linear(t, W0, b0), W1, b1))
        h = hidden.clone()
        h[:, :c] = h[:, :c] + alpha * cross(h[:, :c]) + beta * inner(h[:, :c])  # in place
        h[:, c + 1:] = h[:, c + 1:] + alpha * cross(h[:, :c]) + beta * inner(h[:, c + 1:])
        hidden, residual = model.layers[l](h, residual)
    feat = model.norm_f(residual + hidden)[:, c]
    if two_layer:
        return F.linear(F.linear(feat, sd["head.0.weight"], sd["head.0.bias"]), sd["head.1.weight"], sd["head.1.bias"])
    return F.linear(feat, sd["head.weight"], sd["head.bias"])


CASES = [  # variant, model name, depth, S, simam, two-layer head, classes
    ("vim_tiny", "vim_tiny_patch16_224", 24, 6, False, False, 10),
    ("vim_tiny", "vim_tiny_patch16_224", 16, 8, True, True, 7),
    ("vim_tiny", "vim_tiny_patch16_224", 12, 6, True, False, 5),
    ("vim_small", "vim_small_patch16_224", 8, 8, False, True, 6),
]


@pytest.mark.parametrize("variant,name,depth,S,simam,two_layer,C", CASES)
def test_converted_official_checkpoint_reproduces_official_logits(tmp_path, variant, name, depth, S, simam,
                                                                  two_layer, C):
    sd = official_weights(variant, depth, S, 64, C, two_layer, seed=1234 + depth + S)
    ckpt = tmp_path / "svp_official.pth"
    torch.save({"model": sd, "epoch": 99}, ckpt)
    backbone = {k: v for k, v in sd.items() if not k.startswith(("prompt_", "head"))}
    backbone_file = tmp_path / "vim_backbone.pth"
    torch.save({"model": backbone}, backbone_file)
    out = tmp_path / "adapter"
    kwargs = json.dumps({"img_size": IMG, "depth": depth})
    argv = ["convert-official-svp", str(ckpt), "--model", name, "--shared-layers", str(S), "--prompt-hidden", "64",
            "--num-classes", str(C), "--out", str(out), "--model-kwargs", kwargs]
    argv += ["--simam"] * simam + ["--two-layer-head"] * two_layer
    if depth == 12:
        argv += ["--backbone-checkpoint", str(backbone_file)]
    assert svp_main(argv) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["config"]["compat"] == "official" and cfg["config"]["simam"] == simam
    assert cfg["config"]["head"] == ("two_layer" if two_layer else "linear")

    model = timm.create_model(name, img_size=IMG, depth=depth, num_classes=C)
    if depth == 24:  # the backbone taken out of the SVP checkpoint itself
        load_checkpoint_into(model, {"model": official_backbone(str(ckpt))})
    else:
        load_checkpoint_into(model, str(backbone_file))
    peft = svp.load_adapter(model, out)
    x = torch.from_numpy(vimref.images(2, IMG, seed=99))
    with torch.no_grad():
        got = peft(x)
        want = official_reference(peft.base_model, sd, x, depth, S, simam, two_layer)
    assert got.shape == (2, C)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    # the prompts matter here: the plain backbone with the same head gives something else
    assert (got - peft.base_model(x)).abs().max() > 1e-3
    if depth == 24:  # round trip back to the official names
        back = official_state_dict(peft)
        assert set(back) == set(sd)
        assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_conversion_errors_are_clear(tmp_path, capsys):
    sd = official_weights("vim_tiny", 4, 2, 64, 3, False, seed=5)
    ckpt = tmp_path / "c.pth"
    torch.save({"model": sd}, ckpt)
    kw = json.dumps({"img_size": IMG, "depth": 4})
    base = ["convert-official-svp", str(ckpt), "--model", "vim_tiny_patch16_224", "--num-classes", "3",
            "--model-kwargs", kw, "--out", str(tmp_path / "o")]
    from svp.peft.convert import convert_official_svp
    common = dict(model_kwargs={"img_size": IMG, "depth": 4})
    with pytest.raises(ValueError, match=r"prompt_generator.0.0.weight has shape \(64, 192\), expected \(32, 192\)"):
        convert_official_svp(str(ckpt), "vim_tiny_patch16_224", 2, 32, 3, tmp_path / "o", **common)
    with pytest.raises(RuntimeError, match="drop --two-layer-head"):
        convert_official_svp(str(ckpt), "vim_tiny_patch16_224", 2, 64, 3, tmp_path / "o", two_layer_head=True,
                             **common)
    # shared_layers 4 on depth 4: one Cross prompter expected, the file has two
    with pytest.raises(ValueError, match=r"2 unexpected: prompt_generator_shared\.1\.0\.weight.*\n.*"
                                         r"prompt_shared_scale has shape \(2, 192\), expected \(1, 192\)"):
        convert_official_svp(str(ckpt), "vim_tiny_patch16_224", 4, 64, 3, tmp_path / "o", **common)
    plain = tmp_path / "plain.pth"
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith("prompt_")}}, plain)
    with pytest.raises(RuntimeError, match="not an SVP checkpoint"):
        convert_official_svp(str(plain), "vim_tiny_patch16_224", 2, 64, 3, tmp_path / "o", **common)
    assert svp_main(base + ["--shared-layers", "3", "--prompt-hidden", "64"]) == 2  # 3 does not divide 4
    # counts named by their flags (--num-classes 0 was 'model argument num_classes=0'), and a
    # non-finite tensor by the file's key (it was named as the svp parameter it became: method.beta)
    for flag, value, args in (("num-classes", "0", ["--shared-layers", "2", "--prompt-hidden", "64"]),
                              ("shared-layers", "-1", ["--prompt-hidden", "64"]),
                              ("prompt-hidden", "0", ["--shared-layers", "2"])):
        argv = [a if a != "3" or flag != "num-classes" else value for a in base] + args
        if flag != "num-classes":
            argv += [f"--{flag}", value]
        assert svp_main(argv) == 2
        err = capsys.readouterr().err
        assert f"{flag.replace('-', '_')}={value} (--{flag}): expected a positive integer" in err, err
    bad = dict(sd, prompt_scale=sd["prompt_scale"].clone())
    bad["prompt_scale"][3, 5] = float("nan")
    torch.save({"model": bad}, tmp_path / "nan.pth")
    with pytest.raises(RuntimeError, match=r"nan.pth: 1 tensor\(s\) hold NaN or infinite values \(prompt_scale\)"):
        convert_official_svp(str(tmp_path / "nan.pth"), "vim_tiny_patch16_224", 2, 64, 3, tmp_path / "o", **common)
    # a backbone file that differs from the backbone inside the SVP checkpoint is refused
    other = {k: v.clone() for k, v in sd.items() if not k.startswith(("prompt_", "head"))}
    other["norm_f.weight"] += 0.5
    torch.save({"model": other}, tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match="norm_f.weight"):
        convert_official_svp(str(ckpt), "vim_tiny_patch16_224", 2, 64, 3, tmp_path / "o",
                             backbone_checkpoint=str(tmp_path / "other.pth"), **common)
    # converted adapter refuses another backbone
    assert svp_main(base + ["--shared-layers", "2", "--prompt-hidden", "64"]) == 0
    model = timm.create_model("vim_tiny_patch16_224", img_size=IMG, depth=4, num_classes=3)
    with pytest.raises(AdapterError, match="weight hash"):
        load_adapter(model, tmp_path / "o")


def test_a_converted_adapter_records_its_backbone_for_eval_and_predict(tmp_path, capsys):
    """convert-official-svp at another img_size used to write no backbone.json, so svp eval /
    predict / serve rebuilt the default 224-px backbone and refused the adapter's weight hash,
    with no flag to pass the model arguments. The folder now names the checkpoint and the
    arguments; a folder converted before (no backbone.json) takes them from adapter_config.json."""
    import os

    from svp.build import load_for_inference

    sd = official_weights("vim_tiny", 4, 2, 64, 3, False, seed=11)
    ckpt = tmp_path / "c.pth"
    torch.save({"model": sd}, ckpt)
    out = tmp_path / "o"
    assert svp_main(["convert-official-svp", str(ckpt), "--model", "vim_tiny_patch16_224", "--num-classes", "3",
                     "--shared-layers", "2", "--prompt-hidden", "64", "--out", str(out),
                     "--model-kwargs", json.dumps({"img_size": IMG, "depth": 4})]) == 0
    spec = json.loads((out / "backbone.json").read_text())
    assert spec["checkpoint"] == os.path.abspath(ckpt) and spec["kwargs"] == {"img_size": IMG, "depth": 4}
    x = torch.from_numpy(vimref.images(2, IMG, seed=3))
    model, spec, _ = load_for_inference(str(out))
    assert spec.img_size == IMG
    with torch.no_grad():
        want = official_reference(model.base_model, sd, x, 4, 2, False, False)
        assert torch.allclose(model(x), want, atol=1e-4, rtol=0)
    os.remove(out / "backbone.json")  # as written before: the model arguments from adapter_config.json
    model, spec, _ = load_for_inference(str(out), checkpoint=str(ckpt))
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-4, rtol=0)


def test_the_backbone_check_names_every_kind_of_difference(tmp_path):
    """--backbone-checkpoint compared only the tensors both files share with the model's shapes:
    a CKPT backbone with a tensor of another shape, or one the model does not have, passed."""
    from svp.peft.convert import convert_official_svp
    from svp.models.loading import CheckpointError

    sd = official_weights("vim_tiny", 4, 2, 64, 3, False, seed=12)
    backbone = {k: v for k, v in sd.items() if not k.startswith(("prompt_", "head"))}
    torch.save({"model": backbone}, tmp_path / "bb.pth")
    bad = dict(sd, foo=torch.zeros(3))
    bad["layers.0.mixer.in_proj.weight"] = torch.zeros(700, 192)
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"in_proj.weight \(shape \(700, 192\), expected \(768, 192\)\), "
                                              r"foo \(not a tensor of vim_tiny_patch16_224\)"):
        convert_official_svp(str(tmp_path / "bad.pth"), "vim_tiny_patch16_224", 2, 64, 3, tmp_path / "o",
                             backbone_checkpoint=str(tmp_path / "bb.pth"), model_kwargs={"img_size": IMG, "depth": 4})
    assert not (tmp_path / "o").exists()
    # the same backbone at another img_size: CKPT's 197 positions were compared with the other
    # file's, resampled to the model's 17, and equal backbones were reported as different
    gen = torch.Generator().manual_seed(3)
    sd224 = dict(sd, pos_embed=torch.randn(1, 197, sd["pos_embed"].shape[-1], generator=gen))
    backbone224 = {k: v for k, v in sd224.items() if not k.startswith(("prompt_", "head"))}
    torch.save({"model": backbone224}, tmp_path / "bb.pth")
    pm = convert_official_svp(sd224, "vim_tiny_patch16_224", 2, 64, 3, tmp_path / "same",
                              backbone_checkpoint=str(tmp_path / "bb.pth"), model_kwargs={"img_size": IMG, "depth": 4})
    assert pm.base_model.pos_embed.shape[1] == 17


def test_a_conversion_writes_its_folder_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    """Review 57: backbone.json was written after the adapter's two files, apart, so a stop
    between left an adapter whose backbone was rebuilt from the default weights; a stop, or a
    failure, after the folder was made left it; a folder holding another adapter, or anything,
    was overwritten silently."""
    import os
    import shutil

    import svp.io

    sd = official_weights("vim_tiny", 4, 2, 64, 3, False, seed=21)
    ckpt = tmp_path / "c.pth"
    torch.save({"model": sd}, ckpt)
    out = tmp_path / "new" / "o"   # (the folders it makes on the way are its own too)
    argv = ["convert-official-svp", str(ckpt), "--model", "vim_tiny_patch16_224", "--num-classes", "3",
            "--shared-layers", "2", "--prompt-hidden", "64", "--out", str(out),
            "--model-kwargs", json.dumps({"img_size": IMG, "depth": 4})]
    real_write_temp = svp.io._write_temp
    for stop_at in ("backbone.json", "adapter.safetensors"):   # interrupted while writing either
        def interrupted(path, write, stop_at=stop_at):
            if path.endswith(stop_at):
                raise KeyboardInterrupt
            return real_write_temp(path, write)
        monkeypatch.setattr(svp.io, "_write_temp", interrupted)
        assert svp_main(argv) == 130
        assert "svp convert-official-svp: interrupted" in capsys.readouterr().err
        assert not (tmp_path / "new").exists(), stop_at
    # SIGTERM stops it as Ctrl-C does while it writes; a process that ignores SIGTERM keeps ignoring
    # it (retest 59: the conversion replaced SIG_IGN)
    import signal
    seen = []

    def record(path, write):
        seen.append(signal.getsignal(signal.SIGTERM))
        return real_write_temp(path, write)
    monkeypatch.setattr(svp.io, "_write_temp", record)
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert svp_main(argv) == 0
        assert set(seen) == {signal.SIG_IGN} and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old)
    shutil.rmtree(tmp_path / "new")
    seen.clear()
    assert svp_main(argv) == 0
    assert seen and all(callable(h) for h in seen) and signal.getsignal(signal.SIGTERM) is old
    assert sorted(os.listdir(out)) == ["adapter.safetensors", "adapter_config.json", "backbone.json"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["extra"]["converted_from"] == os.path.abspath(ckpt)
    # a second conversion there: refused, naming what the folder holds, unless --overwrite
    capsys.readouterr()
    assert svp_main(argv + ["--two-layer-head"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: already holds adapter.safetensors, adapter_config.json, backbone.json; choose a new " \
           f"folder, or pass --overwrite" in err, err
    assert svp_main(argv + ["--overwrite"]) == 0
    # a folder where backbone.json goes: refused before anything moved in (it failed the third rename)
    before = (out / "adapter.safetensors").read_bytes()
    os.remove(out / "backbone.json")
    (out / "backbone.json").mkdir()
    assert svp_main(argv + ["--overwrite"]) == 2
    assert "backbone.json: is a folder; not saved" in capsys.readouterr().err
    assert (out / "adapter.safetensors").read_bytes() == before
    # two conversions into one new --out at once: both said "wrote" while one adapter was lost,
    # and a failing one removed the folder the other had written (review 71). Here the other
    # process fills --out while this one writes its files.
    other = tmp_path / "race" / "o"

    def raced(path, write):
        if not other.exists():
            other.mkdir(parents=True)
            (other / "adapter_config.json").write_text("the other process's")
        return real_write_temp(path, write)
    monkeypatch.setattr(svp.io, "_write_temp", raced)
    capsys.readouterr()
    assert svp_main(argv[:-4] + ["--out", str(other)] + argv[-2:]) == 2
    err = capsys.readouterr().err
    assert f"--out {other}: another process wrote it while this conversion ran" in err, err
    assert os.listdir(other.parent) == ["o"] and os.listdir(other) == ["adapter_config.json"]   # (no temporary)
    assert (other / "adapter_config.json").read_text() == "the other process's"
    monkeypatch.setattr(svp.io, "_write_temp", real_write_temp)
    # an existing empty folder is written in place: its mode kept (and a mount point or the working
    # directory itself stays the folder written: retest 73) ...
    own = tmp_path / "own"
    own.mkdir()
    os.chmod(own, 0o2750)
    ino = os.stat(own).st_ino
    outs = argv[:-4] + ["--out", str(own)] + argv[-2:]
    assert svp_main(outs) == 0
    assert os.stat(own).st_ino == ino and os.stat(own).st_mode & 0o7777 == 0o2750
    assert sorted(os.listdir(own)) == ["adapter.safetensors", "adapter_config.json", "backbone.json"]
    # an older svp's conversion wrote no backbone.json: the folder names the file it was converted from
    # (predict offered a random or downloaded backbone: review 74)
    older = tmp_path / "older"
    older.mkdir()
    for f in ("adapter.safetensors", "adapter_config.json"):
        shutil.copy(own / f, older / f)
    img = tmp_path / "img.png"
    from PIL import Image
    Image.new("RGB", (IMG, IMG)).save(img)
    capsys.readouterr()
    assert svp_main(["predict", str(older), str(img)]) == 2
    err = capsys.readouterr().err
    assert f"{older}: no backbone.json naming the weights the adapter was trained on" in err and \
        f"it was converted from {ckpt}, which holds that backbone; pass the backbone with --checkpoint FILE" in err, err
    assert svp_main(["predict", str(older), str(img), "--checkpoint", str(ckpt)]) == 0
    capsys.readouterr()   # (visualize reads the folder through the same builder: retest 75)
    assert svp_main(["visualize", str(img), "--adapter", str(older), "--out", str(tmp_path / "viz")]) == 2
    assert f"it was converted from {ckpt}, which holds that backbone" in capsys.readouterr().err
    # with --model and --checkpoint the frozen backbone is the adapter's, with the model arguments
    # the folder records (it was timm's default vim_tiny, 224 px and 24 layers: retest 77)
    assert svp_main(["visualize", str(img), "--adapter", str(older), "--model", "vim_tiny_patch16_224",
                     "--checkpoint", str(ckpt), "--out", str(tmp_path / "viz"), "--layers", "0"]) == 0, \
        capsys.readouterr().err
    # svp serve too (its answer named --checkpoint, not the file)
    from svp.serve.backbone import backbone_spec
    shutil.copytree(older, tmp_path / "served" / "older")
    with pytest.raises(ConfigError, match=r"none recorded \(no backbone.json naming a checkpoint\); it was "
                                          r"converted from .*, which holds that backbone; pass --checkpoint FILE"):
        backbone_spec(str(tmp_path / "served"))
    # ... but looked at again before it is written: another conversion that filled it since this
    # one started was overwritten without --overwrite (retest 73)
    import svp.peft.convert as conv
    real_read = conv.read_checkpoint_weights
    late = tmp_path / "late"
    late.mkdir()

    def filled_meanwhile(*a, **k):
        (late / "adapter_config.json").write_text("the other process's")
        return real_read(*a, **k)
    monkeypatch.setattr(conv, "read_checkpoint_weights", filled_meanwhile)
    capsys.readouterr()
    assert svp_main(argv[:-4] + ["--out", str(late)] + argv[-2:]) == 2
    assert f"--out {late}: already holds adapter_config.json" in capsys.readouterr().err
    assert (late / "adapter_config.json").read_text() == "the other process's"
    monkeypatch.setattr(conv, "read_checkpoint_weights", real_read)
    # and one written over by another process while this one wrote is said, not "wrote"
    real_save = conv.save_adapter
    both = tmp_path / "both"
    both.mkdir()

    def overwritten(model, directory, **k):
        real_save(model, directory, **k)
        cfg = json.loads((both / "adapter_config.json").read_text())
        cfg["weights_hash"] = "0" * 64   # (the other conversion's adapter, moved in last)
        (both / "adapter_config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(conv, "save_adapter", overwritten)
    assert svp_main(argv[:-4] + ["--out", str(both)] + argv[-2:]) == 2
    assert f"--out {both}: another process wrote an adapter there while this conversion ran" in \
        capsys.readouterr().err


def test_conversion_inputs_that_passed_silently_are_refused(tmp_path, capsys, caplog):
    """Review 57: a wrong --simam against the checkpoint's own args.input_relu, class names that
    are not one string per class, an integer prompt tensor, two keys for one tensor, num_classes
    in --model-kwargs were all converted; a head of another class count did not point at
    --num-classes."""
    import argparse
    import logging

    from svp.errors import ConfigError
    from svp.models.loading import CheckpointError
    from svp.peft.convert import convert_official_svp

    sd = official_weights("vim_tiny", 4, 2, 64, 3, False, seed=22)
    kw = dict(model_kwargs={"img_size": IMG, "depth": 4})

    def convert(ckpt, out, **more):
        return convert_official_svp(ckpt, "vim_tiny_patch16_224", 2, 64, more.pop("num_classes", 3),
                                    tmp_path / out, **kw, **more)
    for i, value in enumerate((True, "True")):   # (as pickled by argparse: a bool, or the string given)
        ckpt = {"model": sd, "args": argparse.Namespace(input_relu=value, lr=5e-3)}
        with pytest.raises(ConfigError, match=r"its args.input_relu is True \(SimAM was on in training\): pass "
                                              r"--simam"):
            convert(ckpt, "a")
        assert convert(ckpt, f"simam_{i}", simam=True).config.simam
    with pytest.raises(ConfigError, match="drop --simam"):
        convert({"model": sd, "args": argparse.Namespace(input_relu=False)}, "b", simam=True)
    with caplog.at_level(logging.WARNING, logger="svp.peft.convert"):
        convert({"model": sd}, "c")
    assert "records no args.input_relu (the official flag for SimAM), so --simam could not be checked" in caplog.text
    for names, words in ((["a", "b"], r"names.txt: 2 class names, but --num-classes is 3"),
                         (["a", "b", "a"], r"names.txt: the class name 'a' is given twice"),
                         (["a", "", "c"], r"names.txt: class names must be non-empty strings; got ''")):
        with pytest.raises(ConfigError, match=words):
            convert({"model": sd}, "d", class_names=names, class_names_source="names.txt")
    (tmp_path / "names.json").write_text(json.dumps([[1], {"a": 2}, "x"]))
    assert svp_main(["convert-official-svp", "c.pth", "--model", "vim_tiny_patch16_224", "--num-classes", "3",
                     "--shared-layers", "2", "--prompt-hidden", "64", "--out", str(tmp_path / "e"),
                     "--class-names", str(tmp_path / "names.json")]) == 2
    assert "names.json: expected a JSON list of strings or one class name per line" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"prompt_scale \(torch.int64\): expected floating-point weights"):
        convert({"model": dict(sd, prompt_scale=sd["prompt_scale"].long())}, "f")
    with pytest.raises(CheckpointError, match=r"'prompt_scale' and 'module.prompt_scale' are the same tensor"):
        convert({"model": dict(sd, **{"module.prompt_scale": sd["prompt_scale"] + 1})}, "g")
    # (torch.compile of a DDP model: both prefixes, in that order; the copy went into the backbone)
    with pytest.raises(CheckpointError, match=r"'prompt_scale' and '_orig_mod.module.prompt_scale' are the same"):
        convert({"model": dict(sd, **{"_orig_mod.module.prompt_scale": sd["prompt_scale"] + 1})}, "g")
    assert convert({"model": {f"_orig_mod.module.{k}": v for k, v in sd.items()}}, "wrapped").config.shared_layers == 2
    with pytest.raises(ConfigError, match="'num_classes' is set by --num-classes"):
        convert_official_svp({"model": sd}, "vim_tiny_patch16_224", 2, 64, 3, tmp_path / "h",
                             model_kwargs={"img_size": IMG, "depth": 4, "num_classes": 5})
    with pytest.raises(CheckpointError, match="the checkpoint's head has 3 classes: pass --num-classes 3"):
        convert({"model": sd}, "i", num_classes=5)
    # the refused conversions left no folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "names.json", "simam_0", "simam_1", "wrapped"]
