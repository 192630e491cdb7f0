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
