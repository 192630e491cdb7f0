"""svp.build: one way to build a backbone and an adapted model."""
import json
import os
import time

import pytest
import timm
import torch

import svp  # noqa: F401
from svp.build import ModelSpec, adapter_spec, build_model
from svp.cli import main as svp_main
from svp.errors import ConfigError

TINY = {"img_size": 32, "patch_size": 4, "stride": 4, "depth": 2, "embed_dim": 32}


def test_the_bundled_mini_vim_gets_its_bundled_weights_unless_random_is_asked_for():
    bundled = timm.create_model("vim_mini_patch4_32", pretrained=True, num_classes=10)
    m = build_model(ModelSpec("vim_mini_patch4_32", num_classes=10))
    w = "layers.3.mixer.in_proj.weight"
    assert torch.equal(m.state_dict()[w], bundled.state_dict()[w])
    r = build_model(ModelSpec("vim_mini_patch4_32", num_classes=10, random_init=True, init_seed=0))
    assert not torch.equal(r.state_dict()[w], bundled.state_dict()[w])


def test_random_init_is_reproducible_under_init_seed():
    a, b, c = (build_model(ModelSpec("vim_tiny_patch16_224", kwargs=TINY, num_classes=3, random_init=True,
                                     init_seed=s)) for s in (1, 1, 2))
    w = "layers.1.mixer.x_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w]) and not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_no_weights_and_no_explicit_ask_is_one_clear_error():
    with pytest.raises(ConfigError, match="random_init"):
        build_model(ModelSpec("vim_tiny_patch16_224", kwargs=TINY))


@pytest.mark.parametrize("error,words", [
    ("unable to open file </x/vim_mini.safetensors>: Too many open files (24)", "cannot read its bundled weights"),
    ("Error(s) in loading state_dict: size mismatch for head.weight", "its bundled weights do not fit"),
])
def test_bundled_weights_that_cannot_be_read_are_not_said_not_to_fit(monkeypatch, error, words):
    """Out of file descriptors (ulimit -n), the bundled weights "do not fit", which they do."""
    import timm

    from svp.errors import CheckpointError

    def create_model(*a, **k):
        raise RuntimeError(error)
    monkeypatch.setattr(timm, "create_model", create_model)
    with pytest.raises(CheckpointError, match=f"model 'vim_mini_patch4_32': {words} "):
        build_model(ModelSpec("vim_mini_patch4_32", num_classes=4))


def test_old_backbone_json_without_random_init_rebuilds_the_random_backbone():
    spec = ModelSpec.from_dict({"model": "vim_tiny_patch16_224", "checkpoint": None, "pretrained": False,
                                "kwargs": TINY, "init_seed": 0, "img_size": 32, "recipe": "svp"})
    assert spec.weights == "random" and spec.extra == {"recipe": "svp"}
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_a_backbone_json_may_name_svps_vim_models_alone(tmp_path):
    """A downloaded adapter folder's backbone.json named resnet18 with kwargs.checkpoint_path at a
    pickle: timm's own loader read it, and before timm 1.0.31 unpickled anything (review41: code
    ran on svp predict and svp serve)."""
    import json

    import timm

    from svp.build import read_backbone_spec
    from svp.models import MODEL_NAMES
    from svp.peft import AdapterError
    # the list is what svp registers with timm, no more and no less
    ours = {n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("svp.models")}
    assert set(MODEL_NAMES) == ours
    path = tmp_path / "backbone.json"
    path.write_text(json.dumps({"model": "resnet18", "random_init": True,
                                "kwargs": {"checkpoint_path": str(tmp_path / "notes.txt")}}))
    with pytest.raises(AdapterError, match=r"'model' 'resnet18' is not one of svp's Vim models .*and its kwargs "
                                           r"\['checkpoint_path'\] would have timm's own loader read a file"):
        read_backbone_spec(str(path))
    path.write_text(json.dumps({"model": "hf-hub:someone/evil", "pretrained": True}))
    with pytest.raises(AdapterError, match=r"'model' 'hf-hub:someone/evil': a timm model name, not a hub"):
        read_backbone_spec(str(path))
    # nor may it choose where weights are downloaded from: any URL or hub repository was fetched,
    # with HF_HUB_OFFLINE=1 too (timm fetches a url through torch.hub: review 70)
    for key, cfg, named in (("pretrained_cfg_overlay", {"hf_hub_id": None, "url": "http://127.0.0.1:9/w.pth"}, "url"),
                            ("pretrained_cfg_overlay", {"hf_hub_id": "someone/any", "hf_hub_filename": "w.pth"},
                             "hf_hub_filename, hf_hub_id"),
                            ("pretrained_cfg", {"url": "http://127.0.0.1:9/w.pth"}, "url")):
        path.write_text(json.dumps({"model": "vim_tiny_patch16_224", "pretrained": True, "kwargs": {key: cfg}}))
        with pytest.raises(AdapterError, match=rf"backbone.json: kwargs.{key} sets {named}: a backbone description "
                                               rf"may not choose where weights are downloaded from"):
            read_backbone_spec(str(path))
    # svp's Vim models read such files through svp's loader; another name without them builds as before
    for d in ({"model": "vim_mini_patch4_32", "random_init": True,
               "kwargs": {"checkpoint_path": str(tmp_path / "notes.txt")}},
              {"model": "vim_tiny_patch16_224", "pretrained": True,   # (a local file: svp's loader reads it)
               "kwargs": {"pretrained_cfg_overlay": {"file": str(tmp_path / "w.pth")}}},
              {"model": "my_vim_variant", "random_init": True, "kwargs": {"depth": 2}}):
        path.write_text(json.dumps(d))
        assert read_backbone_spec(str(path)).model == d["model"]


