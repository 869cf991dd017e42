"""Convolutional projections for attention (CvT).

Queries, keys and values are each taken from the token grid through a depthwise convolution followed by
a BatchNorm (``conv`` + ``bn``), then through their own Linear layer (``proj_q``, ``proj_k``,
``proj_v``). A stride larger than 1 on the key/value convolutions shrinks the grid they attend over
(CvT uses stride 2, so keys and values have ceil(H/2) x ceil(W/2) tokens). Prefix tokens (CvT's class
token) skip the convolutions and are prepended unchanged to each projected sequence before the Linear
layers.
"""
from typing import Optional, Tuple

import torch
from torch import nn

from .attention import AttentionBase
from .attention_kernel import scaled_dot_product
from .format import token_map
from .linear import inference_linear


class DepthwiseConvBN(nn.Module):
    """Depthwise ``k x k`` convolution (no bias) + BatchNorm2d on an NCHW map; returns (B, H'*W', C) tokens."""

    def __init__(self, dim: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride, padding, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).flatten(2).transpose(1, 2)


class ConvProjectionAttention(AttentionBase):
    """Multi-head attention whose q/k/v come from depthwise-conv + BN projections of the token grid.

    Args:
        dim: channels (input and output).
        num_heads: attention heads (``dim`` must be divisible by it).
        qkv_bias: biases of ``proj_q``, ``proj_k``, ``proj_v``.
        kernel_size: kernel of the depthwise projections.
        stride_q, stride_kv: strides of the query / key-value projections.
        padding_q, padding_kv: their paddings.
        scale: score scale. Default ``dim ** -0.5``, over the whole embedding width and not the head
            width, as the CvT paper's code does (and HF transformers copies).
        attn_drop, proj_drop: dropout on the attention probabilities / after ``proj``.

    ``forward(x, hw, num_prefix_tokens=0)``: ``x`` is (B, P + H*W, C) with P prefix tokens in front of
    the raster-ordered grid tokens; returns (B, P + Hq*Wq, C) (Hq = H for stride_q 1).
    """

    takes_bias = False

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 qkv_bias: bool = True,
                 kernel_size: int = 3,
                 stride_q: int = 1,
                 stride_kv: int = 2,
                 padding_q: int = 1,
                 padding_kv: int = 1,
                 scale: Optional[float] = None,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__(dim, num_heads, attn_drop=attn_drop, fused_qkv=False)
        self.scale = dim**-0.5 if scale is None else scale
        self.conv_proj_q = DepthwiseConvBN(dim, kernel_size, stride_q, padding_q)
        self.conv_proj_k = DepthwiseConvBN(dim, kernel_size, stride_kv, padding_kv)
        self.conv_proj_v = DepthwiseConvBN(dim, kernel_size, stride_kv, padding_kv)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self._build_output(dim, proj_drop)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        b, n, c = x.shape
        h, w = hw
        if n != num_prefix_tokens + h * w:
            raise ValueError(f'expected {num_prefix_tokens} prefix tokens + a {h}x{w} grid, got {n} tokens')
        prefix, grid = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        grid = token_map(grid, (h, w))
        q, k, v = self.conv_proj_q(grid), self.conv_proj_k(grid), self.conv_proj_v(grid)
        if num_prefix_tokens:
            q, k, v = (torch.cat([prefix, t], dim=1) for t in (q, k, v))
        q, k, v = (self.to_heads(inference_linear(t, lin))
                   for t, lin in ((q, self.proj_q), (k, self.proj_k), (v, self.proj_v)))
        return self.output(scaled_dot_product(q, k, v, None, self.dropout_p, self.scale))
