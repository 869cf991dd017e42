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