def test_class_names_from_an_adapter_reach_the_terminal_without_their_control_characters(tmp_path, capsys):
    """A class name holding escape sequences set the terminal's title, cleared its screen and
    printed fake lines through svp predict (review41); --json keeps the names as they are."""
    import json

    import svp.peft as peft
    from svp.io import printable
    evil = "\x1b]0;owned\x07\x1b[2J\x1b[31mFAKE\x1b[0m"
    model = peft.get_peft_model(build_model(ModelSpec("vim_mini_patch4_32", num_classes=2)),
                                peft.make_config("linear", num_classes=2))
    model.save(str(tmp_path / "ad"), base_model_name="vim_mini_patch4_32", class_names=[evil, "b\nc"])
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert svp_main(["predict", str(tmp_path / "ad"), str(tmp_path / "x.png")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and printable(evil) in out and "b\\x0ac" in out
    assert printable(evil) == "\\x1b]0;owned\\x07\\x1b[2J\\x1b[31mFAKE\\x1b[0m"
    assert svp_main(["predict", str(tmp_path / "ad"), str(tmp_path / "x.png"), "--json"]) == 0
    assert {t["class"] for t in json.loads(capsys.readouterr().out)[0]["top"]} == {evil, "b\nc"}


def test_predict_with_another_model_and_no_weights_fails_fast_without_the_hub(tmp_path, capsys):
    import svp.peft as peft
    base = build_model(ModelSpec("vim_mini_patch4_32", num_classes=4))
    model = peft.get_peft_model(base, peft.make_config("linear", num_classes=4))
    model.save(str(tmp_path / "ad"), base_model_name="vim_mini_patch4_32", class_names=list("abcd"))
    spec = adapter_spec(str(tmp_path / "ad"))  # no backbone.json: the adapter's base model
    assert spec.model == "vim_mini_patch4_32" and spec.weights == "bundled" and spec.class_names == list("abcd")
    t0 = time.time()
    img = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (32, 32)).save(img)
    assert svp_main(["predict", str(tmp_path / "ad"), str(img), "--model", "vim_tiny_patch16_224"]) == 2
    assert "no weights given" in capsys.readouterr().err and time.time() - t0 < 10
    # the bundled base: the adapter fits, predictions come out
    assert svp_main(["predict", str(tmp_path / "ad"), str(img), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["top"]) == 4


def _checkpoint_and_adapters(tmp_path, methods):
    """A random TINY backbone saved as a checkpoint, and an adapter of each method trained on it
    (parameters perturbed so that no adapter tensor keeps its init)."""
    import svp.peft as peft
    from safetensors.torch import save_file
    base = build_model(ModelSpec("vim_tiny_patch16_224", kwargs=TINY, num_classes=5, random_init=True,
                                 init_seed=7))
    ckpt = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items() if not k.startswith("head.")}, str(ckpt))
    spec = ModelSpec("vim_tiny_patch16_224", checkpoint=str(ckpt), kwargs=TINY, num_classes=5, init_seed=0)
    dirs = {}
    for method in methods:
        extra = {"shared_layers": 1} if method == "svp" else {}
        model = peft.get_peft_model(build_model(spec), peft.make_config(method, num_classes=5, **extra))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        dirs[method] = str(tmp_path / method)
        model.save(dirs[method], base_model_name="vim_tiny_patch16_224")
    return spec, dirs


def test_an_adapted_checkpoint_is_built_without_random_init_and_gives_the_same_logits(tmp_path, monkeypatch):
    import svp.peft as peft
    from svp.build import build_backbone
    from svp.models.vim import BiMambaMixer, VisionMamba
    spec, dirs = _checkpoint_and_adapters(tmp_path, ["svp", "bitfit", "lora", "full"])
    x = torch.randn(3, 3, 32, 32)
    for method, adapter_dir in dirs.items():
        # the reference: the backbone randomly initialised first, as training builds it
        ref = peft.load_adapter(build_backbone(spec), adapter_dir).eval()
        calls = []
        monkeypatch.setattr(VisionMamba, "init_weights", lambda self: calls.append("model"))
        monkeypatch.setattr(BiMambaMixer, "_init_dt_proj", lambda self, *a: calls.append("dt"))
        rng = torch.get_rng_state()
        head = build_backbone(spec, skip_init=True).head  # the checkpoint has none: initialised alone
        assert torch.equal(torch.get_rng_state(), rng)  # under init_seed
        assert torch.equal(head.bias, torch.zeros(5)) and 0.01 < float(head.weight.detach().std()) < 0.03
        fast = build_model(spec, adapter_dir).eval()
        monkeypatch.undo()
        assert calls == [], f"{method}: the backbone under an adapter was randomly initialised first"
        with torch.no_grad():
            assert torch.equal(fast(x), ref(x)), method
        assert all(torch.isfinite(t).all() for t in fast.state_dict().values())
    # without an adapter (what training builds) the random init still runs, under init_seed
    calls = []
    monkeypatch.setattr(VisionMamba, "init_weights", lambda self: calls.append("model"))
    build_model(spec)
    assert calls == ["model"]


def test_a_checkpoint_missing_a_tensor_is_refused_on_the_uninitialised_path_too(tmp_path):
    from safetensors.torch import load_file, save_file
    from svp.errors import CheckpointError
    spec, dirs = _checkpoint_and_adapters(tmp_path, ["linear"])
    sd = load_file(spec.checkpoint)
    del sd["layers.1.mixer.D_b"]
    save_file(sd, spec.checkpoint)
    with pytest.raises(CheckpointError, match="1 missing: layers.1.mixer.D_b"):
        build_model(spec, dirs["linear"])


def test_a_model_with_a_buffer_no_checkpoint_holds_is_built_the_ordinary_way(tmp_path, monkeypatch):
    from svp.build import build_backbone
    from svp.models.vim import VisionMamba
    spec, _ = _checkpoint_and_adapters(tmp_path, [])
    init = VisionMamba.__init__

    def with_table(self, *a, **kw):
        init(self, *a, **kw)
        self.register_buffer("table", torch.arange(4.0), persistent=False)

    monkeypatch.setattr(VisionMamba, "__init__", with_table)
    model = build_backbone(spec, skip_init=True)
    assert torch.equal(model.table, torch.arange(4.0))
    assert torch.equal(model.state_dict()["layers.0.mixer.D"], build_backbone(spec).state_dict()["layers.0.mixer.D"])


def _mini_adapter(tmp_path, class_names=None):
    import svp.peft as peft
    base = build_model(ModelSpec("vim_mini_patch4_32", num_classes=4))
    model = peft.get_peft_model(base, peft.make_config("linear", num_classes=4))
    d = tmp_path / "ad"
    model.save(str(d), base_model_name="vim_mini_patch4_32", class_names=class_names or list("abcd"))
    return d


