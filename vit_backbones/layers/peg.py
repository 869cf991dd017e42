"""Positional encoding generator (CPVT's conditional position encoding).

A depthwise 3x3 convolution with bias over the token grid, added back to the grid tokens (stride 1). Its
zero padding tells tokens near the border where they are, so no table depends on the input size: any
H x W grid works as is, nothing is resampled. Prefix tokens (class token) pass through unchanged.
"""
from typing import Tuple

import torch
from torch import nn

from .format import token_map


class PositionalEncodingGenerator(nn.Module):
    """``grid + dwconv3x3(grid)`` on the grid part of a (B, P + H*W, C) token sequence.

    Args:
        dim: token channels.
        kernel_size: odd kernel of the depthwise convolution (3 in CPVT).

    ``forward(x, hw, num_prefix=None)``: ``num_prefix`` leading tokens are left alone (default: whatever
    precedes the ``hw[0] * hw[1]`` grid tokens).
    """

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f'kernel_size must be odd to keep the grid size, got {kernel_size}')
        self.proj = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim, bias=True)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int], num_prefix: int = None) -> torch.Tensor:
        b, n, c = x.shape
        h, w = hw
        p = n - h * w if num_prefix is None else num_prefix
        if p < 0 or n - p != h * w:
            raise ValueError(f'PEG expects {p} prefix + {h}x{w} grid tokens, got a sequence of {n}')
        grid = token_map(x[:, p:], (h, w))
        grid = (grid + self.proj(grid)).flatten(2).transpose(1, 2)
        return torch.cat([x[:, :p], grid], dim=1) if p else grid
