"""svp visualize: figures are written, non-empty, of the expected pixel size; CLI errors."""
import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import svp  # noqa: F401
from svp.cli import main as svp_main
from svp.viz import analyze
from svp.viz.cli import default_layers, mask_to_grid, visualize

TINY = dict(img_size=32, patch_size=4, stride=4, depth=4, embed_dim=32, num_classes=5)
TINY_JSON = json.dumps(TINY)


def tiny_vim(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vim_tiny_patch16_224", **TINY).eval()


@pytest.fixture
def image(tmp_path):
    a = np.zeros((48, 64, 3), np.uint8)
    a[8:30, 20:50] = (250, 200, 40)
    a[30:, :] = (30, 60, 90)
    path = tmp_path / "scene.png"
    Image.fromarray(a).save(path)
    return str(path)


def check_png(path, width, height):
    assert os.path.getsize(path) > 2000, path
    with Image.open(path) as im:
        assert im.size == (width, height), (path, im.size)
        a = np.asarray(im.convert("RGB")).astype(np.float32)
    assert a.std() > 5, f"{path} is blank"


@pytest.mark.slow
def test_visualize_two_models_with_box(tmp_path, image):
    frozen = tiny_vim(0)
    other = tiny_vim(0)
    with torch.no_grad():  # a different model of the same backbone shape
        for layer in other.layers:
            layer.mixer.dt_proj.bias.add_(1.0)
    img = Image.open(image).convert("RGB")
    mask = np.zeros((48, 64), np.float32)
    mask[8:30, 20:50] = 1
    out = tmp_path / "out"
    written = visualize(img, {"frozen": frozen, "tuned": other}, str(out), "scene", layers=[0, 3],
                        quantities=["update", "forget", "propagation"], mask=mask, dpi=50)
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(["scene_frozen_maps.png", "scene_tuned_maps.png", "scene_compare_update.png",
                            "scene_compare_forget.png", "scene_compare_propagation.png", "scene_curves.png",
                            "scene_diff_update.png", "scene_diff_forget.png", "scene_diff_propagation.png",
                            "scene_curves.json"])
    # sizes follow from the figure sizes in svp.viz.plots (panel 2 in, dpi 50; no tight bbox)
    # maps: (2 * 3 columns * 1.2) x (2 * 3 rows + 0.6) inches
    check_png(out / "scene_frozen_maps.png", 360, 330)
    # compare: (2 * 3 columns) x (2 * 2 models + 0.9) inches
    for q in ("update", "forget", "propagation"):
        check_png(out / f"scene_compare_{q}.png", 300, 245)
        # difference: (2 * 3 columns) x (2 * 1 other model + 0.9) inches
        check_png(out / f"scene_diff_{q}.png", 300, 145)
    # curves: (3 * 1.3 * 3 quantities) x (3 + 0.4) inches
    check_png(out / "scene_curves.png", 585, 170)
    data = json.loads((out / "scene_curves.json").read_text())
    curves = data["curves"]
    assert set(curves) == {"frozen", "tuned"} and len(curves["frozen"]["forget"]["object"]) == 4
    # the curve numbers are the patch means of the maps under the patch mask
    _, grid_mask = mask_to_grid(mask, (32, 32), frozen)
    assert data["object_patches"] == int(grid_mask.sum()) > 0
    from svp.viz.cli import prepare_image
    x, _ = prepare_image(img, (32, 32), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    g = analyze(frozen, x)
    m = torch.from_numpy(grid_mask).bool()
    for layer in range(4):
        v = g.grid["forget"][0, layer, 2]
        assert curves["frozen"]["forget"]["object"][layer] == pytest.approx(float(v[m].mean()), rel=1e-5)
        assert curves["frozen"]["forget"]["background"][layer] == pytest.approx(float(v[~m].mean()), rel=1e-5)
    # the tuned model's larger step sizes show up in the curves
    assert np.mean(curves["tuned"]["update"]["object"]) > np.mean(curves["frozen"]["update"]["object"])


def test_cli_end_to_end_and_errors(tmp_path, image, capsys):
    out = tmp_path / "cli"
    rc = svp_main(["visualize", image, "--model", "vim_tiny_patch16_224", "--model-args", TINY_JSON, "--random-init",
                   "--box", "20,8,50,30", "--out", str(out), "--layers", "0,-1", "--dpi", "40"])
    assert rc == 0
    printed = capsys.readouterr().out.split()
    assert sorted(os.path.basename(p) for p in printed) == ["scene_curves.json", "scene_curves.png",
                                                           "scene_frozen_maps.png"]
    check_png(out / "scene_frozen_maps.png", 288, 264)
    (tmp_path / "afile").write_text("x")
    for bad, msg in ((["--box", "20,8,80,30"], "--box"),
                     (["--layers", "7"], "layer 7 is out of range for depth 4 (from -4 to 3)"),
                     (["--quantities", "gates"], "unknown"), (["--mask", str(tmp_path / "nope.png")], "no such file"),
                     (["--dpi", "0"], "--dpi 0"), (["--alpha", "2"], "--alpha 2.0"),
                     (["--alpha", "nan"], "--alpha nan"),
                     (["--out", str(tmp_path / "afile" / "sub")], "cannot create the output folder")):
        rc = svp_main(["visualize", image, "--model", "vim_tiny_patch16_224", "--model-args", TINY_JSON, "--random-init",
                       "--out", str(out)] + bad)
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err, err
    assert svp_main(["visualize", str(tmp_path / "missing.png"), "--model-args", TINY_JSON, "--random-init"]) == 2
    assert "no such file" in capsys.readouterr().err
    # arguments that cannot go together are refused before the output folder is made (it was left
    # behind, empty) or any model built
    for bad, msg in ((["--adapter", "frozen=" + str(tmp_path)], "two models are labelled 'frozen'"),
                     (["--no-frozen"], "--no-frozen without --adapter"),
                     (["--mask", image, "--box", "1,1,4,4"], "give --mask or --box, not both"),
                     (["--quantities", "bogus"], "unknown 'bogus'"), (["--box", "1,2,3"], "--box"),
                     (["--mask", str(tmp_path / "nope.png")], "no such file")):
        rc = svp_main(["visualize", image, "--model", "vim_tiny_patch16_224", "--model-args", TINY_JSON,
                       "--random-init", "--out", str(tmp_path / "never")] + bad)
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and not (tmp_path / "never").exists(), err
    # a full disk (or a read-only folder) as the figures are written: one line, not a traceback
    import errno

    import svp.io as sio

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    real_fsync, sio.os.fsync = sio.os.fsync, full
    try:
        rc = svp_main(["visualize", image, "--model", "vim_tiny_patch16_224", "--model-args", TINY_JSON,
                       "--random-init", "--out", str(tmp_path / "full"), "--layers", "1", "--dpi", "40"])
    finally:
        sio.os.fsync = real_fsync
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write the figures (No space left on device)" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path / "full") == []   # no temporary left
    # a dataset sample instead of a file
    common = ["visualize", "--model", "vim_tiny_patch16_224", "--model-args", TINY_JSON, "--random-init", "--out", str(out),
              "--layers", "1", "--quantities", "forget", "--dpi", "40"]
    assert svp_main(common + ["--dataset", "digits", "--index", "3"]) == 0
    assert [os.path.basename(p) for p in capsys.readouterr().out.split()] == ["digits_test_3_frozen_maps.png"]
    check_png(out / "digits_test_3_frozen_maps.png", 192, 104)
    assert svp_main(common + ["--dataset", "no_such_set"]) == 2
    assert "unknown dataset" in capsys.readouterr().err


def test_help_states_each_default_once(capsys):
    """--help printed "(default: None)" after options without one, and a second default after
    --prefix's own."""
    with pytest.raises(SystemExit):
        svp_main(["visualize", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out and out.count("(default:") >= 5
    assert "(default: image name or dataset_split_index) (default" not in out
    assert "--dpi DPI PNG resolution, 10 to 1200 (default: 100)" in out


def test_default_layers():
    assert default_layers(24) == [0, 8, 15, 23]
    assert default_layers(3) == [0, 1, 2]


def test_cli_with_adapter_dirs(tmp_path, image, capsys):
    """--adapter through PeftModel.save/load_adapter: a zero-scale SVP adapter gives the
    frozen backbone's curves exactly; an adapter on other base weights is refused."""
    from safetensors.torch import save_file
    from svp.peft import get_peft_model, make_config
    base = tiny_vim(3)
    ckpt = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(ckpt))
    peft = get_peft_model(base, make_config("svp", shared_layers=2, hidden=8, num_classes=5))
    peft.save(str(tmp_path / "svp_adapter"), base_model_name="vim_tiny_patch16_224")
    out = tmp_path / "ad"
    common = ["visualize", image, "--model", "vim_tiny_patch16_224", "--model-args", TINY_JSON, "--out", str(out),
              "--layers", "0,3", "--quantities", "update", "--box", "20,8,50,30", "--dpi", "40"]
    assert svp_main(common + ["--checkpoint", str(ckpt), "--adapter", f"SVP={tmp_path / 'svp_adapter'}"]) == 0
    names = sorted(os.path.basename(p) for p in capsys.readouterr().out.split())
    assert "scene_SVP_maps.png" in names and "scene_diff_update.png" in names
    curves = json.loads((out / "scene_curves.json").read_text())["curves"]
    assert curves["SVP"] == curves["frozen"]
    assert svp_main(common + ["--random-init", "--adapter", str(tmp_path / "svp_adapter")]) == 2  # random base weights
    err = capsys.readouterr().err
    assert "--adapter" in err and "hash" in err


def test_an_adapter_is_shown_on_the_backbone_it_recorded(tmp_path, image, capsys):
    """svp visualize put an adapter on the bundled mini Vim (or on --model drawn anew) whatever its
    backbone.json said, as svp eval/predict/serve do not: an adapter trained with --random-init
    could not be shown at all, and the refusal named no model (QA 16e)."""
    kw = [f"model.kwargs.{k}={v}" for k, v in TINY.items() if k != "num_classes"]
    assert svp_main(["train", "--dataset", "digits", "--method", "svp", "--model", "vim_tiny_patch16_224",
                     "--random-init", *kw, "--batch-size", "8", "train.max_steps=2", "data.max_train_samples=16",
                     "data.max_eval_samples=8", "run.progress=none", "--output", str(tmp_path / "runs"),
                     "--name", "r"]) == 0
    capsys.readouterr()
    adapter = str(tmp_path / "runs" / "r" / "best")
    out = tmp_path / "v"
    common = ["visualize", image, "--out", str(out), "--layers", "0", "--quantities", "update", "--dpi", "40"]
    assert svp_main(common + ["--adapter", f"A={adapter}"]) == 0, capsys.readouterr().err
    names = sorted(os.path.basename(p) for p in capsys.readouterr().out.split())
    assert "scene_A_maps.png" in names and "scene_frozen_maps.png" in names
    # the frozen backbone is the adapter's: the same weights as the adapted model's base
    from svp.build import adapter_spec, build_model
    from svp.viz.cli import load_backbone
    frozen = load_backbone(None, backbone_of=adapter)
    base = build_model(adapter_spec(adapter)).eval()
    assert all(torch.equal(a, b) for a, b in zip(frozen.state_dict().values(), base.state_dict().values()))
    # --model overrides the recorded model for the adapters and for the frozen backbone alike, the
    # folder's model arguments kept (as svp eval/predict do); here they do not fit the bundled weights
    assert svp_main(common + ["--model", "vim_mini_patch4_32", "--adapter", adapter]) == 2
    err = capsys.readouterr().err
    # (--model said as the command line's, not as the adapter's record: retest 82; the model's name
    # not where the last flag's value would be: retest 84)
    assert (f"the frozen backbone (model 'vim_mini_patch4_32', as --adapter {adapter} recorded it, with --model "
            f"vim_mini_patch4_32): ") in err, err
    short = tmp_path / "c8.pth"
    short.write_bytes(b"\x80" * 8)
    assert svp_main(common + ["--checkpoint", str(short), "--adapter", adapter]) == 2
    err = capsys.readouterr().err
    assert (f"the frozen backbone (model 'vim_tiny_patch16_224', as --adapter {adapter} recorded it, with --checkpoint "
            f"{short}): {short}: 8 bytes, too short to be a checkpoint") in err, err
    assert svp_main(common + ["--model-args", '{"img_size": 30}', "--adapter", adapter]) == 2
    err = capsys.readouterr().err
    assert err.count("--model-args") == 1 and (
        f"as --adapter {adapter} recorded it, with --model-args '{{\"img_size\": 30}}'): " in err), err
    assert svp_main(common + ["--no-frozen", "--model", "vim_mini_patch4_32", "--adapter", adapter]) == 2
    err = capsys.readouterr().err
    assert f"--adapter {adapter} (on backbone 'vim_mini_patch4_32')" in err, err
    # a folder that is no adapter: the frozen backbone it was to give is named as such, not "--model None"
    (tmp_path / "empty").mkdir()
    assert svp_main(common + ["--adapter", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert f"the frozen backbone (as --adapter {tmp_path / 'empty'} recorded it): " in err and "None" not in err, err


def test_patch_coverage_counts_the_original_pixels_and_a_refused_mask_draws_nothing(tmp_path):
    """A patch is object when at least half of its pixels are: the mask was resized to the model
    input with a nearest-neighbour filter first, so at 224 px a box covering 43% of a patch
    (12 of 28 pixel columns) counted; and a refused mask left the figures it had already drawn."""
    vim = tiny_vim(0)  # 32 px, patches of 4: each patch spans 28 x 28 pixels of a 224-px image
    for cols, want in ((14, 1.0), (13, 0.0), (12, 0.0)):
        mask = np.zeros((224, 224), np.float32)
        mask[:, 28 - cols:28] = 1
        _, grid = mask_to_grid(mask, (32, 32), vim)
        assert grid[0, 0] == want, (cols, grid[0, 0])
    mask = np.zeros((40, 40), np.float32)  # 40 -> 32 px: a patch spans 5 pixels, the box 2 of them
    mask[:, 3:5] = 1
    assert mask_to_grid(mask, (32, 32), vim)[1][0, 0] == 0
    # A box of fractional pixels covers its edge pixels in part: x 2.45-4.9 spans 2.45 of the
    # first patch's 5 pixels (49%, background); rounded to pixels 2-5 it spanned 60% (object).
    from svp.viz.cli import parse_box
    box = parse_box("2.45,0,4.9,40", 40, 40)
    assert box.sum() == pytest.approx(2.45 * 40, rel=1e-6) and box[0, 2] == pytest.approx(0.55)
    assert mask_to_grid(box, (32, 32), vim)[1][0, 0] == 0
    assert mask_to_grid(parse_box("2.4,0,4.9,40", 40, 40), (32, 32), vim)[1][0, 0] == 1  # 50%
    from svp.viz.figures import VizError
    img = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    with pytest.raises(VizError, match="covers 0 of 64 patches"):
        visualize(img, {"a": vim, "b": tiny_vim(1)}, str(tmp_path / "out"), "x", mask=np.zeros((32, 32)))
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_labels_with_dollars_are_drawn_as_written(tmp_path):
    """A label '$\\bad{$' (an --adapter label, any text) stopped svp visualize with matplotlib's
    mathtext traceback; 'cost $5' was drawn in italics without its dollar."""
    img = Image.new("RGB", (32, 32), (120, 30, 200))
    mask = np.zeros((32, 32), np.float32)
    mask[:, 16:] = 1
    written = visualize(img, {"$\\bad{$": tiny_vim(), "cost $5": tiny_vim(1)}, str(tmp_path), "p", [0],
                        ["update"], "both", mask, dpi=30)
    assert any(p.endswith(".png") for p in written) and any(p.endswith(".json") for p in written), written


def test_analyze_restores_every_submodule_mode_and_names_bad_arguments():
    vim = tiny_vim(0).train()
    vim.layers[0].eval()  # a caller's mixed modes (a PeftModel trains with its backbone in eval mode)
    modes = {n: m.training for n, m in vim.named_modules()}
    maps = analyze(vim, torch.randn(1, 3, 32, 32))
    assert {n: m.training for n, m in vim.named_modules()} == modes
    for call, words in ((lambda: maps.region_means(torch.ones(8, 8), "nope"), "unknown quantity 'nope'"),
                        (lambda: maps.region_means(torch.ones(8, 8), "update", "sideways"), "unknown direction"),
                        (lambda: maps.map("update", 0, image=3), r"image 3 out of range: 1 image\(s\)")):
        with pytest.raises(ValueError, match=words):
            call()


def test_files_stay_in_out_the_curves_are_strict_json_and_labels_do_not_collide(tmp_path, image):
    """A forward-only box whose patches the class token cannot be reached from wrote bare NaN into
    P_curves.json; a dataset's "/" in the prefix made a subfolder and "../" left --out; labels
    a/b and a_b wrote one file; a killed run's temporary files stayed in --out."""
    from svp.io import TEMP_PREFIX
    from svp.viz.cli import VizError
    out = tmp_path / "o"
    out.mkdir()
    dead = out / f"{TEMP_PREFIX}999999999-0a0b0c0d-x_maps.png"   # a writer that no longer lives
    dead.write_bytes(b"partial")
    live = out / f"{TEMP_PREFIX}{os.getpid()}-0a0b0c0d-y_maps.png"
    live.write_bytes(b"in progress")
    mask = np.zeros((32, 32), np.float32)
    mask[16:, :] = 1   # the bottom half: after the middle class token in a forward scan
    img = Image.new("RGB", (32, 32), (120, 30, 200))
    m = tiny_vim()
    written = visualize(img, {"a/b": m}, str(out), "../../vtab/dtd_test_0", [0], ["propagation"], "forward", mask,
                        dpi=30)
    assert all(os.path.dirname(p) == str(out) for p in written), written
    assert os.path.basename(written[0]) == ".._.._vtab_dtd_test_0_a_b_maps.png"
    text = open([p for p in written if p.endswith(".json")][0]).read()
    curves = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))["curves"]
    assert curves["a/b"]["propagation"]["object"] == [None] * 4   # (every layer)
    assert isinstance(curves["a/b"]["propagation"]["background"][0], float)
    with pytest.raises(VizError, match=r"labels 'a/b' and 'a_b' both give files named 'a_b'"):
        visualize(img, {"a/b": m, "a_b": tiny_vim(1)}, str(out), "p", [0], ["update"], dpi=30)
    from svp.io import remove_dead_writers_temps
    assert remove_dead_writers_temps(str(out)) == [str(dead)] and live.exists()


def test_the_python_api_refuses_bad_arguments_by_name_before_any_model_runs(tmp_path):
    """svp.viz.cli.visualize ran every model first and then stopped in an IndexError (layers=[8]),
    a KeyError (quantities=['updte']) or tuple.index (direction='fwd'), each leaving a figure
    open; --dpi 1 to 5 stopped in matplotlib's font engine, --dpi 6000 drew for minutes in ~21
    GB; analyze and prepare_image took a PIL image / a tensor with AttributeErrors (QA 15a)."""
    import matplotlib.pyplot as plt

    from svp.errors import VizError
    from svp.viz import plots
    from svp.viz.cli import prepare_image
    m = tiny_vim()
    runs = []
    m.register_forward_pre_hook(lambda mod, inp: runs.append(1))
    img = Image.new("RGB", (32, 32), (120, 30, 200))
    open_before = plt.get_fignums()
    for kwargs, said in (({"layers": [8]}, "layers=[8]: layer 8 is out of range for depth 4 (from -4 to 3)"),
                         ({"layers": 1}, "layers=1: expected a list of one or more layer indices"),
                         ({"layers": (v for v in ())}, "layers=[]: expected a list of one or more"),
                         ({"quantities": ["updte"]}, "quantities: unknown 'updte'"),
                         ({"quantities": "update"}, "quantities='update': expected a list"),
                         ({"direction": "fwd"}, "direction='fwd': expected one of forward, backward, both"),
                         ({"dpi": 5}, "dpi 5: expected a resolution from 10 to 1200 dots per inch"),
                         ({"dpi": 6000}, "dpi 6000: expected"), ({"alpha": float("nan")}, "alpha nan")):
        with pytest.raises(VizError) as e:
            visualize(img, {"m": m}, str(tmp_path / "o"), "p", **kwargs)
        assert str(e.value).startswith(said), (kwargs, str(e.value))
    assert runs == [] and plt.get_fignums() == open_before
    # what the figures took before these checks: numpy layers and scalars, generators, float dpi
    a = visualize(img, {"m": m}, str(tmp_path / "a"), "p", np.array([0, 3]), ["update"], dpi=np.int64(30),
                  alpha=np.float32(0.5))
    b = visualize(img, {"m": m}, str(tmp_path / "b"), "p", (v for v in (0, -1)), (q for q in ["update"]),
                  dpi=30.0, alpha=0.5)
    assert Image.open(a[0]).size == Image.open(b[0]).size and Image.open(a[0]).size[0] > 100
    runs.clear()
    # a figure function that fails half-way closes its figure
    real = plots._layer_title
    try:
        plots._layer_title = lambda *a: 1 / 0
        with pytest.raises(ZeroDivisionError):
            visualize(img, {"m": m}, str(tmp_path / "o"), "p", [0], ["update"], dpi=30)
    finally:
        plots._layer_title = real
    assert plt.get_fignums() == open_before
    # analyze and prepare_image name what they were given
    for bad, said in ((img, "images: expected a normalised (n, 3, H, W) float tensor"),
                      (torch.zeros(0, 3, 32, 32), "images: an empty batch, shape (0, 3, 32, 32)")):
        with pytest.raises(VizError, match=r"^" + said.replace("(", r"\(").replace(")", r"\)")):
            analyze(m, bad)
    with pytest.raises(VizError, match="image: expected a PIL image or an image file's path; got Tensor"):
        prepare_image(torch.zeros(3, 32, 32), (32, 32), (0.5,) * 3, (0.5,) * 3)
    # a 16-bit image is scaled by its range, as svp visualize reads the file (Pillow's convert
    # clipped it at 255: mostly white)
    a16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(a16).save(path)
    with Image.open(path) as im16:
        assert im16.mode.startswith("I")
        x_pil, _ = prepare_image(im16, (32, 32), (0.5,) * 3, (0.5,) * 3)
    x_path, disp = prepare_image(str(path), (32, 32), (0.5,) * 3, (0.5,) * 3)
    torch.testing.assert_close(x_pil, x_path, rtol=0, atol=0)
    assert (disp >= 254.5 / 255).mean() < 0.05, (disp >= 254.5 / 255).mean()


def test_cli_names_a_folder_and_a_dpi_out_of_range(tmp_path, image, capsys):
    base = ["visualize", "--model", "vim_tiny_patch16_224", "--model-args", TINY_JSON, "--random-init",
            "--out", str(tmp_path / "o")]
    assert svp_main(base + [str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"image {tmp_path}: is a folder; svp visualize takes one image file per call" in err, err
    for dpi in ("5", "1201"):
        assert svp_main(base + [image, "--dpi", dpi]) == 2
        err = capsys.readouterr().err
        assert err == f"svp visualize: error: --dpi {dpi}: expected a resolution from 10 to 1200 dots per inch\n", err


def _saved_adapter(tmp_path, name, seed):
    """An SVP adapter saved on tiny_vim(seed), with a backbone.json naming that backbone's weights
    (as svp train writes it), so that svp visualize rebuilds each adapter's own backbone."""
    from safetensors.torch import save_file
    from svp.peft import get_peft_model, make_config
    base = tiny_vim(seed)
    ckpt = tmp_path / f"base{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(ckpt))
    peft = get_peft_model(base, make_config("svp", shared_layers=2, hidden=8, num_classes=5))
    folder = tmp_path / name
    peft.save(str(folder), base_model_name="vim_tiny_patch16_224")
    (folder / "backbone.json").write_text(json.dumps({
        "model": "vim_tiny_patch16_224", "checkpoint": str(ckpt), "num_classes": 5,
        "kwargs": {k: v for k, v in TINY.items() if k != "num_classes"}}))
    return str(folder)


def test_adapters_on_different_base_weights_are_refused_before_any_model_runs(tmp_path, image, capsys):
    """Each adapter went on its own recorded backbone, but "frozen" was the first one's: the
    difference figure and curves of an adapter trained on another backbone showed the swap of
    backbones as the adapter's effect (review61). Adapters on one base are drawn as before."""
    a, b, c = (_saved_adapter(tmp_path, n, seed) for n, seed in (("a", 3), ("b", 4), ("c", 3)))
    common = ["visualize", image, "--layers", "0", "--quantities", "update", "--box", "20,8,50,30", "--dpi", "30"]
    rc = svp_main(common + ["--out", str(tmp_path / "never"), "--adapter", f"A={a}", "--adapter", f"B={b}"])
    err = capsys.readouterr().err
    assert rc == 2 and "'A' (" + a + ")" in err and "'B' (" + b + ")" in err, err
    assert "different base weights" in err and "separate runs" in err and "Traceback" not in err, err
    assert not (tmp_path / "never").exists()   # refused before the output folder, before any model
    out = tmp_path / "same"
    assert svp_main(common + ["--out", str(out), "--adapter", f"A={a}", "--adapter", f"C={c}"]) == 0, \
        capsys.readouterr().err
    curves = json.loads((out / "scene_curves.json").read_text())["curves"]
    assert curves["A"] == curves["frozen"] == curves["C"]   # zero-scale adapters on the frozen weights


def test_an_input_size_the_patch_grid_refuses_names_model_args(image, tmp_path, capsys):
    """--model-args '{"img_size": 30}' said only "image height 30 does not fit the patch grid"
    (its ConfigError was passed on without the words naming the option and the model)."""
    rc = svp_main(["visualize", image, "--model-args", '{"img_size": 30}', "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert "--model 'vim_mini_patch4_32' with --model-args '{\"img_size\": 30}': image height 30" in err, err


def test_overlapping_patches_are_drawn_centred_on_their_pixels(tmp_path, monkeypatch):
    """With stride < patch the cells were spread evenly over the whole image, each off the
    pixels its patch covers (review61): patch k's centre is at p/2 + k*s."""
    import svp.viz.plots as plots
    vim = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=4, depth=2, embed_dim=32,
                            num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    maps = analyze(vim, x)
    assert maps.grid_size == (7, 7) and maps.patch_size == (8, 8) and maps.stride == (4, 4)
    left, right, bottom, top = plots.cell_extent(maps, 32, 32)
    assert (left, right, bottom, top) == (2.0, 30.0, 30.0, 2.0)
    centres = left + (np.arange(7) + 0.5) * (right - left) / 7
    assert np.allclose(centres, 8 / 2 + np.arange(7) * 4)
    # a display copy at twice the input size: the same places, scaled
    assert plots.cell_extent(maps, 64, 64) == (4.0, 60.0, 60.0, 4.0)
    # patches that do not overlap fill the image, as before
    assert plots.cell_extent(analyze(tiny_vim(), torch.randn(1, 3, 32, 32)), 32, 32) == (0.0, 32.0, 32.0, 0.0)
    # and the figures draw the cells there
    extents = []

    def keep(fig, path, dpi=100):
        extents.extend(tuple(im.get_extent()) for ax in fig.axes for im in ax.get_images()
                       if im.get_array().shape == (7, 7))
        plots._plt().close(fig)
        return path
    monkeypatch.setattr(plots, "save_figure", keep)
    disp = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    plots.plot_model_heatmaps(maps, disp, str(tmp_path / "m.png"), [0, 1], ["update"])
    plots.plot_comparison({"a": maps, "b": maps}, disp, str(tmp_path / "c.png"), [0], "update")
    plots.plot_difference({"a": maps, "b": maps}, disp, str(tmp_path / "d.png"), [0], "update")
    assert len(extents) == 5 and set(extents) == {(2.0, 30.0, 30.0, 2.0)}, extents


def test_mask_threshold_repeated_layers_and_empty_quantities_are_said(tmp_path, image, capsys):
    """A 0/1 mask PNG was "the object mask covers 0 of 64 patches", with no word of the >127
    threshold; --layers 0,0,1 drew layer 0 twice; --quantities "" drew the defaults (review61)."""
    mask01 = np.zeros((48, 64), np.uint8)
    mask01[8:30, 20:50] = 1
    Image.fromarray(mask01).save(tmp_path / "mask01.png")
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(tmp_path / "full.png")
    for bad, msgs in (
            (["--mask", str(tmp_path / "mask01.png")], ["no pixel is object (a pixel is object where its grey level "
                                                        "is above 127 of 255", "saved as 0/1?", "mask01.png"]),
            (["--mask", str(tmp_path / "full.png")], ["every pixel is object (a pixel is object where"]),
            (["--layers", "0,0,1"], ["--layers '0,0,1': layer 0 of 4 is given twice;"]),
            (["--layers", "1,-3"], ["--layers '1,-3': layer 1 of 4 is given twice (as 1 and -3)"]),
            # (either order; a list starting with '-' takes '=': retest 64)
            (["--layers=-1,3"], ["--layers '-1,3': layer 3 of 4 is given twice (as -1 and 3)"]),
            (["--layers", ""], ["--layers '': expected one or more layer indices"]),
            (["--quantities", ""], ["--quantities '': expected one or more of update"]),
            (["--quantities", " "], ["--quantities ' ': expected one or more of update"])):
        rc = svp_main(["visualize", image, "--model", "vim_tiny_patch16_224", "--model-args", TINY_JSON,
                       "--random-init", "--out", str(tmp_path / "o")] + bad)
        err = capsys.readouterr().err
        assert rc == 2 and all(m in err for m in msgs) and "Traceback" not in err, (bad, err)
    # the Python API: a repeated layer by name; a mask too small for any patch says the threshold
    from svp.viz.figures import VizError
    img = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    with pytest.raises(VizError, match=r"layer 0 is given twice"):
        visualize(img, {"a": tiny_vim()}, str(tmp_path / "p"), "x", layers=[0, -4])
    speck = np.zeros((32, 32), np.float32)
    speck[0, 0] = 1
    with pytest.raises(VizError, match=r"the object covers 0 of 64 patches \(a patch is object when at least half "
                                        r"of its pixels are\)"):
        visualize(img, {"a": tiny_vim()}, str(tmp_path / "p"), "x", mask=speck)