@pytest.mark.parametrize("text, words", [
    ("{bad", "not a readable backbone description"),
    ('{"model": 5}', "'model' must be a timm model name"),
    ('{"model": "vim_mini_patch4_32", "kwargs": [1]}', "'kwargs' must be a mapping"),
    # sizes no Vim has: depth 1000000 built modules until the memory ran out; -1 was a traceback
    ('{"model": "vim_mini_patch4_32", "kwargs": {"depth": 1000000}}', r"model argument depth=1000000: expected an "
                                                                      r"integer in 1\.\.1024"),
    ('{"model": "vim_mini_patch4_32", "kwargs": {"img_size": [32, 0]}}', r"img_size=\[32, 0\]"),
    ('{"model": "vim_mini_patch4_32", "img_size": -1}', r"'img_size' must be an integer in 1\.\.8192, got -1"),
    ('{"model": "vim_mini_patch4_32", "img_size": "32"}', r"'img_size' must be an integer"),
    ('{"model": "vim_mini_patch4_32", "random_init": "yes"}', r"'random_init' must be true or false, got 'yes'"),
    # each size within its bound, together 34 GB (or 17 GB of position embedding)
    ('{"model": "vim_mini_patch4_32", "kwargs": {"embed_dim": 16384, "depth": 1024, "expand": 16}}',
     r"make a Vim of about [\d,]+ parameters; expected at most 500,000,000"),
    ('{"model": "vim_mini_patch4_32", "img_size": 8192, "kwargs": {"patch_size": 4}}', r"make a Vim of about"),
])
def test_a_damaged_backbone_json_is_one_error_naming_it(tmp_path, text, words):
    from svp.errors import AdapterError
    d = _mini_adapter(tmp_path)
    (d / "backbone.json").write_text(text)
    with pytest.raises(AdapterError, match=words) as e:
        adapter_spec(str(d))
    assert "backbone.json" in str(e.value)


def test_the_size_estimate_matches_the_official_variants_and_command_lines_are_checked(tmp_path, capsys):
    """The bound on a backbone's sizes together rests on an estimate of its parameters; --model-args
    (svp visualize) and --model-kwargs (convert-official-svp) reached timm unchecked (depth
    1000000: 5 GB and 31 s before the allocator gave up)."""
    import timm
    import torch
    from svp.build import vim_params_estimate
    from svp.cli import main as svp_main
    for name, kw in (("vim_tiny_patch16_224", dict(embed_dim=192, stride=16)),
                     ("vim_small_patch16_stride8_224", dict(embed_dim=384, stride=8)),
                     ("vim_base_patch16_224", dict(embed_dim=768, stride=16))):
        with torch.device("meta"):
            real = sum(p.numel() for p in timm.create_model(name).parameters())
        assert abs(vim_params_estimate(kw) / real - 1) < 0.01, name
    rc = svp_main(["visualize", "--dataset", "digits", "--random-init", "--model-args", '{"depth": 1000000}',
                   "--out", str(tmp_path)])
    assert rc == 2 and "model argument depth=1000000: expected an integer in 1..1024" in capsys.readouterr().err


def test_an_unknown_image_recipe_in_backbone_json_is_one_error(tmp_path, capsys):
    from PIL import Image
    d = _mini_adapter(tmp_path)
    (d / "backbone.json").write_text(json.dumps(ModelSpec("vim_mini_patch4_32", extra={"recipe": "bogus"}).to_dict()))
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    assert svp_main(["predict", str(d), str(img)]) == 2
    err = capsys.readouterr().err
    assert "backbone.json: image recipe 'bogus'" in err and "Traceback" not in err


def test_class_names_that_do_not_match_the_class_count_are_refused(tmp_path):
    from svp.errors import AdapterError
    d = _mini_adapter(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["class_names"] = cfg["class_names"][:2]  # 2 names for 4 classes: predict --topk 4 indexed past them
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="adapter_config.json: .class_names. must be null or a list of 4 strings"):
        adapter_spec(str(d))


@pytest.mark.parametrize("kwargs, words", [({"nonsense_kw": 1}, "its arguments"),
                                           ({"img_size": "abc"}, "model argument img_size='abc': expected an integer")])
