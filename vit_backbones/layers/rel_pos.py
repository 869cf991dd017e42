"""Relative position bias tables (Swin, Shuffle Transformer) and their resizing."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .tracing import tracing


def relative_position_index(window: Tuple[int, int], table_window: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Index (N, N) into a (2*th-1)*(2*tw-1) table for every token pair of a ``window``-sized window.

    ``table_window`` (default: ``window``) is the window the table was built for; a smaller runtime
    window indexes the central part of the table, so relative offsets keep their learned biases.
    """
    th, tw = table_window or window
    if window[0] > th or window[1] > tw:
        raise ValueError(f'window {window} is larger than the bias table window {(th, tw)}')
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing='ij')).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N, N, 2
    return (rel[..., 0] + th - 1) * (2 * tw - 1) + (rel[..., 1] + tw - 1)


def resize_rel_pos_table(table: torch.Tensor, src_window: Tuple[int, int], dst_window: Tuple[int, int],
                         mode: str = 'bicubic') -> torch.Tensor:
    """Resample a (2*sh-1)*(2*sw-1) x heads table to a (2*dh-1)*(2*dw-1) x heads table (float32 math)."""
    src = (2 * src_window[0] - 1, 2 * src_window[1] - 1)
    dst = (2 * dst_window[0] - 1, 2 * dst_window[1] - 1)
    if table.shape[0] != src[0] * src[1]:
        raise ValueError(f'table has {table.shape[0]} rows, expected {src[0] * src[1]} for window {src_window}')
    if src == dst:
        return table
    heads = table.shape[1]
    grid = table.float().t().reshape(1, heads, *src)
    grid = F.interpolate(grid, size=dst, mode=mode, align_corners=False)
    return grid.reshape(heads, -1).t().contiguous().to(table.dtype)


def window_from_table_len(length: int) -> Tuple[int, int]:
    """Square window whose table has ``length`` rows ((2w-1)^2 = length)."""
    side = int(round(length**0.5))
    if side * side != length or side % 2 == 0:
        raise ValueError(f'a relative position table of {length} rows does not belong to a square window')
    return ((side + 1) // 2, ) * 2


class RelativePositionBias(nn.Module):
    """Learned per-head bias for every relative offset inside a window.

    ``forward(window)`` returns (heads, N, N) for a runtime window no larger than the table's.
    """

    def __init__(self, num_heads: int, window: Tuple[int, int]):
        super().__init__()
        self.window = tuple(window)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=.02)
        self.register_buffer('relative_position_index', relative_position_index(self.window), persistent=False)

    def forward(self, window: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        window = self.window if window is None else tuple(window)
        table = self.relative_position_bias_table
        constant = (not tracing() and table.device.type != 'meta'  # meta: no storage, nothing to keep
                    and not (torch.is_grad_enabled() and table.requires_grad))
        if constant:  # eval / frozen: the same bias until the table changes (in place: _version; moved: data_ptr)
            key = (window, table.device, table.dtype, table._version, table.data_ptr())
            cached = self.__dict__.get('_constant_bias')
            if cached is not None and cached[0] == key:
                return cached[1]
        index = self.relative_position_index if window == self.window else relative_position_index(
            window, self.window).to(table.device)
        n = window[0] * window[1]
        bias = table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)
        if constant:
            bias = bias.detach()
            bias._vb_constant = True  # window_attention may cache what it derives from it (see there)
            self.__dict__['_constant_bias'] = (key, bias)
        return bias

    def resize_state(self, table: torch.Tensor) -> torch.Tensor:
        """Resize a checkpoint's table (any square window) to this module's window."""
        if table.shape == self.relative_position_bias_table.shape:
            return table
        return resize_rel_pos_table(table, window_from_table_len(table.shape[0]), self.window)
