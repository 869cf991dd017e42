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


def scaled_dot_product(q: torch.Tensor,
                       k: torch.Tensor,
                       v: torch.Tensor,
                       bias: Optional[torch.Tensor] = None,
                       dropout_p: float = 0.,
                       scale: Optional[float] = None,
                       return_attn: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """softmax(q k^T * scale + bias) v.

    Args:
        q, k, v: (..., N, d) tensors (usually (B, heads, N, d)).
        bias: additive term broadcastable to (..., Nq, Nk), or None.
        dropout_p: attention dropout probability (pass 0 in eval).
        scale: score scale; defaults to d ** -0.5.
        return_attn: also return the attention probabilities (exact matmul path).
    """
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    if not return_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    scale = q.shape[-1]**-0.5 if scale is None else scale
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    out = F.dropout(attn, dropout_p) @ v if dropout_p > 0 else attn @ v
    return out, attn


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

    def split_heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., N, C) -> q, k, v each (..., heads, N, d)."""
        *lead, n, _ = x.shape
        qkv = self.qkv(x).reshape(*lead, n, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(-3, *range(len(lead)), -2, -4, -1)
        return qkv.unbind(0)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.split_heads(x)
        x = scaled_dot_product(q, k, v, bias, self.attn_drop if self.training else 0., self.scale)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))
