"""Locally-enhanced feed-forward (CeiT's LeFF).

The feed-forward of a transformer block run on the token grid, with a depthwise convolution between
the two point-wise layers, each followed by BatchNorm:

    grid -> 1x1 conv (C -> hidden) -> BN -> act -> depthwise kxk conv -> BN -> act
         -> 1x1 conv (hidden -> C) -> BN                (no activation after the last BN)

Prefix tokens (the class token) skip it: they are returned as they came in, so in the block's residual
``x + leff(norm2(x))`` the class token receives its normalised value (as the official code does).
Unlike the official code, the grid size is passed in, so non-square grids work.
"""
from typing import Optional, Tuple, Type

import torch
from torch import nn

from .format import token_map
from .linear import conv_bn_act


class LocallyEnhancedFeedForward(nn.Module):
    """LeFF on a (B, P + H*W, C) token sequence; ``forward(x, hw)``.

    Args:
        dim: token channels (input and output).
        hidden_dim: channels between the point-wise layers (``mlp_ratio * dim``).
        kernel_size: depthwise kernel (3 in CeiT).
        act_layer: activation after the first two BatchNorms (GELU).
        with_bn: BatchNorm after each convolution (CeiT's default).
    """

    def __init__(self,
                 dim: int,
                 hidden_dim: Optional[int] = None,
                 kernel_size: int = 3,
                 act_layer: Type[nn.Module] = nn.GELU,
                 with_bn: bool = True):
        super().__init__()
        hidden_dim = hidden_dim or dim
        norm = (lambda c: nn.BatchNorm2d(c)) if with_bn else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(dim, hidden_dim, 1)
        self.bn1 = norm(hidden_dim)
        self.conv2 = nn.Conv2d(hidden_dim, hidden_dim, kernel_size, 1, kernel_size // 2, groups=hidden_dim)
        self.bn2 = norm(hidden_dim)
        self.conv3 = nn.Conv2d(hidden_dim, dim, 1)
        self.bn3 = norm(dim)
        self.act = act_layer()

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        if hw is None:
            raise ValueError('LeFF needs the token grid size hw=(H, W)')
        b, n, c = x.shape
        h, w = hw
        p = n - h * w
        if p < 0:
            raise ValueError(f'LeFF expects a {h}x{w} grid (plus prefix tokens), got a sequence of {n}')
        y = token_map(x[:, p:], (h, w))
        y = conv_bn_act(y, self.conv1, self.bn1, self.act)  # eval-mode BatchNorms folded into the convolutions
        y = conv_bn_act(y, self.conv2, self.bn2, self.act)
        y = conv_bn_act(y, self.conv3, self.bn3).flatten(2).transpose(1, 2)
        return torch.cat([x[:, :p], y], dim=1) if p else y
