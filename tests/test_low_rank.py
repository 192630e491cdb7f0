"""svp.ops.low_rank: a frozen weight plus a LoRA update, W + s B A, in products that never form its
(out, in) gradient; and the Vim mixer's LoRA training path through it (svp.models.vim.LORA_FACTORED)."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import svp.models.vim as vim
import svp.ops.low_rank as low_rank
from svp.ops.low_rank import low_rank_products
from svp.peft import get_peft_model, make_config
from svp.peft.lora import LoRAParametrization


@pytest.mark.parametrize("merged", [True, False], ids=["merged block weights", "update products apart"])
@pytest.mark.parametrize("sizes", [(16, 16), (20,), (7, 13)])
def test_blocks_equal_the_merged_weights_product_and_their_gradients_are_exact(sizes, merged, monkeypatch):
    """Both forms of the products (low_rank.MERGED): the block weights W_k + s B_k A formed for the
    forward product and X's gradient, or the update's own (M, r) products added to each."""
    monkeypatch.setattr(low_rank, "MERGED", merged)
    torch.manual_seed(0)
    out, d, r, s = sum(sizes), 24, 4, 0.7
    x = torch.randn(3, 10, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out, d, dtype=torch.float64)
    a = torch.randn(r, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out, r, dtype=torch.float64, requires_grad=True)
    ys = low_rank_products(x, w, a, b, s, sizes)
    ref = F.linear(x, w + s * b @ a).split(list(sizes), -1)
    assert [y.shape for y in ys] == [q.shape for q in ref]
    for y, q in zip(ys, ref):
        torch.testing.assert_close(y, q, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, a, b: low_rank_products(x, w, a, b, s, sizes), (x, a, b))
    # a block whose output is not used: its rows of B's gradient are zero, the others exact
    assert torch.autograd.gradcheck(lambda x, a, b: low_rank_products(x, w, a, b, s, sizes)[-1], (x, a, b))


def test_bad_shapes_name_what_was_expected():
    w, a, b = torch.zeros(8, 4), torch.zeros(2, 4), torch.zeros(8, 2)
    with pytest.raises(ValueError, match=r"blocks \[4, 3\] of w \(8, 4\)"):
        low_rank_products(torch.zeros(3, 4), w, a, b, 1.0, (4, 3))
    with pytest.raises(ValueError, match="b \\(8, 3\\)"):
        low_rank_products(torch.zeros(3, 4), w, a, torch.zeros(8, 3), 1.0, (8,))
    with pytest.raises(ValueError, match="w requires grad"):   # its gradient would be silently missing
        low_rank_products(torch.zeros(3, 4), w.requires_grad_(), a, b, 1.0, (8,))


def _lora_model(targets=("in_proj", "out_proj", "x_proj", "dt_proj")):
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=3,
                              embed_dim=32, num_classes=5)
    pm = get_peft_model(model, make_config("lora", num_classes=5, r=2, targets=targets)).train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():   # nonzero B (zero-initialised, the update would vanish)
        for n, p in pm.named_parameters():
            if p.requires_grad and "lora_" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return pm, torch.randn(2, 3, 32, 32, generator=g)


class _Products(TorchDispatchMode):
    """Records (output shape, inner dimension) of every matrix product run under it."""

    def __enter__(self):
        self.shapes = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            a = args[0] if func.overloadpacket is torch.ops.aten.mm else args[1]
            self.shapes.append((tuple(out.shape), a.shape[1]))
        return out


def _step(pm, x):
    pm.zero_grad(set_to_none=True)
    out = pm(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}


def test_lora_training_forms_no_full_in_or_out_proj_weight_gradient_and_matches_the_parametrization(monkeypatch):
    """In training the mixers' in_proj and out_proj do not go through the parametrization's forward,
    and no product of the step forms an (out, in) weight gradient for them (a sum over the
    tokens); the outputs and every gradient match the parametrization's path up to float32
    rounding. Inference (no grad) keeps the merged weight's single product."""
    pm, x = _lora_model()
    calls = []
    real = LoRAParametrization.forward

    def spy(self, weight):
        calls.append(tuple(weight.shape))
        return real(self, weight)
    monkeypatch.setattr(LoRAParametrization, "forward", spy)
    mixer = pm.base_model.layers[0].mixer
    in_shape, out_shape = tuple(mixer.in_proj.weight.shape), tuple(mixer.out_proj.weight.shape)

    monkeypatch.setattr(vim, "LORA_FACTORED", False)
    calls.clear()
    merged = _step(pm, x)
    assert calls.count(in_shape) == 3 and calls.count(out_shape) == 3, calls

    monkeypatch.setattr(vim, "LORA_FACTORED", True)
    calls.clear()
    tokens = x.shape[0] * (pm.base_model.patch_embed.num_patches + 1)
    weights = {in_shape, (in_shape[0] // 2, in_shape[1]), out_shape}   # (in_proj's halves too)
    with _Products() as products:
        factored = _step(pm, x)
    assert in_shape not in calls and out_shape not in calls, calls
    assert products.shapes, "the step's products were recorded"
    full = [(o, k) for o, k in products.shapes if o in weights and k == tokens]
    assert not full, f"(out, in) weight gradients formed over the {tokens} tokens: {full}"
    assert calls, "x_proj and dt_proj stay merged (the fused kernels read their weights)"

    torch.testing.assert_close(factored[0], merged[0], rtol=1e-5, atol=1e-6)
    assert set(factored[1]) == set(merged[1])
    for n, g in merged[1].items():
        scale = g.abs().max().clamp_min(1e-12)
        assert ((factored[1][n] - g).abs().max() / scale) < 1e-4, n
    with torch.no_grad():
        calls.clear()
        pm.eval()(x)
        assert calls.count(in_shape) == 3, "inference forms the merged weight"


def test_an_empty_block_has_no_gradient_rows_and_the_rest_theirs():
    """A block of zero rows (sizes (0, 7)): the forward was right, the backward failed in a reshape
    of 0 elements (review of the CPU kernels)."""
    import svp.ops.low_rank as lr
    for merged in (False, True):
        lr_merged = lr.MERGED
        lr.MERGED = merged
        try:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
            w = torch.randn(7, 5, dtype=torch.float64, generator=g)
            a = torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True)
            b = torch.randn(7, 2, dtype=torch.float64, generator=g, requires_grad=True)
            assert torch.autograd.gradcheck(lambda x, a, b: lr.low_rank_products(x, w, a, b, 0.5, (0, 7)),
                                            (x, a, b)), merged
        finally:
            lr.MERGED = lr_merged


def test_a_frozen_lora_keeps_its_summed_weight_while_w_a_b_are_unchanged():
    """A frozen adapter (svp eval / predict / serve) formed W + s B A in every projection of every
    forward (Vim-Small batch-1 prediction 1.7-1.8x linear probing's time): the sum is kept on W now,
    and follows any change of W, A or B; an adapter that trains forms it on every access."""
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=2, embed_dim=32,
                              num_classes=4)
    peft = get_peft_model(model, make_config("lora", r=2, num_classes=4)).eval()
    with torch.no_grad():
        lora = [p for n, p in peft.named_parameters() if "lora_" in n]
        assert len(lora) == 2 * 6 * 2   # (A and B of six projections, both directions, in two layers)
        for p in lora:
            p.add_(0.05 * torch.randn_like(p))   # a trained adapter: B no longer zero
    ref = __import__("copy").deepcopy(peft)       # trains: its sums formed on every access
    peft.requires_grad_(False)
    lin = peft.base_model.layers[0].mixer.in_proj
    param = lin.parametrizations.weight[0]
    x = torch.randn(2, 3, 32, 32)

    def fresh(m):
        p = m.parametrizations.weight[0]
        return m.parametrizations.weight.original + p.scale * (p.lora_B @ p.lora_A)

    with torch.no_grad():
        first = lin.weight
        assert lin.weight is first and torch.equal(first, fresh(lin))   # kept, and the sum itself
        assert torch.equal(peft(x), ref(x))
        r = ref.base_model.layers[0].mixer.in_proj
        assert r.weight is not r.weight                                  # a trained adapter: formed each time
        for t in (param.lora_A, param.lora_B, lin.parametrizations.weight.original):
            t.mul_(1.25)                                                 # (load_adapter_state, merge: in place)
            now = lin.weight
            assert now is not first and torch.equal(now, fresh(lin))
            first = now
        for src, dst in zip(peft.parameters(), ref.parameters()):
            dst.copy_(src)
        assert torch.equal(peft(x), ref(x))
    param.lora_A.requires_grad_(True)   # trains again: formed per access, and the gradient reaches A
    peft(x).sum().backward()
    assert param.lora_A.grad is not None and lin.weight is not lin.weight