def test_model_arguments_that_do_not_fit_are_a_config_error(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        build_model(ModelSpec("vim_mini_patch4_32", kwargs=kwargs))


def test_a_checkpoint_of_another_width_reports_the_files_shapes(tmp_path):
    """The position embedding is resampled only across grids of one width; another model's
    embedding is reported with the shape the file holds, not a resampled one."""
    from safetensors.torch import save_file

    from svp.errors import CheckpointError
    # another grid too (64 px: 257 tokens against the mini's 65), which is what used to be resampled
    tiny = build_model(ModelSpec("vim_tiny_patch16_224", kwargs=dict(TINY, img_size=64), random_init=True))
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    width = tiny.pos_embed.shape[-1]
    mini = build_model(ModelSpec("vim_mini_patch4_32"))
    assert mini.pos_embed.shape[-1] != width and mini.pos_embed.shape[1] != tiny.pos_embed.shape[1]
    from svp.models import load_checkpoint_into
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_into(mini, str(path))
    assert f"pos_embed has shape {tuple(tiny.pos_embed.shape)}" in str(e.value)


def test_a_refused_pickle_does_not_advise_running_it(tmp_path):
    import os

    from svp.errors import CheckpointError
    from svp.models.loading import read_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())
    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, str(path))
    with pytest.raises(CheckpointError, match="getcwd") as e:
        read_checkpoint(str(path))
    assert "weights_only=False" not in str(e.value) and "weights_only` set to `False" not in str(e.value)


@pytest.mark.parametrize("text, words", [("[1]", "JSON object"), ("{bad", "not valid JSON")])
def test_convert_official_svp_model_kwargs_must_be_a_json_object(tmp_path, capsys, text, words):
    assert svp_main(["convert-official-svp", str(tmp_path / "none.pth"), "--model", "vim_mini_patch4_32",
                     "--shared-layers", "1", "--prompt-hidden", "4", "--num-classes", "3",
                     "--out", str(tmp_path / "out"), "--model-kwargs", text]) == 2
    err = capsys.readouterr().err
    assert "--model-kwargs" in err and words in err and "Traceback" not in err


def test_a_failed_or_damaged_hub_download_names_the_file_and_what_to_do(tmp_path):
    """Offline, the error named neither the repository nor the file the user was told to
    "download elsewhere"; TRANSFORMERS_OFFLINE (offline for huggingface_hub too) got the advice
    to set HF_HUB_OFFLINE; an error page in the hub cache was "its pretrained weights do not fit"
    (QA 15f). In a fresh process: huggingface_hub reads its offline switches at import."""
    import subprocess
    import sys
    # each try prints its error on a line of its own; with DAMAGE set, the hub cache then gets an
    # error page for the file, and a second try reads it (one process for both: imports take seconds)
    script = ("import os, svp\nfrom svp.build import ModelSpec, build_backbone\n"
              "def once():\n"
              "    try:\n        build_backbone(ModelSpec('vim_tiny_patch16_224', pretrained=True))\n"
              "    except Exception as e:\n        print(type(e).__name__, str(e).replace(chr(10), ' '))\n"
              "once()\n"
              "if os.environ.get('DAMAGE'):\n"
              "    snap = os.path.join(os.environ['HF_HOME'], 'hub', 'models--hustvl--Vim-tiny-midclstok')\n"
              "    os.makedirs(os.path.join(snap, 'refs'))\n"
              "    open(os.path.join(snap, 'refs', 'main'), 'w').write('0' * 40)\n"
              "    os.makedirs(os.path.join(snap, 'snapshots', '0' * 40))\n"
              "    os.makedirs(os.path.join(snap, 'blobs'))\n"   # (as huggingface_hub lays it out: a link to a blob)
              "    with open(os.path.join(snap, 'blobs', 'e' * 64), 'w') as f:\n"
              "        f.write('<html>502 Bad Gateway</html>')\n"
              "    os.symlink(os.path.join('..', '..', 'blobs', 'e' * 64),\n"
              "               os.path.join(snap, 'snapshots', '0' * 40, 'vim_t_midclstok_76p1acc.pth'))\n"
              "    once()\n"
              "    try:\n        build_backbone(ModelSpec('vim_tiny_patch16_224.nosuchtag', pretrained=True))\n"
              "    except Exception as e:\n        print(type(e).__name__, str(e).replace(chr(10), ' '))\n"
              "    try:\n        build_backbone(ModelSpec('vim_tiny_patch16_224', pretrained=True, kwargs={\n"
              "            'pretrained_cfg_overlay': {'file': '/no such dir/local.pth'}}))\n"
              "    except Exception as e:\n        print(type(e).__name__, str(e).replace(chr(10), ' '))\n")

    def run(**env):
        full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DAMAGE")}
        full.update(HF_HOME=str(tmp_path / "hf" / "-".join(env)), OMP_NUM_THREADS="1", **env)
        r = subprocess.run([sys.executable, "-c", script], env=full, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.splitlines()
    url = "https://huggingface.co/hustvl/Vim-tiny-midclstok/resolve/main/vim_t_midclstok_76p1acc.pth"
    outs = {}
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        outs[var] = run(**{var: "1"}, **({"DAMAGE": "1"} if var == "HF_HUB_OFFLINE" else {}))
        out = outs[var][0]
        assert out.startswith("CheckpointError model 'vim_tiny_patch16_224': cannot get its pretrained weights"), out
        assert f"download {url} elsewhere and pass it with --checkpoint, or" in out, out
        assert f"to copy over) ({var} is set: only the local hub cache was read)" in out, out
        # a resumed run refuses --checkpoint: the hub cache is its way (review 70)
        assert "or, for a run resumed, put it in the hub cache this machine reads (HF_HUB_CACHE" in out, out
    assert len(outs["TRANSFORMERS_OFFLINE"]) == 1 and len(outs["HF_HUB_OFFLINE"]) == 4, outs
    out = outs["HF_HUB_OFFLINE"][1]
    assert "cannot read its pretrained weights" in out and "an HTML/XML page, not weights" in out, out
    # deleting the snapshot's link alone did nothing: huggingface_hub linked it to the same blob again
    snap = os.path.join(str(tmp_path / "hf" / "HF_HUB_OFFLINE-DAMAGE"), "hub", "models--hustvl--Vim-tiny-midclstok")
    link = os.path.join(snap, "snapshots", "0" * 40, "vim_t_midclstok_76p1acc.pth")
    blob = os.path.realpath(os.path.join(snap, "blobs", "e" * 64))
    assert (f"it is the hub cache's copy: delete {link} and {blob}, the file it links to, to download again, "
            f"or pass --checkpoint") in out, out
    out = outs["HF_HUB_OFFLINE"][2]   # (an unknown tag was "its pretrained weights do not fit")
    assert out.startswith("ConfigError model 'vim_tiny_patch16_224.nosuchtag': Invalid pretrained tag"), out
    out = outs["HF_HUB_OFFLINE"][3]   # (a local file named by an overlay: no download to advise: retest 73)
    assert "the model's pretrained_cfg names the local file '/no such dir/local.pth': check its path" in out, out
    assert "huggingface.co" not in out and "hub cache" not in out, out


def test_the_offline_hint_reads_the_switches_as_huggingface_hub_does():
    """HF_HUB_OFFLINE=0 beside TRANSFORMERS_OFFLINE=1 is online for huggingface_hub (the first
    set wins), but svp said "TRANSFORMERS_OFFLINE is set: only the local hub cache was read"
    (review)."""
    from svp.build import _offline_switch
    assert _offline_switch({}) is None
    assert _offline_switch({"HF_HUB_OFFLINE": "1"}) == "HF_HUB_OFFLINE"
    assert _offline_switch({"TRANSFORMERS_OFFLINE": "true"}) == "TRANSFORMERS_OFFLINE"
    assert _offline_switch({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}) is None
    try:   # (where huggingface_hub exposes its own reading of them)
        from huggingface_hub.constants import _is_true
    except ImportError:
        return
    assert _offline_switch({"HF_HUB_OFFLINE": "1 "}) is None   # (the hub does not strip: it went online)
    for env in ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, {"TRANSFORMERS_OFFLINE": "yes"}, {},
                {"HF_HUB_OFFLINE": "1 "}, {"HF_HUB_OFFLINE": " true"}):
        hub = _is_true(env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE"))
        assert (_offline_switch(env) is not None) == hub, env
