"""svp.serve.MultiAdapterModel: a batch mixing adapters of every method equals each adapter
run alone through svp.load_adapter; adapter folders that must be refused are."""
import os

import pytest
import torch
import torch.nn.functional as F

import svp
import serve_helpers as H
from svp.errors import AdapterError
from svp.peft.io import base_weights_hash
from svp.serve import MultiAdapterModel, check_adapter_dir


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return H.make_adapters(str(tmp_path_factory.mktemp("adapters")))


def test_mixed_batch_equals_each_adapter_alone(adapters):
    torch.manual_seed(0)
    model = MultiAdapterModel(H.mini_backbone())
    for name in H.SPECS:
        model.add_adapter(name, os.path.join(adapters, name))
    assert base_weights_hash(model.backbone) == model.base_hash  # loading wrote nothing into the backbone
    names = list(H.SPECS) * 2
    order = torch.randperm(len(names)).tolist()
    names = [names[i] for i in order]
    x = torch.randn(len(names), 3, 32, 32)
    passes, in_proj_hooked = [], []
    hook = model.backbone.norm_f.register_forward_hook(lambda m, a, o: passes.append(o.shape))
    mixer = model.backbone.layers[0].mixer
    seen = mixer.register_forward_pre_hook(
        lambda m, a: in_proj_hooked.append((bool(m.in_proj._forward_hooks), m.in_proj_hook is not None)))
    out = model(x, names)
    hook.remove()
    seen.remove()
    # LoRA's rows on in_proj go through the mixer's in_proj_hook, not a module hook, which would
    # take the two half products from every row of the pass; nothing is left set after it
    assert (False, True) in in_proj_hooked and all(not h for h, _ in in_proj_hooked)
    assert mixer.in_proj_hook is None and not mixer.in_proj._forward_hooks
    # one shared pass for the base token layout, one for the VPT layout (both VPT adapters:
    # 4 middle tokens); the full fine-tune runs on its own model
    assert len(passes) == 2 and sorted(p[1] for p in passes) == [65, 69]
    frozen = model.backbone.forward_features(x)
    for name in H.SPECS:
        rows = [i for i, n in enumerate(names) if n == name]
        alone = svp.load_adapter(H.mini_backbone(), os.path.join(adapters, name))
        ref = alone(x[rows])
        got = torch.stack([out[i] for i in rows])
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() < 1e-5, name
        if name not in ("linear2",):  # the adapter really changes the features (not just the head)
            head_on_frozen = alone.base_model.forward_head(frozen[rows])
            assert (ref - head_on_frozen).abs().max().item() > 1e-3, name
    assert base_weights_hash(model.backbone) == model.base_hash


def test_amp_runs_the_mixed_batch_under_bfloat16_autocast_close_to_each_adapter_alone(adapters):
    """``MultiAdapterModel(amp=True)`` (svp serve --amp): every pass under bfloat16 autocast, the
    logits float32, each adapter's rows close to that adapter run alone under the same autocast
    and to the float32 model (bfloat16 rounding: not equal)."""
    torch.manual_seed(0)
    model = MultiAdapterModel(H.mini_backbone(), amp=True)
    plain = MultiAdapterModel(H.mini_backbone())
    for name in H.SPECS:
        model.add_adapter(name, os.path.join(adapters, name))
        plain.add_adapter(name, os.path.join(adapters, name))
    names = list(H.SPECS) * 2
    x = torch.randn(len(names), 3, 32, 32)
    linears = []
    hook = model.backbone.layers[0].mixer.out_proj.register_forward_hook(lambda m, a, o: linears.append(o.dtype))
    out = model(x, names)
    hook.remove()
    assert linears and set(linears) == {torch.bfloat16}   # out_proj ran under autocast
    ref = plain(x, names)
    for name in H.SPECS:
        rows = [i for i, n in enumerate(names) if n == name]
        got = torch.stack([out[i] for i in rows])
        assert got.dtype == torch.float32
        # (built outside autocast: inside, autocast would keep its bfloat16 copies of the
        # parameters load_adapter then overwrites)
        alone_model = svp.load_adapter(H.mini_backbone(), os.path.join(adapters, name))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            alone = alone_model(x[rows]).float()
        f32 = torch.stack([ref[i] for i in rows])
        scale = f32.abs().max().item()
        assert (got - alone).abs().max().item() < 3e-2 * scale, name
        assert 0 < (got - f32).abs().max().item() < 5e-2 * scale, name
        # forward_alone (the reference the server compares with) runs under the same autocast
        assert torch.equal(model.forward_alone(x[rows], name).float(), alone), name


