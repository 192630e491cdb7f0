"""Shared by the tests that hold a fused CPU path to the module path it replaces."""
import torch


def output_and_grads(model, x, seed=None):
    """model(x) and the gradients of sum(out^2) by parameter name (then cleared). ``seed``
    reseeds torch first, so random layers (DropPath) draw the same masks on every call."""
    if seed is not None:
        torch.manual_seed(seed)
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads
