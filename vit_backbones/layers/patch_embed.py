"""Patch embeddings: a strided convolution (non-overlapping when kernel == stride, overlapping
otherwise) with optional norm, padding the input so any H, W works."""
from typing import Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from .tracing import ceil_div, pad_amount, refuse_static_trace, symbolic_tracing

_pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731


def pad_to_multiple(x: torch.Tensor, multiple: int, what: str = 'the input padding') -> torch.Tensor:
    """Zero-pad an NCHW map at the bottom/right so H and W are multiples of ``multiple``. Traced, the pad
    is always applied (a zero-width pad is a no-op), so the graph holds for every size; under torch.jit
    tracing it refuses (the pad would become a constant)."""
    h, w = x.shape[-2:]
    ph, pw = pad_amount(h, multiple), pad_amount(w, multiple)
    refuse_static_trace(what)
    if symbolic_tracing() or ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> NHWC tokens (B, ceil(H/s), ceil(W/s), D) with ``s`` the stride.

    Non-overlapping (``kernel == stride``, Swin, ViT): the input is zero-padded bottom/right to a
    multiple of the stride. Overlapping (``kernel > stride`` with ``padding``, PVT v2): the conv padding
    plus a bottom/right pad keep the output at ``ceil(H/s)``.
    """

    def __init__(self,
                 in_chans: int = 3,
                 embed_dim: int = 96,
                 patch_size: Union[int, Tuple[int, int]] = 4,
                 stride: Optional[Union[int, Tuple[int, int]]] = None,
                 padding: Union[int, Tuple[int, int]] = 0,
                 norm_layer: Optional[Type[nn.Module]] = None,
                 bias: bool = True):
        super().__init__()
        self.patch_size = _pair(patch_size)
        self.stride = _pair(stride if stride is not None else patch_size)
        self.padding = _pair(padding)
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, self.stride, self.padding, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else None

    def output_size(self, h: int, w: int) -> Tuple[int, int]:
        return ceil_div(h, self.stride[0]), ceil_div(w, self.stride[1])

    def _pad_rule(self, axis: int) -> str:
        """How an input side is padded, whatever its size: the pad ``need - size`` (``need`` the smallest
        input the conv maps to ``ceil(size / stride)``) lies in ``[k - 2p - s, k - 2p - 1]``."""
        k, s, p = self.patch_size[axis], self.stride[axis], self.padding[axis]
        return 'never' if k - 2 * p - 1 <= 0 else 'always' if k - 2 * p - s >= 0 else 'sometimes'

    def _traced_pad(self, x: torch.Tensor, h, w) -> torch.Tensor:
        """The padding of :meth:`forward` without a branch on the sizes (they may be symbolic)."""
        pads, rules = [], (self._pad_rule(1), self._pad_rule(0))
        if rules == ('never', 'never'):
            return x
        for axis, size, rule in ((1, w, rules[0]), (0, h, rules[1])):
            need = (ceil_div(size, self.stride[axis]) - 1) * self.stride[axis] + self.patch_size[axis] - 2 * self.padding[axis]
            pads += [0, 0 if rule == 'never' else need - size if rule == 'always' else torch.sym_max(need - size, 0)]
        return F.pad(x, pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if symbolic_tracing():
            x = self._traced_pad(x, h, w)
        else:
            if torch.jit.is_tracing() and ('never' != self._pad_rule(0) or 'never' != self._pad_rule(1)):
                refuse_static_trace('the patch-embedding padding')
            oh, ow = self.output_size(h, w)
            # smallest input that the conv maps to (oh, ow)
            need_h = (oh - 1) * self.stride[0] + self.patch_size[0] - 2 * self.padding[0]
            need_w = (ow - 1) * self.stride[1] + self.patch_size[1] - 2 * self.padding[1]
            if need_h > h or need_w > w:
                x = F.pad(x, (0, max(need_w - w, 0), 0, max(need_h - h, 0)))
        # channels-last in, so the conv's output is already the NHWC token layout (no copy either way; the
        # oneDNN kernel is also faster so on this CPU: 1.3-2x for the image-level patch embeddings)
        x = self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
        if self.norm is not None:
            x = self.norm(x)
        return x


class ConvStem(nn.Module):
    """Convolutional stem: a stack of ``conv(k, stride) -> BatchNorm -> activation`` layers, then NHWC.

    ``channels`` lists the output channels of each layer and ``strides`` their strides (LeViT: four 3x3
    stride-2 convs with Hardswish between them; CeiT's image-to-tokens: conv 7x7/2 + BN + max-pool; DeepViT's
    convolutional patch embedding). ``act_last=False`` leaves the final conv without activation (LeViT).
    ``pool=(kernel, stride)`` optionally appends a max-pool (padding kernel // 2).
    Inputs are padded bottom/right so the output is ``ceil(H / total_stride)`` for any H, W.
    """

    def __init__(self,
                 in_chans: int,
                 channels: Tuple[int, ...],
                 strides: Tuple[int, ...],
                 kernel_size: int = 3,
                 act_layer: Type[nn.Module] = nn.ReLU,
                 norm: bool = True,
                 act_last: bool = True,
                 pool: Optional[Tuple[int, int]] = None):
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f'channels {channels} and strides {strides} must have the same length')
        layers = []
        prev = in_chans
        for i, (c, s) in enumerate(zip(channels, strides)):
            layers.append(nn.Conv2d(prev, c, kernel_size, s, kernel_size // 2, bias=not norm))
            if norm:
                layers.append(nn.BatchNorm2d(c))
            if act_last or i < len(channels) - 1:
                layers.append(act_layer())
            prev = c
        if pool is not None:
            layers.append(nn.MaxPool2d(pool[0], pool[1], pool[0] // 2))
        self.layers = nn.Sequential(*layers)
        self.stride = 1
        for s in strides:
            self.stride *= s
        if pool is not None:
            self.stride *= pool[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(pad_to_multiple(x, self.stride, 'the stem padding')).permute(0, 2, 3, 1)