def test_lora_delta_is_the_low_rank_part_of_the_parametrized_weight():
    from svp.peft.lora import LoRAParametrization
    torch.manual_seed(0)
    p = LoRAParametrization(12, 7, 3, 2.0)
    torch.nn.init.normal_(p.lora_B)
    w, x = torch.randn(12, 7), torch.randn(5, 4, 7)
    torch.testing.assert_close(F.linear(x, p(w)), F.linear(x, w) + p.delta(x), rtol=1e-5, atol=1e-5)


def test_unknown_adapter_and_wrong_hash_are_refused(adapters, tmp_path):
    model = MultiAdapterModel(H.mini_backbone())
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        model(torch.randn(1, 3, 32, 32), ["nope"])
    import svp.peft as peft
    other = H.mini_backbone(random_init=True)  # random weights: another hash
    peft.get_peft_model(other, peft.make_config("linear", num_classes=3)).save(tmp_path / "x")
    with pytest.raises(AdapterError, match="weight hash"):
        model.add_adapter("x", str(tmp_path / "x"))
    assert not model.adapters


def test_adapter_folders_that_leave_the_root_or_hold_pickles_are_refused(adapters, tmp_path):
    import shutil
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    shutil.copytree(os.path.join(adapters, "svp"), outside)
    shutil.copytree(os.path.join(adapters, "svp"), root / "good")
    assert check_adapter_dir(str(root), "good") == os.path.realpath(root / "good")
    with pytest.raises(AdapterError, match="plain folder name"):
        check_adapter_dir(str(root), "../outside")
    os.symlink(outside, root / "link_out")
    with pytest.raises(AdapterError, match="outside the adapters folder"):
        check_adapter_dir(str(root), "link_out")
    shutil.copytree(os.path.join(adapters, "svp"), root / "file_link")
    os.remove(root / "file_link" / "adapter.safetensors")
    os.symlink(outside / "adapter.safetensors", root / "file_link" / "adapter.safetensors")
    with pytest.raises(AdapterError, match="outside the adapter folder"):
        check_adapter_dir(str(root), "file_link")
    shutil.copytree(os.path.join(adapters, "svp"), root / "pickled")
    torch.save({"a": torch.zeros(1)}, root / "pickled" / "extra.pt")
    with pytest.raises(AdapterError, match="pickle"):
        check_adapter_dir(str(root), "pickled")


def test_a_folder_on_another_drive_is_outside_not_a_crash_and_files_are_no_subfolders(adapters, tmp_path,
                                                                                       monkeypatch):
    """On Windows os.path.commonpath raises ValueError for paths on two drives: an adapter linked to
    another drive stopped svp serve with a traceback (simulated here); the start-up error counted
    the files beside adapter folders as subfolders (review of svp serve)."""
    import shutil

    from svp.errors import ConfigError
    from svp.serve.backbone import backbone_spec
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(os.path.join(adapters, "svp"), root / "good")

    def other_drive(paths):
        raise ValueError("Paths don't have the same drive")
    monkeypatch.setattr(os.path, "commonpath", other_drive)
    with pytest.raises(AdapterError, match="outside the adapters folder"):
        check_adapter_dir(str(root), "good")
    monkeypatch.undo()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("x")
    (notes / "notes.md").write_text("x")
    with pytest.raises(ConfigError, match="no subfolders, so no backbone"):
        backbone_spec(str(notes))