def test_a_lora_frozen_again_after_fused_steps_forms_its_new_sum():
    """A fused AdamW step on the CPU does not bump the version counters the kept value's key
    reads: the sum is kept on A, whose entries every optimizer step drops (svp.ops.kept)."""
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=1, embed_dim=16,
                              num_classes=3)
    peft = get_peft_model(model, make_config("lora", r=2, num_classes=3))
    lin = peft.base_model.layers[0].mixer.in_proj
    param = lin.parametrizations.weight[0]
    peft.requires_grad_(False)
    with torch.no_grad():
        before = lin.weight                              # kept while frozen
    params = [param.lora_A, param.lora_B]
    for p in params:
        p.requires_grad_(True)
    from svp.engine.optim import fused_available   # (torch < 2.4 has no fused AdamW on the CPU)
    opt = torch.optim.AdamW(params, lr=0.1, fused=fused_available("cpu") or None)
    peft(torch.randn(2, 3, 32, 32)).square().sum().backward()
    opt.step()
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        after = lin.weight
        want = lin.parametrizations.weight.original + param.scale * (param.lora_B @ param.lora_A)
    assert not torch.equal(after, before) and torch.equal(after, want)


def test_a_frozen_loras_sum_kept_under_autocast_is_the_float32_sum():
    """A sum first formed in a bfloat16-autocast forward (B A rounded to bfloat16) was reused by the
    float32 forwards after it (1.1e-3 off the weight): it is formed outside autocast."""
    torch.manual_seed(1)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=1, embed_dim=16,
                              num_classes=3)
    peft = get_peft_model(model, make_config("lora", r=2, num_classes=3)).eval()
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.add_(0.3 * torch.randn_like(p))
    peft.requires_grad_(False)
    lin = peft.base_model.layers[0].mixer.out_proj
    param = lin.parametrizations.weight[0]
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lin.weight
        want = lin.parametrizations.weight.original + param.scale * (param.lora_B @ param.lora_A)
        assert torch.equal(lin.weight, want)
