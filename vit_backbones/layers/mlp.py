"""Feed-forward blocks."""
from typing import Optional, Tuple, Type

import torch
from torch import nn


class Mlp(nn.Module):
    """fc1 -> act -> (optional depthwise 3x3 conv on the token grid) -> drop -> fc2 -> drop.

    Works on (..., C) tensors. With ``dwconv=True`` (PVT v2, CeiT-style local enhancement) the input must be
    a token sequence (B, H*W, C) and ``hw`` must be given.
    """

    def __init__(self,
                 in_features: int,
                 hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None,
                 act_layer: Type[nn.Module] = nn.GELU,
                 drop: float = 0.,
                 bias: bool = True,
                 dwconv: bool = False):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, 1, 1, groups=hidden_features) if dwconv else None
        self.act = act_layer()
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        x = self.fc1(x)
        if self.dwconv is not None:
            if hw is None:
                raise ValueError('Mlp with dwconv needs the token grid size hw=(H, W)')
            b, n, c = x.shape
            x = self.dwconv(x.transpose(1, 2).reshape(b, c, *hw)).flatten(2).transpose(1, 2)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))