def test_backbone_spec_comes_from_the_adapters_unless_given(adapters, tmp_path):
    import json
    import shutil

    from svp.build import ModelSpec
    from svp.errors import ConfigError
    from svp.serve import backbone_spec
    root = tmp_path / "root"
    shutil.copytree(os.path.join(adapters, "lora"), root / "a")
    assert backbone_spec(str(root)).model == H.MINI and backbone_spec(str(root)).weights == "bundled"
    # svp train writes backbone.json beside the adapter: its settings win over base_model_name
    (root / "a" / "backbone.json").write_text(json.dumps(ModelSpec(H.MINI, img_size=32, extra={"recipe": "plain"}).to_dict()))
    spec = backbone_spec(str(root))
    assert spec.img_size == 32 and spec.extra["recipe"] == "plain" and spec.num_classes is None
    assert backbone_spec(str(root), model_name="vim_tiny_patch16_224", checkpoint="x.pth").checkpoint == "x.pth"
    with pytest.raises(ConfigError, match="no such folder"):
        backbone_spec(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no subfolders.*--model"):
        backbone_spec(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="one adapter folder"):  # an adapter given instead of its parent
        backbone_spec(str(root / "a"))
    # a backbone with no weights recorded: the answer is --checkpoint (svp serve has no --pretrained
    # or --random-init, which the builder's own message named)
    (root / "a" / "backbone.json").unlink()
    for kw in ({"model_name": "vim_tiny_patch16_224"}, {}):
        if not kw:
            cfg = json.loads((root / "a" / "adapter_config.json").read_text())
            (root / "a" / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name="vim_tiny_patch16_224")))
        with pytest.raises(ConfigError, match="vim_tiny_patch16_224.*no weights given.*pass --checkpoint") as e:
            backbone_spec(str(root), **kw)
        assert "--pretrained" not in str(e.value) and "--random-init" not in str(e.value)


def test_an_adapter_trained_on_a_random_backbone_is_served(tmp_path):
    """svp serve drew a random backbone without the recorded head: a head of another size draws
    other random numbers for the backbone after it, whose weight hash refused every adapter trained
    on it, while svp predict served them (QA 16c)."""
    import shutil

    from svp.cli import main as svp_main
    from svp.serve.app import build_app
    assert svp_main(["train", "--dataset", "digits", "--model", H.MINI, "--method", "lora", "--epochs", "1",
                     "--random-init", "--batch-size", "8", "data.max_train_samples=16", "data.max_eval_samples=8",
                     "run.progress=none", "--output", str(tmp_path), "--name", "rnd"]) == 0
    shutil.copytree(tmp_path / "rnd" / "best", tmp_path / "adapters" / "rnd")
    _, report = build_app(str(tmp_path / "adapters"))
    assert report["backbone"]["weights"] == "random" and "rnd" in report["loaded"], report


def test_a_broken_first_adapter_does_not_choose_or_stop_the_server(adapters, tmp_path):
    """The backbone comes from the first adapter that can be read: a damaged one that sorts first
    (bad JSON, a backbone.json of the wrong shape) is skipped here and refused when adapters load."""
    import json
    import shutil

    from svp.build import ModelSpec
    from svp.errors import ConfigError
    from svp.serve import backbone_spec
    root = tmp_path / "root"
    shutil.copytree(os.path.join(adapters, "lora"), root / "b_good")
    (root / "b_good" / "backbone.json").write_text(json.dumps(ModelSpec(H.MINI, img_size=32).to_dict()))
    for name, fname, text in (("a_json", "adapter_config.json", "{not json"),
                              ("a_spec", "backbone.json", "{bad"),
                              ("a_type", "backbone.json", '{"model": 5}')):
        shutil.copytree(os.path.join(adapters, "lora"), root / name)
        (root / name / fname).write_text(text)
    spec = backbone_spec(str(root))
    assert spec.model == H.MINI and spec.img_size == 32
    shutil.rmtree(root / "b_good")
    with pytest.raises(ConfigError, match="none of its 3 subfolders") as e:
        backbone_spec(str(root))
    assert "a_spec" in str(e.value) and "backbone.json" in str(e.value)


