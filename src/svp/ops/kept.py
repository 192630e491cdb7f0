"""Values derived from a tensor, kept on the tensor while its values stay the same.

A frozen backbone passes the same parameters to every call, and some of what the model derives
from them costs more than the call's own work at batch 1 (the mixers' A = -exp(A_log), the CPU
scan's tables of A). ``kept`` stores such a value as an attribute of the source tensor, keyed on
its version counter (every in-place change: optimizer steps, ``load_state_dict``, ``copy_``
under ``no_grad``), data pointer, shape, strides and dtype. A view is often made afresh on every call
(the model's squeeze of the conv's (d, 1, W) weight): its value is kept on the view's base, which
shares its version counter, keyed on the view's own layout. A replaced parameter is another object and
carries nothing; copies made by ``torch.save``/``copy.deepcopy`` carry the entry along with a
key that still describes them or that misses. Not seen: writes through ``t.data``, which bypass
the version counter (no code in svp does that; ``forget(model)`` after such an edit), and
torch's fused optimizers: ``torch.optim.AdamW
(fused=True)`` on the CPU (the engine's default, ``train.opt_fused``) steps its parameters without
bumping their version counters (torch 2.14). So a tensor that requires grad keeps nothing: a
trained parameter evaluated under ``no_grad`` between fused steps got the values kept at the
first evaluation (full fine-tuning's A, out_proj's halved weight), until 2026-12 (docs/
benchmarks.md, thirty-first round). And every optimizer step drops what its parameters kept
while frozen (a global step hook, ``_drop_kept_of_stepped``): one frozen again after fused steps
(``PeftModel.unload()`` after full fine-tuning) matched its old entry, until 2026-12-05. (The
hook exists from torch 2.0; a CPU fused step only from 2.4.) Inference tensors have no version
counter and keep nothing; what a normal tensor keeps is formed outside inference mode, also in an
inference-mode forward, so that a training step after it can save it for its backward.
"""
from __future__ import annotations

from typing import Callable, Hashable, TypeVar

import torch
import torch.optim.optimizer as _optimizer

from ..compat import recording

T = TypeVar("T")


def kept(t: torch.Tensor, tag: Hashable, make: Callable[[], T], extra: Hashable = None) -> T:
    """``make()``, computed once per value of ``t`` under ``tag`` (what else the value depends on),
    for a ``t`` that does not require grad (any other: ``make()`` on every call; see above).
    ``extra``: what else the value depends on that changes (another tensor's version and data
    pointer): compared like ``t``'s own key, one entry per ``tag`` replaced when it differs (in
    ``tag``, each value of it would be another entry, kept for ever)."""
    if t.is_inference() or t.requires_grad or recording():   # (a recording must hold how it is made)
        return make()
    key = (t._version, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, extra)
    owner = t if t._base is None else t._base
    store = getattr(owner, "_svp_kept", None)
    hit = None if store is None else store.get(tag)
    if hit is not None and hit[0] == key:
        return hit[1]
    # formed outside inference mode even inside it: a value kept in an inference-mode forward (the
    # conv's and x_proj's transposed weights) was an inference tensor, which autograd refused to
    # save in a training step after it ("Inference tensors cannot be saved for backward")
    with torch.inference_mode(False):
        value = make()
    if store is None:
        try:
            store = owner._svp_kept = {}
        except (AttributeError, RuntimeError):   # a tensor subclass without attributes: nothing kept
            return value
    store[tag] = (key, value)
    return value


def _drop_kept_of_stepped(optimizer, args, kwargs) -> None:
    """After any optimizer's step, its parameters drop what they kept while frozen: a fused step,
    which ``kept``'s key cannot see, left the entries of a tensor kept while frozen, trained, then
    frozen again (``PeftModel.unload()`` after full fine-tuning; a user's own freeze), and its old
    values were used (0.35 off on the mini Vim, 3.9 at dt_rank 50, QA 2026-12-05). Every step,
    whatever path the training forward took (dt_proj's transpose above rank 48 is kept by the
    scan, not by the mixer's forward)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            owner = p if p._base is None else p._base
            getattr(owner, "__dict__", {}).pop("_svp_kept", None)


def forget(obj) -> int:
    """Drop what the tensors of ``obj`` (a module, a tensor, or an iterable of either) keep: for
    weights changed in place through ``.data`` (``p.data.mul_(2)``), which ``kept``'s key cannot
    see; the next forward derives everything afresh. Returns how many tensors held entries."""
    if isinstance(obj, torch.nn.Module):
        tensors = list(obj.parameters()) + list(obj.buffers())
    elif isinstance(obj, torch.Tensor):
        tensors = [obj]
    else:
        tensors = [t for o in obj for t in ((list(o.parameters()) + list(o.buffers()))
                                            if isinstance(o, torch.nn.Module) else [o])]
    dropped = 0
    for t in tensors:
        owner = t if t._base is None else t._base
        if getattr(owner, "__dict__", {}).pop("_svp_kept", None) is not None:
            dropped += 1
    return dropped


_register_step_hook = getattr(_optimizer, "register_optimizer_step_post_hook", None)   # (torch >= 2.0)
if _register_step_hook is not None:
    _register_step_hook(_drop_kept_of_stepped)


def kept_unless_trained(t: torch.Tensor, tag: Hashable, fn: Callable[[torch.Tensor], T]) -> T:
    """``fn(t)`` for a parameter the model derives a value from (the mixers' A from A_log, the
    halved out_proj weight). While ``t`` does not require grad (a frozen backbone, a model loaded
    for inference) the value is kept on ``t`` (see ``kept``), formed without autograd and outside
    inference mode even inside it: a normal tensor serves both (an inference tensor could not be
    saved by autograd later, and keeps nothing). A ``t`` that requires grad gets ``fn(t)`` on
    every call (which autograd sees where gradients are on), also under ``no_grad``: a fused
    optimizer step leaves no trace ``kept`` could see."""
    if t.requires_grad and torch.is_grad_enabled():
        return fn(t)

    def make():
        with torch.inference_mode(False), torch.no_grad():
            return fn(t)
    return kept(t, tag, make)


def kept_cast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` cast to ``dtype`` as a product under autocast takes it: kept on a frozen weight
    (``kept_unless_trained``), where autocast casts a weight that needs no gradient again on every
    call; ``w`` itself where it already has that dtype."""
    return w if w.dtype == dtype else kept_unless_trained(w, dtype, lambda t: t.to(dtype))


_ZEROS = {}


def constant_zeros(shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """A tensor of zeros that its users only read (an absent bias, scale or pre-activation the
    fused kernels take; addmm's ignored input at beta = 0), made once per shape, dtype and device
    (default: the CPU): a fresh one is a fill, ~5 us in a forward where its code is out of the
    caches."""
    if recording():   # (an export's fake tensor kept here broke every later forward)
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    key = (tuple(shape), dtype, device)   # (None and the CPU's device: two equal copies, no conversion per call)
    t = _ZEROS.get(key)
    if t is None:
        with torch.inference_mode(False):   # (made in an inference-mode forward, kept for training too)
            t = _ZEROS[key] = torch.zeros(key[0], dtype=dtype, device=device)
    return t
