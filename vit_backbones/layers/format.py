"""Conversions between NCHW feature maps, NHWC maps and token sequences (NLC)."""
from typing import Tuple

import torch


def nchw_to_nlc(x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(B, C, H, W) -> ((B, H*W, C), (H, W))."""
    b, c, h, w = x.shape
    return x.flatten(2).transpose(1, 2), (h, w)


def nlc_to_nchw(x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W), contiguous."""
    b, n, c = x.shape
    h, w = hw
    if n != h * w:
        raise ValueError(f'token count {n} does not match the grid {h}x{w}')
    return x.transpose(1, 2).reshape(b, c, h, w).contiguous()


def nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2).contiguous()


def nchw_to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)
