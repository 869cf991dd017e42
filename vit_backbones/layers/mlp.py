"""Feed-forward blocks."""
from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .format import token_map
from .linear import (QUICK_GELU_SLOPE, _compute_dtype, fuses_gelu, inference_conv, inference_linear,
                     inference_quick_gelu_mlp, linear_nt, matmul_nn, matmul_tn)
from .tracing import tracing


class _LinearGeluLinear(torch.autograd.Function):
    """fc2(gelu(fc1(x))) for training, with the GELU gradient computed in place of the fc1-output
    gradient (one hidden-size buffer fewer per block than autograd's chain; the largest buffers of a
    high-resolution backbone). The module chain's operations (in float32 on CPU its matmuls run oneDNN as
    :func:`~vit_backbones.layers.linear.inference_linear` does, so they agree to rounding; in float64 the
    values and gradients are identical); under autocast everything runs in the autocast dtype, as autocast's own
    Linear would."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, approximate):
        dtype = _compute_dtype(x)
        lead = x.shape[:-1]
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            w1, w2 = w1.to(dtype), w2.to(dtype)
            h = linear_nt(x2, w1, None if b1 is None else b1.to(dtype))
            a = F.gelu(h, approximate=approximate)
            y = linear_nt(a, w2, None if b2 is None else b2.to(dtype))
        ctx.save_for_backward(x2, h, a, w1, w2)
        ctx.approximate, ctx.x_shape, ctx.x_dtype = approximate, x.shape, x.dtype
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, h, a, w1, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        gy = gy.reshape(-1, gy.shape[-1]).to(h.dtype)
        gw2 = matmul_tn(gy, a) if need[3] else None
        gb2 = gy.sum(0) if need[4] else None
        gh = matmul_nn(gy, w2)
        gh = torch.ops.aten.gelu_backward.grad_input(gh, h, approximate=ctx.approximate, grad_input=gh)
        gw1 = matmul_tn(gh, x2) if need[1] else None
        gb1 = gh.sum(0) if need[2] else None
        gx = matmul_nn(gh, w1).view(ctx.x_shape).to(ctx.x_dtype) if need[0] else None
        return gx, gw1, gb1, gw2, gb2, None


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU, ``x * sigmoid(1.702 x)`` (used by CLIP and the official CvT)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_SLOPE * x)


class Mlp(nn.Module):
    """fc1 -> act -> (optional depthwise 3x3 conv on the token grid) -> drop -> fc2 -> drop.

    Works on (..., C) tensors. With ``dwconv=True`` (PVT v2, CeiT-style local enhancement) the input must be
    a token sequence (B, H*W, C) and ``hw`` must be given.
    """

    def __init__(self,
                 in_features: int,
                 hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None,
                 act_layer: Type[nn.Module] = nn.GELU,
                 drop: float = 0.,
                 bias: bool = True,
                 dwconv: bool = False):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, 1, 1, groups=hidden_features) if dwconv else None
        self.act = act_layer()
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        if (self.dwconv is None and type(self.act) is nn.GELU and isinstance(self.drop, nn.Identity)
                and torch.is_grad_enabled() and not tracing()):  # traced: the module chain (plain autograd)
            return _LinearGeluLinear.apply(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                           self.act.approximate)
        if self.dwconv is None and type(self.act) is QuickGELU and isinstance(self.drop, nn.Identity):
            y = inference_quick_gelu_mlp(x, self.fc1, self.fc2)  # (CvT) QuickGELU inside fc1, inference on CPU
            if y is not None:
                return y
        fused = fuses_gelu(self.act)  # GELU applied inside fc1 or the dwconv (inference on CPU)
        if self.dwconv is None:
            x = inference_linear(x, self.fc1, gelu=fused)
        else:
            if hw is None:
                raise ValueError('Mlp with dwconv needs the token grid size hw=(H, W)')
            x = inference_conv(token_map(inference_linear(x, self.fc1), hw), self.dwconv, gelu=fused)
            x = x.flatten(2).transpose(1, 2)
        x = self.drop(x if fused else self.act(x))
        return self.drop(inference_linear(x, self.fc2))
