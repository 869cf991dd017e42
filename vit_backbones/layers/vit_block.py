"""The pre-norm transformer block of plain (single-stride) backbones: ViT, DeiT and their relatives.

``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, each branch optionally scaled (LayerScale) and
dropped per sample (stochastic depth). Attention is global over the whole sequence, or, as ViTDet's
high-resolution remedy, restricted to non-overlapping windows of the token grid (zero-padded at the
bottom/right to a multiple of the window, no shift) with an optional learned relative position bias.
"""
from functools import partial
from typing import Optional, Tuple, Type

import torch
from torch import nn

from .attention import Attention
from .drop import make_drop_path
from .layer_scale import LayerScale
from .mlp import Mlp
from .rel_pos import RelativePositionBias
from .window import window_plan

LayerNormEps6 = partial(nn.LayerNorm, eps=1e-6)


class ViTBlock(nn.Module):
    """Pre-norm attention + MLP block on (B, N, C) tokens.

    Args:
        dim, num_heads, mlp_ratio, qkv_bias, qk_scale: usual block hyper-parameters.
        drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on the attention probabilities.
        drop_path: stochastic-depth rate of this block.
        norm_layer: norm constructor (LayerNorm eps 1e-6 by default, as ViT/DeiT).
        act_layer: MLP activation.
        layer_scale: initial value of a per-channel branch scale (``ls1``/``ls2``), or None for none.
        window_size: 0 for global attention; w > 0 for attention inside w x w windows of the token grid
            (the sequence must then be exactly the H*W grid tokens, raster order, no prefix tokens).
        rel_pos: with windows, add a learned relative position bias (``attn.rel_pos``) per head.
        attn: an attention module to use instead of the default :class:`Attention` (an
            :class:`~.attention.AttentionBase` called as ``attn(x)`` on (B, N, C) tokens, and as
            ``attn.forward_windows(x, plan, rel_bias)`` with windows; e.g. talking-heads or re-attention).
        mlp: a feed-forward module to use instead of the default :class:`Mlp` (CeiT's LeFF); it is called
            as ``mlp(tokens, hw)`` so that it can work on the token grid.

    ``forward(x, hw)``: ``hw`` is the token grid (needed only for windows or a grid-aware ``mlp``).
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 mlp_ratio: float = 4.,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop: float = 0.,
                 attn_drop: float = 0.,
                 drop_path: float = 0.,
                 norm_layer: Type[nn.Module] = LayerNormEps6,
                 act_layer: Type[nn.Module] = nn.GELU,
                 layer_scale: Optional[float] = None,
                 window_size: int = 0,
                 rel_pos: bool = False,
                 mlp: Optional[nn.Module] = None,
                 attn: Optional[nn.Module] = None):
        super().__init__()
        if rel_pos and not window_size:
            raise ValueError('rel_pos=True needs window_size > 0 (the bias table is per window)')
        self.window_size = int(window_size)
        self.norm1 = norm_layer(dim)
        if attn is None:
            attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.attn = attn
        if rel_pos:
            self.attn.rel_pos = RelativePositionBias(num_heads, (self.window_size, self.window_size))
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else None
        self.drop_path = make_drop_path(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp_takes_hw = mlp is not None
        self.mlp = mlp if mlp is not None else Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else None

    def _windowed(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        if hw is None or x.shape[1] != hw[0] * hw[1]:
            raise ValueError(f'window attention needs exactly the {hw} grid tokens (no prefix tokens), '
                             f'got a sequence of {x.shape[1]}')
        window = (self.window_size, self.window_size)
        plan = window_plan(tuple(hw), window, (0, 0), x.device)
        rel_pos = getattr(self.attn, 'rel_pos', None)
        return self.attn.forward_windows(x, plan, rel_pos(window) if rel_pos is not None else None)

    def forward(self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        y = self.norm1(x)
        y = self._windowed(y, hw) if self.window_size else self.attn(y)
        if self.ls1 is not None:
            y = self.ls1(y)
        x = self.drop_path.add(x, y)
        y = self.mlp(self.norm2(x), hw) if self.mlp_takes_hw else self.mlp(self.norm2(x))
        if self.ls2 is not None:
            y = self.ls2(y)
        return self.drop_path.add(x, y)
