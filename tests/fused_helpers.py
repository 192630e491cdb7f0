"""Shared by the tests that hold a fused path (numba on the CPU, Triton) to the module path it
replaces."""
import torch
import torch.nn.functional as F


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


def recompiled(module, name):
    """``module.name`` compiled anew with every numba function of ``module`` it calls (fresh
    dispatchers over a copy of the module's globals, no disk cache): the module's own
    dispatchers and numba's cache stay as they are."""
    import types as pytypes
    import numba
    from numba.core.registry import CPUDispatcher
    g = dict(vars(module))
    for key, obj in vars(module).items():
        if isinstance(obj, CPUDispatcher) and obj.py_func.__module__ == module.__name__:
            f = obj.py_func
            opts = {k: v for k, v in obj.targetoptions.items() if k != "nopython"}
            g[key] = numba.njit(**opts, cache=False)(
                pytypes.FunctionType(f.__code__, g, f.__name__, f.__defaults__, f.__closure__))
    return g[name]


def prompt_step_reference(h, a1, s1, a2, s2, skip):
    """SVP's prompt step written out: h + s1 * silu(a1) + s2 * silu(a2) on every token but
    ``skip`` (which keeps h's row); either (a, s) pair may be None."""
    p = 0
    if a1 is not None:
        p = p + s1 * F.silu(a1)
    if a2 is not None:
        p = p + s2 * F.silu(a2)
    out = h + p
    if 0 <= skip < h.shape[1]:
        out = torch.cat([out[:, :skip], h[:, skip:skip + 1], out[:, skip + 1:]], dim=1)
    return out
