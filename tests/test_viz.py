"""svp.viz gate analysis: values against a by-hand computation from the mixer's
parameters, token layout through layer hooks, hook install/removal, PEFT models."""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import svp  # noqa: F401
from svp.viz import CLS, EXTRA, GateRecorder, analyze


def tiny_vim(depth=3, img=32, patch=4, dim=32, seed=0):
    torch.manual_seed(seed)
    m = timm.create_model("vim_tiny_patch16_224", img_size=img, patch_size=patch, stride=patch, depth=depth,
                          embed_dim=dim, num_classes=5)
    # Spread the step sizes so that the gates differ visibly from token to token.
    with torch.no_grad():
        for layer in m.layers:
            for dtp in (layer.mixer.dt_proj, layer.mixer.dt_proj_b):
                dtp.weight.mul_(20.0)
                dtp.bias.add_(2.0)
    return m.eval()


def by_hand(mixer, u, reverse):
    """Gates of one direction computed from the mixer's parameters, in float64, from
    the mixer input ``u`` (b, L, D). Returns Delta (b, L, E), A (E, N), B (b, L, N)."""
    u = u.double()
    xz = u @ mixer.in_proj.weight.double().t()
    x = xz[..., :mixer.d_inner]
    conv = mixer.conv1d_b if reverse else mixer.conv1d
    x_proj = mixer.x_proj_b if reverse else mixer.x_proj
    dt_proj = mixer.dt_proj_b if reverse else mixer.dt_proj
    A_log = mixer.A_b_log if reverse else mixer.A_log
    xs = x.flip(1) if reverse else x
    # causal depthwise conv: output t sees inputs t-W+1 .. t (in scan order)
    w = conv.weight.double()[:, 0]  # (E, W)
    W = w.shape[-1]
    xp = F.pad(xs, (0, 0, W - 1, 0))  # W-1 zeros before the first token
    y = conv.bias.double() + sum(xp[:, k:k + xs.shape[1]] * w[:, k] for k in range(W))
    y = F.silu(y)
    if reverse:
        y = y.flip(1)
    dbl = y @ x_proj.weight.double().t()
    R, N = mixer.dt_rank, mixer.d_state
    dt, B = dbl[..., :R], dbl[..., R:R + N]
    delta = F.softplus(dt @ dt_proj.weight.double().t() + dt_proj.bias.double())
    A = -torch.exp(A_log.double())
    return delta, A, B


def test_gates_equal_hand_computation_from_mixer_parameters():
    m = tiny_vim()
    x = torch.randn(2, 3, 32, 32)
    layer = 1
    captured = {}
    h = m.layers[layer].mixer.register_forward_pre_hook(lambda mod, args: captured.setdefault("u", args[0].detach()))
    try:
        g = analyze(m, x)
    finally:
        h.remove()
    mixer = m.layers[layer].mixer
    c = g.cls_pos[layer]
    assert c == 32 and g.layout[layer].tolist() == list(range(32)) + [CLS] + list(range(32, 64))
    L = 65
    for d, reverse in ((0, False), (1, True)):
        delta, A, B = by_hand(mixer, captured["u"], reverse)
        upd = delta.mean(-1)
        upd_db = (delta[..., :, None] * B[..., None, :]).abs().mean((-1, -2))
        forget = torch.exp(delta[..., None] * A).mean((-1, -2))
        # propagation: log of the product of forget gates between token j and cls,
        # averaged over channels and states, by explicit products (no closed form)
        prop = torch.full((2, L), -math.inf, dtype=torch.float64)
        for j in range(L):
            ks = range(j + 1, c + 1) if not reverse and j <= c else (range(c, j) if reverse and j >= c else None)
            if ks is None:
                continue
            prod = torch.ones(2, mixer.d_inner, mixer.d_state, dtype=torch.float64)
            for k in ks:
                prod = prod * torch.exp(delta[:, k, :, None] * A)
            prop[:, j] = torch.log(prod).mean((-1, -2))
        for q, ref in (("update", upd), ("update_db", upd_db), ("forget", forget), ("propagation", prop)):
            got = g.tokens[q][layer][:, d].double()
            fin = torch.isfinite(ref)
            assert torch.equal(fin, torch.isfinite(got)), q
            torch.testing.assert_close(got[fin], ref[fin], rtol=2e-4, atol=1e-6, msg=q)
        # the values are not trivially constant over tokens
        assert upd.std() > 1e-3 * upd.mean()
    # grid mapping: patch p sits at sequence index p (< c) or p + 1 (>= c)
    tok = g.tokens["forget"][layer][:, 0]
    grid = g.grid["forget"][:, layer, 0].reshape(2, -1)
    torch.testing.assert_close(grid, torch.cat([tok[:, :c], tok[:, c + 1:]], 1))
    assert torch.equal(g.cls["forget"][:, layer, 0], tok[:, c])
    # combined direction
    both = g.grid["update"][:, layer, 2]
    torch.testing.assert_close(both, (g.grid["update"][:, layer, 0] + g.grid["update"][:, layer, 1]) / 2)
    pb = g.grid["propagation"][:, layer, 2].reshape(2, -1)
    pf = g.grid["propagation"][:, layer, 0].reshape(2, -1)
    pk = g.grid["propagation"][:, layer, 1].reshape(2, -1)
    assert torch.equal(pb[:, :c], pf[:, :c]) and torch.equal(pb[:, c:], pk[:, c:])
    assert torch.isfinite(pb).all() and (pb <= 0).all()
    assert torch.equal(g.cls["propagation"][:, layer], torch.zeros(2, 3))


