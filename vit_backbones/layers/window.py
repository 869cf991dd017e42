"""Window partitioning for (shifted-)window attention on NHWC maps.

The maps are padded at the bottom/right to a multiple of the window *before* any cyclic shift, and
the shift mask is built on the padded size: the convention of the official Swin detection and
segmentation code, mmdet and HF transformers. Masks are cached per (padded size, window, shift,
device, dtype), so a forward pass builds each mask once, not once per block.
"""
from functools import lru_cache
from typing import Tuple

import torch
import torch.nn.functional as F


def pad_to_window(x: torch.Tensor, window: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Zero-pad an NHWC map at the bottom/right so H and W are multiples of ``window``.

    Returns the padded map and the padding ``(pad_h, pad_w)``.
    """
    _, h, w, _ = x.shape
    pad_h = (window[0] - h % window[0]) % window[0]
    pad_w = (window[1] - w % window[1]) % window[1]
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x, (pad_h, pad_w)


def window_partition(x: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of the window -> (B, num_windows, wh*ww, C)."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(windows: torch.Tensor, window: Tuple[int, int], hw: Tuple[int, int]) -> torch.Tensor:
    """(B, num_windows, wh*ww, C) -> (B, H, W, C); inverse of :func:`window_partition`."""
    b, _, _, c = windows.shape
    h, w = hw
    wh, ww = window
    x = windows.view(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


@lru_cache(maxsize=64)
def shifted_window_mask(hw: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int],
                        device: torch.device, dtype: torch.dtype, fill: float = -100.) -> torch.Tensor:
    """Additive mask (num_windows, N, N) for attention over cyclically shifted windows.

    A padded map of size ``hw`` is split into three bands per axis: ``[0, H-wh)``, ``[H-wh, H-sh)`` and
    ``[H-sh, H)``. After the shift, tokens of one window that came from different bands must not attend
    to each other: such pairs get ``fill`` (-100, as the reference implementations use), others 0.
    The result is cached; do not modify it in place.
    """
    h, w = hw
    region = torch.zeros(1, h, w, 1, device=device)
    ids = 0
    for hs in (slice(0, h - window[0]), slice(h - window[0], h - shift[0]), slice(h - shift[0], h)):
        for ws in (slice(0, w - window[1]), slice(w - window[1], w - shift[1]), slice(w - shift[1], w)):
            region[:, hs, ws, :] = ids
            ids += 1
    win = window_partition(region, window).squeeze(0).squeeze(-1)  # (nW, N)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask != 0, fill)


class WindowPlan:
    """Index maps between a raster token sequence (B, H*W, C) and (shifted, padded) windows.

    ``gather`` holds, for every window slot, the raster index of its token (padding slots point to
    token 0 and are listed in ``pad_slots``); ``scatter`` holds, for every raster token, its window
    slot. Padding, cyclic shift and partition (and their inverses) thereby become one gather each way,
    and the backward of each is the other gather.
    """

    def __init__(self, hw: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int], device: torch.device):
        h, w = hw
        wh, ww = window
        hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
        self.hw, self.window, self.padded_hw = (h, w), (wh, ww), (hp, wp)
        self.num_windows = (hp // wh) * (wp // ww)
        # window slot -> coordinates in the shifted padded map -> source coordinates (the shift is a roll by -s)
        r = torch.arange(hp).view(hp // wh, wh)
        c = torch.arange(wp).view(wp // ww, ww)
        rr = r[:, None, :, None].expand(hp // wh, wp // ww, wh, ww).reshape(-1)
        cc = c[None, :, None, :].expand(hp // wh, wp // ww, wh, ww).reshape(-1)
        src_r, src_c = (rr + shift[0]) % hp, (cc + shift[1]) % wp
        valid = (src_r < h) & (src_c < w)
        gather = torch.where(valid, src_r * w + src_c, torch.zeros_like(src_r))
        scatter = torch.empty(h * w, dtype=torch.long)
        scatter[gather[valid]] = torch.nonzero(valid).squeeze(1)
        self.gather = gather.to(device)
        self.scatter = scatter.to(device)
        self.pad_slots = torch.nonzero(~valid).squeeze(1).to(device) if not valid.all() else None


@lru_cache(maxsize=64)
def window_plan(hw: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int], device: torch.device) -> WindowPlan:
    """Cached :class:`WindowPlan` for a map size, window and shift."""
    return WindowPlan(hw, window, shift, device)


def _take(x: torch.Tensor, index: torch.Tensor, zero_slots) -> torch.Tensor:
    out = x.index_select(1, index)
    if zero_slots is not None:
        out.index_fill_(1, zero_slots, 0)
    return out


class _TokenGather(torch.autograd.Function):
    """out = x[:, index] with ``zero_slots`` of out set to 0. Every source token lands in exactly one
    non-zero slot, so the gradient is again a gather (``back_index``, zeroing ``back_zero_slots``)
    rather than a scatter-add."""

    @staticmethod
    def forward(ctx, x, index, zero_slots, back_index, back_zero_slots):
        ctx.back_index, ctx.back_zero_slots = back_index, back_zero_slots
        return _take(x, index, zero_slots)

    @staticmethod
    def backward(ctx, grad):
        return _take(grad, ctx.back_index, ctx.back_zero_slots), None, None, None, None


def tokens_to_windows(x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """(B, H*W, C) raster tokens -> (B * num_windows, N, C) windows (zero tokens in the padding)."""
    b, _, c = x.shape
    out = _TokenGather.apply(x, plan.gather, plan.pad_slots, plan.scatter, None)
    return out.view(b * plan.num_windows, plan.window[0] * plan.window[1], c)


def windows_to_tokens(windows: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """(B * num_windows, N, C) windows -> (B, H*W, C) raster tokens (padding dropped, shift undone)."""
    c = windows.shape[-1]
    b = windows.shape[0] // plan.num_windows
    y = windows.reshape(b, -1, c)
    return _TokenGather.apply(y, plan.scatter, None, plan.gather, plan.pad_slots)
