"""Stochastic depth."""
from typing import List, Sequence

import torch
from torch import nn


def _sample_mask(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    keep = 1. - drop_prob
    return x.new_empty((x.shape[0], ) + (1, ) * (x.ndim - 1)).bernoulli_(keep).div_(keep)


def drop_path(x: torch.Tensor, drop_prob: float = 0., training: bool = False) -> torch.Tensor:
    """Zero whole samples of a residual branch with probability ``drop_prob``; rescale the rest."""
    if drop_prob == 0. or not training:
        return x
    return x * _sample_mask(x, drop_prob)


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (per sample)."""

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def add(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """``x + self(branch)`` in one pass (``addcmul``); same random draw as ``forward``."""
        if self.drop_prob == 0. or not self.training:
            return x + branch
        return torch.addcmul(x, branch, _sample_mask(branch, self.drop_prob))

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob:.3f}'


def drop_path_schedule(drop_path_rate: float, depths: Sequence[int]) -> List[List[float]]:
    """Linearly increasing drop-path rates over all blocks, split per stage.

    Returns one list per stage, e.g. ``depths=(2, 2)`` and rate 0.3 gives ``[[0, .1], [.2, .3]]``.
    """
    total = sum(depths)
    # plain Python, so models can be built on the meta device
    rates = [drop_path_rate * i / (total - 1) for i in range(total)] if total > 1 else [drop_path_rate] * total
    out, start = [], 0
    for d in depths:
        out.append(rates[start:start + d])
        start += d
    return out


def make_drop_path(rate: float) -> DropPath:
    """A :class:`DropPath` (rate 0 is a no-op); use ``.add(x, branch)`` for the residual."""
    return DropPath(rate)