class InsertPrompts(nn.Module):
    """A stand-in for VPT: inserts n learned tokens before layer 0 at the front or right
    before the class token, through forward_features' layer hook."""

    def __init__(self, vim, n=3, where="prefix"):
        super().__init__()
        self.vim, self.n, self.where = vim, n, where
        self.p = nn.Parameter(torch.randn(n, vim.embed_dim))

    def hook(self, i, hidden, residual, cls_pos):
        if i:
            return hidden, residual, cls_pos
        p = self.p.expand(hidden.shape[0], -1, -1)
        if self.where == "prefix":
            return torch.cat([p, hidden], 1), residual, cls_pos + self.n
        return torch.cat([hidden[:, :cls_pos], p, hidden[:, cls_pos:]], 1), residual, cls_pos + self.n

    def forward(self, x):
        f, c = self.vim.forward_features(x, hook=self.hook, return_cls_pos=True)
        return self.vim.forward_head(f, cls_pos=c)


@pytest.mark.parametrize("where", ["prefix", "middle"])
def test_inserted_tokens_are_mapped_back_to_the_patch_grid(where):
    m = tiny_vim(depth=2)
    x = torch.randn(1, 3, 32, 32)
    wrapped = InsertPrompts(m, 3, where)
    g = analyze(wrapped, x)
    lay = g.layout[0]
    assert lay.shape[0] == 68 and g.cls_pos == [35, 35]
    assert int(lay[35]) == CLS and g.extra_tokens(0) == 3
    extra_at = torch.nonzero(lay == EXTRA).flatten().tolist()
    assert extra_at == ([0, 1, 2] if where == "prefix" else [32, 33, 34])
    assert sorted(lay[lay >= 0].tolist()) == list(range(64))
    for q in g.grid:
        assert torch.isfinite(g.grid[q][:, :, 2]).all(), q
    # each patch's value is the one at its sequence position
    tok = g.tokens["update"][1][0, 1]
    grid = g.grid["update"][0, 1, 1].reshape(-1)
    for pos, patch in enumerate(lay.tolist()):
        if patch >= 0:
            assert grid[patch] == tok[pos]
    assert g.cls["propagation"][0, 0, 2] == 0
    # forward scan, layer 0: every position left of cls (patches and, for 'middle', the
    # prompts) reaches it, each log forget gate on the way is < 0, so the value rises
    # strictly towards cls; positions right of cls are unreachable (-inf)
    seq_prop = g.tokens["propagation"][0][0, 0]
    assert torch.isfinite(seq_prop[:36]).all() and (seq_prop[:35] < seq_prop[1:36]).all()
    assert torch.isinf(seq_prop[36:]).all()


def test_recorder_removes_hooks_also_after_an_error():
    m = tiny_vim(depth=2)
    with GateRecorder(m) as rec:
        assert all(layer.mixer.gate_hook is not None for layer in m.layers)
        assert "forward_features" in m.__dict__
        m(torch.randn(1, 3, 32, 32))
    assert all(layer.mixer.gate_hook is None for layer in m.layers)
    assert "forward_features" not in m.__dict__
    assert rec.result().num_images == 1
    with pytest.raises(ValueError):
        with GateRecorder(m):
            m(torch.randn(1, 3, 30, 30))  # does not fit the patch grid
    assert all(layer.mixer.gate_hook is None for layer in m.layers)
    assert "forward_features" not in m.__dict__
    # outputs are unchanged by recording
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    with GateRecorder(m):
        got = m(x)
    assert torch.equal(ref, got)
    with pytest.raises(ValueError, match="no VisionMamba"):
        GateRecorder(nn.Linear(2, 2))


def test_batches_concatenate_and_match_single_images():
    m = tiny_vim(depth=2)
    x = torch.randn(3, 3, 32, 32)
    g_all = analyze(m, x, batch_size=2)
    g_one = analyze(m, x[2:3])
    assert g_all.num_images == 3
    torch.testing.assert_close(g_all.grid["forget"][2], g_one.grid["forget"][0], rtol=1e-5, atol=1e-6)


def test_frozen_and_zero_scale_svp_give_identical_maps():
    from svp.peft import get_peft_model, make_config
    m = tiny_vim(depth=4)
    x = torch.randn(2, 3, 32, 32)
    frozen = analyze(m, x)
    peft = get_peft_model(m, make_config("svp", shared_layers=2, hidden=8, num_classes=5))
    assert not peft.method.alpha.detach().any() and not peft.method.beta.detach().any()
    g = analyze(peft, x)
    for q in frozen.grid:
        assert torch.equal(frozen.grid[q].nan_to_num(), g.grid[q].nan_to_num()), q
    # with non-zero scales the prompts reach the gates: the maps move (so the equality
    # above is not vacuous)
    with torch.no_grad():
        peft.method.beta.fill_(0.5)
        peft.method.alpha.fill_(0.5)
    g2 = analyze(peft, x)
    assert not torch.allclose(g2.grid["update"], frozen.grid["update"])


def test_vpt_peft_model_layout():
    from svp.peft import get_peft_model, make_config
    m = tiny_vim(depth=2)
    peft = get_peft_model(m, make_config("vpt_deep", num_tokens=4, placement="middle", num_classes=5))
    g = analyze(peft, torch.randn(1, 3, 32, 32))
    for l in range(2):
        assert g.layout[l].shape[0] == 69 and g.cls_pos[l] == 36
        assert torch.nonzero(g.layout[l] == EXTRA).flatten().tolist() == [32, 33, 34, 35]
    assert torch.isfinite(g.grid["propagation"][:, :, 2]).all()
