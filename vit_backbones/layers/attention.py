"""Multi-head attention on ``torch.nn.functional.scaled_dot_product_attention``.

``scaled_dot_product`` is the one attention kernel of the package. It takes an optional additive
``bias`` (relative-position bias, shift mask, attention biases) that broadcasts against the
(B, heads, Nq, Nk) score matrix, and falls back to an exact matmul + softmax when the caller needs the
attention matrix itself (re-attention, talking heads, visualisation).
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .tracing import tracing


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       dropout_p: float = 0., scale: Optional[float] = None, return_attn: bool = False):
    """softmax(q k^T * scale + bias) v with batched matmuls, materialising the attention matrix.

    The bias is written once into the score buffer and q k^T is accumulated onto it in place
    (``baddbmm_``), so adding the bias costs no extra pass; the softmax is the plain one.
    """
    *lead, n, d = q.shape
    m = k.shape[-2]
    scale = d**-0.5 if scale is None else scale
    dtype = torch.get_autocast_dtype('cpu') if (q.device.type == 'cpu' and torch.is_autocast_enabled('cpu')) else q.dtype
    if q.device.type == 'cuda' and torch.is_autocast_enabled('cuda'):
        dtype = torch.get_autocast_dtype('cuda')
    q3, k3, v3 = (t.to(dtype).reshape(-1, t.shape[-2], t.shape[-1]) for t in (q, k, v))
    if bias is None:
        scores = torch.bmm(q3, k3.transpose(1, 2)).mul_(scale)
    else:
        scores = torch.empty(q3.shape[0], n, m, dtype=dtype, device=q.device)
        scores.view(*lead, n, m).copy_(bias.expand(*lead, n, m))
        scores = scores.baddbmm_(q3, k3.transpose(1, 2), alpha=scale)
    attn = scores.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, dropout_p)
    out = torch.bmm(attn, v3).view(*lead, n, v.shape[-1])
    if return_attn:
        return out, attn.view(*lead, n, m)
    return out


def scaled_dot_product(q: torch.Tensor,
                       k: torch.Tensor,
                       v: torch.Tensor,
                       bias: Optional[torch.Tensor] = None,
                       dropout_p: float = 0.,
                       scale: Optional[float] = None,
                       return_attn: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """softmax(q k^T * scale + bias) v.

    This is ``F.scaled_dot_product_attention`` (the fused flash kernel, reading strided q/k/v in place,
    with a fused backward) unless the bias itself needs a gradient (a learned relative-position bias in
    training) or the attention matrix is wanted: then it is :func:`explicit_attention`. PyTorch's fused
    CPU kernels give no gradient for an additive bias, and its fallback makes q, k, v contiguous and runs
    a NaN-guarded softmax, slower than the explicit path. (Measured on this project's CPU, one thread,
    forward+backward: without a bias or with a constant mask the fused kernel is 2.0-2.2x faster than the
    explicit path at 1024 tokens and 1.1-1.9x at 49; with a learned bias the two are within 10%.)

    Args:
        q, k, v: (..., N, d) tensors (usually (B, heads, N, d)).
        bias: additive term broadcastable to (..., Nq, Nk), or None.
        dropout_p: attention dropout probability (pass 0 in eval).
        scale: score scale; defaults to d ** -0.5.
        return_attn: also return the attention probabilities.
    """
    if return_attn or (bias is not None and bias.requires_grad and torch.is_grad_enabled()):
        return explicit_attention(q, k, v, bias, dropout_p, scale, return_attn)
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


class _SplitHeads(torch.autograd.Function):
    """(B, N, 3*C) fused projection -> contiguous q, k, v of shape (B, heads, N, d) in one copy; the
    backward writes the three gradients straight into the (B, N, 3*C) layout (one pass, no stack)."""

    @staticmethod
    def forward(ctx, qkv, heads):
        b, n, c3 = qkv.shape
        d = c3 // (3 * heads)
        ctx.dims = (b, n, heads, d)
        out = qkv.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4).contiguous()
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, gq, gk, gv):
        b, n, heads, d = ctx.dims
        g = gq.new_empty(b, n, 3, heads, d) if gq is not None else gk.new_empty(b, n, 3, heads, d)
        for i, gi in enumerate((gq, gk, gv)):
            if gi is None:
                g[:, :, i].zero_()
            else:
                g[:, :, i].copy_(gi.transpose(1, 2))
        return g.view(b, n, 3 * heads * d), None


def split_heads(qkv: torch.Tensor, heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused (B, N, 3*C) projection -> q, k, v each (B, heads, N, d).

    Without gradients they are strided views (the fused SDPA kernel reads them in place); with
    gradients they are made contiguous once, for the batched matmuls of :func:`explicit_attention`.
    """
    b, n, c3 = qkv.shape
    if torch.is_grad_enabled() and qkv.requires_grad and not tracing():  # traced: plain views (plain autograd)
        return _SplitHeads.apply(qkv, heads)
    return qkv.view(b, n, 3, heads, c3 // (3 * heads)).transpose(1, 3).unbind(2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (``qkv``) and an output projection (``proj``).

    ``forward(x, bias)`` takes (B, N, C) tokens and an optional additive bias broadcastable to
    (B, heads, N, N).
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        x = scaled_dot_product(q, k, v, bias, self.attn_drop if self.training else 0., self.scale)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))

    def forward_windows(self, x: torch.Tensor, plan, rel_bias: Optional[torch.Tensor] = None,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The same attention inside the windows of a ``WindowPlan``, for raster tokens (B, H*W, C): see
        :func:`~vit_backbones.layers.window_attention.window_attention` (projections on real tokens only)."""
        from .window_attention import window_attention  # that module builds on this one
        out = window_attention(self.qkv(x), plan, self.num_heads, self.scale, rel_bias, mask, self.qkv.bias,
                               self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(out))
