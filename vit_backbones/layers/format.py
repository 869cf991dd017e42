"""Conversions between NCHW feature maps, NHWC maps and token sequences (NLC)."""
from typing import Tuple

import torch

from .tracing import symbolic_tracing


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


def token_map(x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) grid tokens (a sequence, or a slice of one without its prefix tokens) -> the (B, C, H, W)
    map a convolution runs on: a channels-last view of the tokens, no copy, with the strides of a dense
    channels-last tensor; a contiguous copy under symbolic tracing.

    The layout matters for speed on CPU: ``x.transpose(1, 2).reshape(B, C, H, W)`` of one image gets a
    batch stride of C, and a slice of a batch a batch stride of (prefix + H*W) * C; PyTorch's CPU
    convolutions take a slow path for both (measured, 2 threads: a 3x3 depthwise conv on 512 x 200 x 304
    285 -> 44 ms in float32, 186 -> 21 ms in bfloat16, PVT v2's 8x8 reduction 521 -> 153 ms; a sliced
    batch of two 38 -> 4 ms). Under tracing a dense map keeps the convolution's layout choice from
    guarding on the batch size (batch > 1).
    """
    b, n, c = x.shape
    h, w = hw
    if n != h * w:
        raise ValueError(f'token count {n} does not match the grid {h}x{w}')
    if symbolic_tracing():
        return x.transpose(1, 2).reshape(b, c, h, w).contiguous()
    y = x.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (for one image the batch stride is then H*W*C)
    if b > 1 and y.stride(0) != h * w * c:
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2).contiguous()


def nchw_to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)
