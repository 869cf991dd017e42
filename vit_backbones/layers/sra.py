"""Spatial-reduction attention (PVT v1 and v2).

Queries come from every token; keys and values from a reduced map: a strided ``sr`` convolution
(kernel = stride = ``sr_ratio``) followed by a LayerNorm, or, in the linear variant of PVT v2
(``linear=True``, the b2-li model), an adaptive average pool to ``pool_size`` x ``pool_size``, a 1x1
``sr`` convolution, a LayerNorm and a GELU. Queries and keys/values have separate projections (``q``
and ``kv``, the layout of the official code, timm and the classification checkpoints).
"""
from typing import Optional, Tuple

import torch
from torch import nn

from .attention import AttentionBase
from .attention_kernel import scaled_dot_product
from .format import token_map
from .linear import inference_linear


class SpatialReductionAttention(AttentionBase):
    """Multi-head attention of (B, N, C) tokens on an (H, W) grid against a spatially reduced copy.

    Args:
        dim: channels.
        num_heads: attention heads (``dim`` must be divisible by it).
        sr_ratio: reduction of the key/value map (1: keys and values are the tokens themselves).
        linear: PVT v2 linear SRA (pool to ``pool_size``; ``sr_ratio`` is then ignored).
        pool_size: output side of the adaptive pool of the linear variant.
        qkv_bias: biases of ``q`` and ``kv``.
        qk_scale: score scale (default ``head_dim ** -0.5``).
        attn_drop, proj_drop: dropout on the attention probabilities / after ``proj``.
        norm_eps: epsilon of the reduction LayerNorm (1e-5 in the official code).

    ``forward(x, hw)``: ``x`` holds the H*W grid tokens in raster order; extra tokens in front of them
    (PVT v1's class token in its last stage) are allowed only when ``sr_ratio == 1`` and not linear.
    """

    takes_bias = False

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, linear: bool = False, pool_size: int = 7,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 norm_eps: float = 1e-5):
        super().__init__(dim, num_heads, qk_scale, attn_drop, fused_qkv=False)
        self.sr_ratio = int(sr_ratio)
        self.linear = linear
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self._build_output(dim, proj_drop)
        self.pool = nn.AdaptiveAvgPool2d(pool_size) if linear else None
        if linear:
            self.sr = nn.Conv2d(dim, dim, kernel_size=1)
        elif self.sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=self.sr_ratio, stride=self.sr_ratio)
        else:
            self.sr = None
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if self.sr is not None else None
        self.act = nn.GELU() if linear else None

    @property
    def reduces(self) -> bool:
        return self.sr is not None

    def _reduced(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """(B, H*W, C) tokens -> (B, M, C) key/value source tokens."""
        b, n, c = x.shape
        if self.sr is None:
            return x
        if n != hw[0] * hw[1]:
            raise ValueError(f'spatial reduction needs exactly the {hw[0]}x{hw[1]} grid tokens, got {n}')
        m = token_map(x, hw)
        if self.pool is not None:
            m = self.pool(m)
        m = self.norm(self.sr(m).flatten(2).transpose(1, 2))
        return self.act(m) if self.act is not None else m

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        q = self.to_heads(inference_linear(x, self.q))
        kv = inference_linear(self._reduced(x, hw), self.kv)
        k, v = kv.view(x.shape[0], kv.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.output(scaled_dot_product(q, k, v, None, self.dropout_p, self.scale))
