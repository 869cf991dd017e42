"""Four-level pyramids (strides 4, 8, 16, 32) from the single-stride (16) maps of a plain backbone.

Two recipes, one module:

* ``mode='deconv'`` (BEiT / mmseg ``Feature2Pyramid``, ViT-Adapter's ``ViTBaseline``): one map per level,
  usually taken from several blocks. x4: transposed conv (k2, s2) -> norm -> GELU -> transposed conv;
  x2: one transposed conv; x1: identity; x0.5: 2x2 max pooling. Channels are kept.
* ``mode='simple'`` (ViTDet's simple feature pyramid): every level from the *same* (last) map. x4:
  transposed conv to C/2 -> norm -> GELU -> transposed conv to C/4; x2: transposed conv to C/2; x1:
  identity; x0.5: max pooling. Optionally (``out_channels``) each level is then projected by a 1x1 conv +
  norm and a 3x3 conv + norm, as ViTDet does before its heads.

Maps are cropped (bottom/right, where the patch embedding padded) to ``ceil(H / stride)`` so level
sizes follow the backbone contract for any input size; pooling uses ``ceil_mode`` for the same reason.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .tracing import ceil_div, dense_map, pad_amount, refuse_static_trace, symbolic_tracing


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def make_norm2d(kind: str, channels: int) -> nn.Module:
    """'bn' (BatchNorm2d; BEiT uses SyncBN), 'ln' (channel LayerNorm, ViTDet), 'gn' (GroupNorm(32), ViT-Adapter)."""
    if kind == 'bn':
        return nn.BatchNorm2d(channels)
    if kind == 'ln':
        return LayerNorm2d(channels)
    if kind == 'gn':
        return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)
    raise ValueError(f"unknown pyramid norm {kind!r}; choose 'bn', 'ln' or 'gn'")


def _crop(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if symbolic_tracing():
        # no branch on the sizes; a gather of the first rows/columns, whose output size is ``size`` without
        # any relation between the symbolic sizes to prove (a slice would need ``size <= x.shape``)
        x = x.index_select(-2, torch.arange(size[0], device=x.device))
        return x.index_select(-1, torch.arange(size[1], device=x.device))
    refuse_static_trace('the crop of the pyramid levels')
    return x if tuple(x.shape[-2:]) == tuple(size) else x[..., :size[0], :size[1]].contiguous()


def ceil_max_pool2d(x: torch.Tensor, k: int) -> torch.Tensor:
    """``F.max_pool2d(x, k, k, ceil_mode=True)``; traced, the same as a max pool over the map padded with
    -inf at the bottom/right to a multiple of ``k`` (ceil mode's output-size rule branches on the size)."""
    if not symbolic_tracing():
        return F.max_pool2d(x, k, k, ceil_mode=True)
    x = F.pad(x, (0, pad_amount(x.shape[-1], k), 0, pad_amount(x.shape[-2], k)), value=float('-inf'))
    return F.max_pool2d(x, k, k)


class _CeilMaxPool(nn.MaxPool2d):
    """``MaxPool2d(k, k, ceil_mode=True)`` through :func:`ceil_max_pool2d`."""

    def __init__(self, k: int):
        super().__init__(k, k, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ceil_max_pool2d(x, self.kernel_size)


class FeaturePyramid(nn.Module):
    """Rescale stride-``in_stride`` maps into pyramid levels.

    Args:
        in_dim: channels of the input maps.
        scales: one rescale factor per level (4, 2, 1, 0.5 turn stride 16 into 4, 8, 16, 32; 0.25 is
            also accepted).
        mode: 'deconv' or 'simple' (see the module docstring).
        norm: norm inside the x4 branch and the projections: 'bn', 'ln' or 'gn'.
        out_channels: 'simple' mode only: project every level to this many channels (ViTDet's 1x1 + 3x3
            convs with norms); None keeps C/4, C/2, C, C.
        levels: which levels to build (others are left out and return None); default all.
        in_stride: stride of the input maps.
    """

    def __init__(self,
                 in_dim: int,
                 scales: Sequence[float] = (4, 2, 1, 0.5),
                 mode: str = 'deconv',
                 norm: str = 'bn',
                 out_channels: Optional[int] = None,
                 levels: Optional[Sequence[int]] = None,
                 in_stride: int = 16):
        super().__init__()
        if mode not in ('deconv', 'simple'):
            raise ValueError(f"pyramid mode must be 'deconv' or 'simple', got {mode!r}")
        if out_channels is not None and mode != 'simple':
            raise ValueError("out_channels applies to mode='simple' only")
        self.mode = mode
        self.scales = tuple(float(s) for s in scales)
        self.strides = []
        for s in self.scales:
            if s not in (4., 2., 1., 0.5, 0.25):
                raise ValueError(f'unsupported pyramid scale {s}; use 4, 2, 1, 0.5 or 0.25')
            self.strides.append(int(round(in_stride / s)))
        levels = range(len(self.scales)) if levels is None else levels
        self.levels = tuple(sorted(levels))
        self.branches = nn.ModuleList()
        self.out_dims: List[int] = []
        for i, s in enumerate(self.scales):
            branch, dim = self._branch(in_dim, s, norm)
            if out_channels is not None:
                branch = nn.Sequential(branch, nn.Conv2d(dim, out_channels, 1, bias=False), make_norm2d(norm, out_channels),
                                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                                       make_norm2d(norm, out_channels))
                dim = out_channels
            self.out_dims.append(dim)
            self.branches.append(branch if i in self.levels else nn.Identity())

    def _branch(self, c: int, scale: float, norm: str) -> Tuple[nn.Module, int]:
        half = self.mode == 'simple'
        if scale == 4:
            c1, c2 = (c // 2, c // 4) if half else (c, c)
            return nn.Sequential(nn.ConvTranspose2d(c, c1, 2, 2), make_norm2d(norm, c1), nn.GELU(),
                                 nn.ConvTranspose2d(c1, c2, 2, 2)), c2
        if scale == 2:
            c1 = c // 2 if half else c
            return nn.ConvTranspose2d(c, c1, 2, 2), c1
        if scale == 1:
            return nn.Identity(), c
        k = int(round(1 / scale))
        return _CeilMaxPool(k), c

    def forward(self, maps: Sequence[torch.Tensor], image_hw: Tuple[int, int]) -> List[Optional[torch.Tensor]]:
        """``maps``: one NCHW map per level (mode 'deconv'; None for levels not built) or a single map
        (mode 'simple'); ``image_hw``: the input image size, which fixes each level's size."""
        if self.mode == 'simple' and len(maps) == 1:
            maps = list(maps) * len(self.scales)
        if len(maps) != len(self.scales):
            raise ValueError(f'expected {len(self.scales)} maps (one per level), got {len(maps)}')
        out: List[Optional[torch.Tensor]] = []
        for i, (branch, x, stride) in enumerate(zip(self.branches, maps, self.strides)):
            if i not in self.levels:
                out.append(None)
                continue
            size = (ceil_div(image_hw[0], stride), ceil_div(image_hw[1], stride))
            x = dense_map(x)
            out.append(_crop(branch(x), size))
        return out
