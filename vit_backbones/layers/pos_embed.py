"""Absolute position embeddings resampled to the runtime token grid."""
from typing import Tuple

import torch
import torch.nn.functional as F

from .tracing import refuse_static_trace, symbolic_tracing


def resample_abs_pos_embed(pos_embed: torch.Tensor,
                           new_hw: Tuple[int, int],
                           old_hw: Tuple[int, int] = None,
                           num_prefix_tokens: int = 0,
                           mode: str = 'bicubic') -> torch.Tensor:
    """Resample a (1, prefix + h*w, C) position embedding to a ``new_hw`` grid.

    Prefix tokens (class, distillation) are kept apart and unchanged. The grid part is interpolated
    in float32 (``align_corners=False``; bicubic unless ``mode`` says otherwise, e.g. bilinear for
    PVT v1), then cast back. ``old_hw`` defaults to a square grid. ``new_hw == old_hw`` returns the
    embedding itself in eager mode; under symbolic tracing the grid is always interpolated, which at the
    stored size is the identity (bicubic and bilinear weights are exactly 0 and 1 at scale 1).
    """
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_hw is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f'position embedding with {n} grid tokens is not square; pass old_hw')
        old_hw = (side, side)
    if old_hw[0] * old_hw[1] != n:
        raise ValueError(f'position embedding has {n} grid tokens, not {old_hw[0]}x{old_hw[1]}')
    if symbolic_tracing():  # the grid may be symbolic: always resample (the identity at the stored size)
        new_hw = tuple(new_hw)
    else:
        refuse_static_trace('whether and how the position embedding is resampled')
        new_hw = (int(new_hw[0]), int(new_hw[1]))
        if tuple(old_hw) == new_hw:
            return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    c = grid.shape[-1]
    grid = grid.reshape(1, old_hw[0], old_hw[1], c).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_hw, mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], c).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