def test_a_new_layer_hook_method_that_says_so_shares_the_pass(tmp_path, monkeypatch):
    """docs/architecture.md, adding a method: svp serve ran a new layer-hook method on its own
    model (a hard-coded list of methods); one whose class sets serve_shared now shares the base
    pass, its rows equal to the adapter run alone. One that does not set it, or that trains a
    backbone tensor in place, keeps its own model."""
    import dataclasses

    import torch.nn as nn

    from svp.peft import registry
    from svp.peft.base import PeftConfig, PeftMethod

    @dataclasses.dataclass
    class ScaleConfig(PeftConfig):
        init: float = 1.0
        method = "scale_test"

    class Scale(PeftMethod):
        uses_hook = True
        serve_shared = True

        def __init__(self, config, model):
            super().__init__(config, model)
            self.scales = nn.Parameter(torch.full((len(model.layers), model.embed_dim), config.init))

        def hook(self, i, hidden, residual, cls_pos):
            return hidden * self.scales[i], residual, cls_pos

    monkeypatch.setitem(registry._METHODS, "scale_test", (ScaleConfig, Scale))
    H.make_adapter(tmp_path / "scale", "scale_test", dict(num_classes=3))
    H.make_adapter(tmp_path / "svp", "svp", dict(shared_layers=4, hidden=16, num_classes=10))
    model = MultiAdapterModel(H.mini_backbone())
    for name in ("scale", "svp"):
        model.add_adapter(name, str(tmp_path / name))
    assert model.adapters["scale"].describe()["batching"] == "shared pass base"
    names = ["scale", "svp", "scale", "svp"]
    x = torch.randn(4, 3, 32, 32)
    passes = []
    hook = model.backbone.norm_f.register_forward_hook(lambda m, a, o: passes.append(o.shape))
    out = model(x, names)
    hook.remove()
    assert len(passes) == 1
    for name in ("scale", "svp"):
        rows = [i for i, n in enumerate(names) if n == name]
        ref = svp.load_adapter(H.mini_backbone(), tmp_path / name)(x[rows])
        assert (torch.stack([out[i] for i in rows]) - ref).abs().max().item() < 1e-5, name
    monkeypatch.setattr(Scale, "serve_shared", False)
    assert model.add_adapter("scale", str(tmp_path / "scale")).describe()["batching"] == "own model"
    monkeypatch.setattr(Scale, "serve_shared", True)
    monkeypatch.setattr(Scale, "trainable_base_names", lambda self, m: ["norm_f.weight"])
    H.make_adapter(tmp_path / "scale_norm", "scale_test", dict(num_classes=3))
    assert model.add_adapter("scale_norm", str(tmp_path / "scale_norm")).describe()["batching"] == "own model"


_REWRITTEN_WHILE_LOADING = r"""
import os, sys, threading
import svp  # noqa: F401
import serve_helpers as H
from svp.errors import AdapterError
from svp.serve.model import MultiAdapterModel
root = sys.argv[1]
a = H.make_adapter(os.path.join(root, "a"), "full", dict(num_classes=10), seed=1)
b = H.make_adapter(os.path.join(root, "b"), "full", dict(num_classes=10), seed=2)
data = [open(os.path.join(d, "adapter.safetensors"), "rb").read() for d in (a, b)]
stop = threading.Event()

def rewrite():   # as `cp b/adapter.safetensors a/` does it: truncate, then write
    k = 0
    while not stop.is_set():
        with open(os.path.join(a, "adapter.safetensors"), "r+b") as f:
            f.truncate(0)
            f.write(data[k % 2])
        k += 1
        stop.wait(0.002)
t = threading.Thread(target=rewrite)
t.start()
model, loaded = MultiAdapterModel(H.mini_backbone()), 0
try:
    for _ in range(60):
        try:
            model.add_adapter("a", a)
            loaded += 1
        except AdapterError:   # caught mid-write: refused until whole
            pass
finally:
    stop.set()
    t.join()
print("loaded", loaded)
"""


def test_a_file_copied_over_an_adapter_as_it_loads_does_not_kill_the_server(tmp_path):
    """safetensors memory-mapped the adapter's file: `cp` over it while `svp serve` reloaded
    truncated the mapping, and the server died of SIGBUS (exit 135, nothing said). The files are
    read into memory: an adapter caught mid-write is refused, the process lives."""
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__),
                                                       os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _REWRITTEN_WHILE_LOADING, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "loaded" in r.stdout, (r.returncode, r.stderr[-2000:])
