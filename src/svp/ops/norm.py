"""RMSNorm with the fused residual add of the Mamba/Vim blocks, pure PyTorch."""
from __future__ import annotations

import torch
import torch.nn as nn


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None, eps: float = 1e-5, prenorm: bool = False,
                 residual_in_fp32: bool = False):
    """Return norm(x + residual) (and the new residual when ``prenorm``).

    Matches mamba_ssm's ``rms_norm_fn``: the sum is formed first (in float32 when
    ``residual_in_fp32``), normalised in float32, and cast back to x's dtype.
    """
    dtype = x.dtype
    ct = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64 (gradcheck)
    if residual is not None:
        x = (x.to(ct) + residual.to(ct)) if residual_in_fp32 else (x + residual)
    new_residual = x.to(ct) if residual_in_fp32 else x
    xf = x.to(ct)
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(ct)
    if bias is not None:
        out = out + bias.to(ct)
    out = out.to(dtype)
    return (out, new_residual) if prenorm else out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return rms_norm_ref(x, self.weight, None, residual, self.eps, prenorm, residual_in_fp32)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"
