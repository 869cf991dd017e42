"""LeViT (Graham et al., 2021) as a pyramid backbone at any input size.

The network is the official one: a stride-16 convolutional stem (four 3x3 stride-2 convolutions with
BatchNorm, Hardswish between them), then three stages of residual blocks (attention, then a 2x MLP)
on the stride-16, -32 and -64 token grids. Every linear layer is a bias-free Linear followed by a
BatchNorm1d over all B*N tokens; activations are Hardswish (also *before* each attention's output
projection). Attention adds a learned per-head bias indexed by the offset (|dy|, |dx|) between query and
key. Stages 1 and 2 start with a *shrink* attention block: queries from every other token
(``x[:, ::2, ::2]``), keys/values from all tokens, 4x value ratio, no residual (the width changes),
followed by a residual MLP.

Dense-prediction adaptations (``forward`` works for any H, W):

- **Bias indices follow the runtime grid.** They are computed for the actual (h, w) key grid and
  query stride (two small per-axis index tensors, cached per size and device); nothing assumes a
  square or 224x224 input.
- **Bias tables at other grids.** Each layer's learned table covers the offsets of the grid it was
  built for (``img_size`` / 16, then halved per stage: 14, 7, 4 at 224). A runtime side no larger than
  the table's uses the learned values directly (exactly the reference model at the pre-training size);
  a larger side resamples the table on the signed-offset grid, bicubic (``bias_interpolation``),
  ``align_corners=False``, in float32, in every forward pass (see
  :mod:`vit_backbones.layers.attention_bias`). Checkpoints with other table sizes are adapted the same
  way when loaded.
- **Odd grids.** Shrink attention subsamples with stride 2 from the first token, so a side of n tokens
  becomes ceil(n / 2), as the stem's padded stride-2 convolutions give ceil(H / 2) at every step: level
  sizes are exactly ceil(H / s) x ceil(W / s).
- **Five levels, two of them derived from the stem.** LeViT has three stages (strides 16, 32, 64). The
  stride-4 and stride-8 levels are the stem's own activations after its second and third convolution
  (+ BN + Hardswish), with C/4 and C/2 channels (C = stage-0 width): pretrained, no new parameters. Levels:
  0: stride 4 (C/4), 1: stride 8 (C/2), 2: stride 16 (C), 3: stride 32, 4: stride 64. The default
  ``out_indices=(0, 1, 2, 3, 4)`` returns all of them, so every parameter takes part in the loss (no
  unused parameters under DDP); an FPN can start at level 0 (Mask R-CNN, Semantic FPN: strides 4..64) or
  1 (RetinaNet: ``start_level=1`` gives strides 8..64 + one extra level). Stages after the deepest
  requested level are not built (their checkpoint tensors are dropped with a reason in the load
  report); stage 0 and the whole stem are always built.
"""
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checkpoint.loader import strip_prefix
from ..checkpoint.rename import unwrap_keys
from ..layers import make_drop_path, nlc_to_nchw, scaled_dot_product
from ..layers.linear import conv_bn_act, linear_bn_act
from ..layers.attention_bias import (check_offset_bias_traceable, gather_offset_bias, offset_bias_index,
                                     resize_offset_bias_table, traced_offset_bias)
from ..layers.tracing import ceil_div, symbolic_tracing, tracing
from ..registry import register_backbone
from .base import _BN_TYPES, BaseBackbone, drop_path_rates, resolve_arch
from .levit_convert import to_ours


class LinearBN(nn.Module):
    """Bias-free Linear + BatchNorm1d over every token of the batch: (B, N, Cin) -> (B, N, Cout)."""

    def __init__(self, in_dim: int, out_dim: int, bn_weight_init: float = 1.):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim, bias=False)
        self.bn = nn.BatchNorm1d(out_dim)
        self.bn_weight_init = bn_weight_init

    def forward(self, x: torch.Tensor, act: Optional[nn.Module] = None) -> torch.Tensor:
        """``bn(fc(x))``, then ``act`` if given; an eval-mode BatchNorm folded into the matmul
        (:func:`~vit_backbones.layers.linear.linear_bn_act`)."""
        if self.bn.training and x.shape[0] * x.shape[1] == 1:
            raise ValueError('LeViT: BatchNorm in training mode needs more than one token per batch, but a map '
                             'reduced to a single token (batch of 1, image at most 64 px on a side). Use a batch of '
                             'at least 2, a larger image, norm_eval=True, or out_indices without the stride-64 level')
        return linear_bn_act(x, self.fc, self.bn, act)


class ConvBN(nn.Module):
    """3x3 stride-2 convolution (padding 1, no bias) + BatchNorm2d: ceil(H / 2) x ceil(W / 2) out."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor, act: Optional[nn.Module] = None) -> torch.Tensor:
        """``bn(conv(x))``, then ``act`` if given; folded as :meth:`LinearBN.forward`."""
        return conv_bn_act(x, self.conv, self.bn, act)


class LeViTStem(nn.Module):
    """Four ConvBN with Hardswish between them; returns the stride-4, -8 and -16 maps."""

    def __init__(self, in_ch: int, dim: int):
        super().__init__()
        self.conv1 = ConvBN(in_ch, dim // 8)
        self.conv2 = ConvBN(dim // 8, dim // 4)
        self.conv3 = ConvBN(dim // 4, dim // 2)
        self.conv4 = ConvBN(dim // 2, dim)
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x4 = self.conv2(self.conv1(x, self.act), self.act)
        x8 = self.conv3(x4, self.act)
        return x4, x8, self.conv4(x8)


class _OffsetBias(nn.Module):
    """What both attention kinds share: the per-head offset bias table and its runtime lookup."""

    def _init_bias(self, num_heads: int, table_hw: Tuple[int, int], interpolation: str):
        self.table_hw = tuple(int(s) for s in table_hw)
        self.bias_interpolation = interpolation
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, self.table_hw[0] * self.table_hw[1]))
        self._index_cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def attention_bias(self, q_hw: Tuple[int, int], kv_hw: Tuple[int, int], stride: int,
                       device: torch.device) -> torch.Tensor:
        """(heads, Nq, Nk) bias for queries on a ``stride`` sub-grid of a ``kv_hw`` key grid."""
        if symbolic_tracing():  # sizes may be symbolic: no size-keyed cache, no Python choice crop/resample
            return traced_offset_bias(self.attention_biases, self.table_hw, q_hw, kv_hw, stride, self.bias_interpolation)
        check_offset_bias_traceable()
        key = (tuple(q_hw), tuple(kv_hw), stride, str(device))
        table = self.attention_biases
        constant = (not tracing() and table.device.type != 'meta'  # meta: no storage, nothing to keep
                    and not (torch.is_grad_enabled() and table.requires_grad))
        if constant:  # eval / frozen: the same bias for a size until the table changes (in place or moved)
            version = key + (table._version, table.data_ptr(), table.dtype, self.table_hw, self.bias_interpolation)
            cached = self.__dict__.get('_constant_bias')
            if cached is not None and cached[0] == version:
                return cached[1]
        index = self._index_cache.get(key)
        if index is None:
            if len(self._index_cache) >= 32:  # many input sizes (multi-scale training): keep it bounded
                self._index_cache.clear()
            index = self._index_cache[key] = offset_bias_index(q_hw, kv_hw, stride, device)
        resized = resize_offset_bias_table(table, self.table_hw, kv_hw, self.bias_interpolation)
        bias = gather_offset_bias(resized, kv_hw, index)
        if constant:
            self.__dict__['_constant_bias'] = (version, bias.detach())
        return bias


class LeViTAttention(_OffsetBias):
    """Multi-head attention with offset biases; q/k have ``key_dim`` and v ``attn_ratio * key_dim``
    channels per head; Hardswish then LinearBN (zero-initialised BN weight) as output projection."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, table_hw: Tuple[int, int],
                 bias_interpolation: str = 'bicubic'):
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim**-0.5
        self.qkv = LinearBN(dim, num_heads * (2 * key_dim + self.val_dim))
        self.act = nn.Hardswish()
        self.proj = LinearBN(num_heads * self.val_dim, dim, bn_weight_init=0.)
        self._init_bias(num_heads, table_hw, bias_interpolation)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).transpose(1, 2).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=-1)
        bias = self.attention_bias(hw, hw, 1, x.device).unsqueeze(0)
        out = scaled_dot_product(q, k, v, bias, scale=self.scale)
        return self.proj(self.act(out.transpose(1, 2).reshape(b, n, -1)))


class ShrinkAttention(_OffsetBias):
    """Attention from a stride-2 subsample of the tokens (queries) to all tokens (keys/values); changes
    the width to ``out_dim`` and the grid to ceil(h / 2) x ceil(w / 2)."""

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int, attn_ratio: float,
                 table_hw: Tuple[int, int], stride: int = 2, bias_interpolation: str = 'bicubic'):
        super().__init__()
        self.num_heads, self.key_dim, self.stride = num_heads, key_dim, stride
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim**-0.5
        self.kv = LinearBN(in_dim, num_heads * (key_dim + self.val_dim))
        self.q = LinearBN(in_dim, num_heads * key_dim)
        self.act = nn.Hardswish()
        self.proj = LinearBN(num_heads * self.val_dim, out_dim)
        self._init_bias(num_heads, table_hw, bias_interpolation)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
        b, n, c = x.shape
        h, w = hw
        s = self.stride
        k, v = self.kv(x).view(b, n, self.num_heads, -1).transpose(1, 2).split([self.key_dim, self.val_dim], dim=-1)
        if symbolic_tracing():  # a gather of the subsampled tokens (a strided slice makes the compiler guard on layouts)
            q_hw = (ceil_div(h, s), ceil_div(w, s))
            rows = torch.arange(q_hw[0], device=x.device) * (s * w)
            index = (rows.view(-1, 1) + torch.arange(q_hw[1], device=x.device).view(1, -1) * s).reshape(-1)
            xq = x.index_select(1, index)
        else:
            xq = x.reshape(b, h, w, c)[:, ::s, ::s]
            q_hw = tuple(xq.shape[1:3])  # ceil(h / s) x ceil(w / s)
            xq = xq.reshape(b, -1, c)
        q = self.q(xq).view(b, -1, self.num_heads, self.key_dim).transpose(1, 2)
        bias = self.attention_bias(q_hw, hw, s, x.device).unsqueeze(0)
        out = scaled_dot_product(q, k, v, bias, scale=self.scale)
        return self.proj(self.act(out.transpose(1, 2).reshape(b, q.shape[2], -1))), q_hw


class LeViTMlp(nn.Module):
    """LinearBN -> Hardswish -> LinearBN (zero-initialised BN weight)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = LinearBN(dim, hidden)
        self.act = nn.Hardswish()
        self.fc2 = LinearBN(hidden, dim, bn_weight_init=0.)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x, self.act))


class LeViTBlock(nn.Module):
    """Residual attention + residual MLP (no norms: the BNs inside the linears do that job)."""

    def __init__(self, dim, key_dim, num_heads, attn_ratio, mlp_ratio, table_hw, drop_path=0.,
                 bias_interpolation='bicubic'):
        super().__init__()
        self.attn = LeViTAttention(dim, key_dim, num_heads, attn_ratio, table_hw, bias_interpolation)
        self.mlp = LeViTMlp(dim, int(dim * mlp_ratio))
        self.drop_path = make_drop_path(drop_path)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = self.drop_path.add(x, self.attn(x, hw))
        return self.drop_path.add(x, self.mlp(x))


class ShrinkBlock(nn.Module):
    """Shrink attention (no residual) + residual MLP at the new width."""

    def __init__(self, in_dim, out_dim, key_dim, num_heads, attn_ratio, mlp_ratio, table_hw, drop_path=0.,
                 bias_interpolation='bicubic'):
        super().__init__()
        self.attn = ShrinkAttention(in_dim, out_dim, key_dim, num_heads, attn_ratio, table_hw,
                                    bias_interpolation=bias_interpolation)
        self.mlp = LeViTMlp(out_dim, int(out_dim * mlp_ratio))
        self.drop_path = make_drop_path(drop_path)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]):
        x, hw = self.attn(x, hw)
        return self.drop_path.add(x, self.mlp(x)), hw


class LeViTStage(nn.Module):
    def __init__(self, shrink: Optional[ShrinkBlock], blocks: List[LeViTBlock]):
        super().__init__()
        self.shrink = shrink
        self.blocks = nn.ModuleList(blocks)


@register_backbone
class LeViT(BaseBackbone):
    """LeViT backbone (registered as ``'LeViT'``), levels at strides 4, 8, 16, 32, 64 for any H, W.

    Args:
        arch: '128s' | '128' | '192' | '256' | '384' (also 'LeViT-256', 'levit_256'...), or a dict of
            ``embed_dims``, ``key_dim``, ``num_heads``, ``depths``, ``attn_ratio``, ``mlp_ratio``,
            ``shrink_attn_ratio``, ``shrink_mlp_ratio``, ``drop_path_rate`` (or ``'base': name`` plus
            overrides). Shrink attention has ``embed_dims[i-1] // key_dim`` heads, as the official model.
        img_size: pre-training image size (int or (h, w)); sets the grids of the learned bias tables
            (ceil(img_size / 16), then halved per stage). 224 for every released checkpoint.
        bias_interpolation: how tables are resampled for larger grids: 'bicubic' (default) or 'bilinear'.
        drop_path_rate: stochastic depth; None takes the variant's (0, or 0.1 for LeViT-384). As in the
            official code the same rate is used for every residual branch (no linear schedule).
        out_indices: levels to return, default all five (see the module docstring).
        frozen_stages, norm_eval, with_cp, in_chans, init_cfg, pretrained: see :class:`BaseBackbone`. The
            stem is unit 0 of ``frozen_stages``; stage i includes its shrink block. ``norm_eval`` matters
            here: every linear layer has a BatchNorm. ``with_cp`` recomputes blocks without updating the
            BatchNorm running statistics a second time, so outputs, gradients and running stats equal
            those without checkpointing.

    Outputs: a tuple of NCHW maps in ``out_indices`` order; level i has stride ``4 * 2**i`` and size
    ceil(H / stride) x ceil(W / stride).

    Differences from the official model: any input size (runtime bias indices, resampled tables for
    grids larger than the pre-training one, ceil-size subsampling); no classifier heads; PyTorch's
    default Linear/Conv initialisation as the official code (BN weights 1, or 0 at the end of each
    residual branch; zero attention biases).
    """

    _common = dict(attn_ratio=2, mlp_ratio=2, shrink_attn_ratio=4, shrink_mlp_ratio=2, drop_path_rate=0.)
    arch_zoo = {
        '128s': dict(_common, embed_dims=(128, 256, 384), key_dim=16, num_heads=(4, 6, 8), depths=(2, 3, 4)),
        '128': dict(_common, embed_dims=(128, 256, 384), key_dim=16, num_heads=(4, 8, 12), depths=(4, 4, 4)),
        '192': dict(_common, embed_dims=(192, 288, 384), key_dim=32, num_heads=(3, 5, 6), depths=(4, 4, 4)),
        '256': dict(_common, embed_dims=(256, 384, 512), key_dim=32, num_heads=(4, 6, 8), depths=(4, 4, 4)),
        '384': dict(_common, embed_dims=(384, 512, 768), key_dim=32, num_heads=(6, 9, 12), depths=(4, 4, 4),
                    drop_path_rate=0.1),
    }
    del _common
    arch_aliases = {f'{p}{k}': k for k in ('128s', '128', '192', '256', '384')
                    for p in ('levit-', 'levit_', 'levit')}
    #: LeViT paper (ICCV 2021, main results table) / official README: params include the two BN+Linear
    #: ImageNet heads (class and distillation); FLOPs are multiply-accumulates at 224x224.
    paper_table = {
        '128s': dict(params=7.8, gmacs=0.305, source='LeViT paper / official README (facebookresearch/LeViT)'),
        '128': dict(params=9.2, gmacs=0.406, source='LeViT paper / official README (facebookresearch/LeViT)'),
        '192': dict(params=11.0, gmacs=0.658, source='LeViT paper / official README (facebookresearch/LeViT)'),
        '256': dict(params=18.9, gmacs=1.120, source='LeViT paper / official README (facebookresearch/LeViT)'),
        '384': dict(params=39.1, gmacs=2.353, source='LeViT paper / official README (facebookresearch/LeViT)'),
    }
    dense_only_prefixes = ()

    def __init__(self,
                 arch: Union[str, dict] = '256',
                 img_size: Union[int, Sequence[int]] = 224,
                 bias_interpolation: str = 'bicubic',
                 drop_path_rate: Optional[float] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3, 4),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 in_chans: int = 3,
                 init_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None):
        super().__init__(out_indices, frozen_stages, norm_eval, with_cp, in_chans, init_cfg, pretrained)
        self.arch_name, cfg = resolve_arch(arch, self.arch_zoo, 'LeViT', self.arch_aliases)
        dims, depths, heads = tuple(cfg['embed_dims']), tuple(cfg['depths']), tuple(cfg['num_heads'])
        kd = int(cfg['key_dim'])
        n = len(dims)
        if not (len(depths) == len(heads) == n):
            raise ValueError(f'LeViT arch: embed_dims, depths and num_heads need one entry per stage, got {cfg}')
        if dims[0] % 8:
            raise ValueError(f'LeViT arch: embed_dims[0]={dims[0]} must be divisible by 8 (stem widths C/8, C/4, C/2)')
        if any(d % kd for d in dims[:-1]):
            raise ValueError(f'LeViT arch: shrink attention uses embed_dims[i] // key_dim heads; {dims[:-1]} '
                             f'must be multiples of key_dim={kd}')
        if bias_interpolation not in ('bicubic', 'bilinear'):
            raise ValueError(f"bias_interpolation must be 'bicubic' or 'bilinear', got {bias_interpolation!r}")
        self.embed_dims, self.depths, self.num_heads, self.key_dim = dims, depths, heads, kd
        self._arch_cfg = dict(cfg)
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        self.bias_interpolation = bias_interpolation
        self.drop_path_rate = float(cfg['drop_path_rate'] if drop_path_rate is None else drop_path_rate)
        self._set_out_indices(n + 2)
        self.num_built_stages = max(1, max(self.out_indices) - 1)
        self.feature_info = [dict(num_chs=dims[0] // 4, reduction=4, module='stem.conv2'),
                             dict(num_chs=dims[0] // 2, reduction=8, module='stem.conv3')]
        self.feature_info += [dict(num_chs=dims[i], reduction=16 * 2**i, module=f'stages.{i}') for i in range(n)]
        self.min_input_size = 16 * 2**(self.num_built_stages - 1)

        self.stem = LeViTStem(in_chans, dims[0])
        grid = tuple(-(-s // 16) for s in self.img_size)
        dp = self.drop_path_rate  # the official rule: the same rate in every residual branch
        rates = drop_path_rates(dp, depths[:self.num_built_stages], 'constant')
        self.stages = nn.ModuleList()
        self.table_grids = []
        for i in range(self.num_built_stages):
            shrink = None
            if i > 0:
                shrink = ShrinkBlock(dims[i - 1], dims[i], kd, dims[i - 1] // kd, cfg['shrink_attn_ratio'],
                                     cfg['shrink_mlp_ratio'], grid, dp, bias_interpolation)
                grid = tuple(-(-g // 2) for g in grid)
            blocks = [LeViTBlock(dims[i], kd, heads[i], cfg['attn_ratio'], cfg['mlp_ratio'], grid, rate,
                                 bias_interpolation) for rate in rates[i]]
            self.stages.append(LeViTStage(shrink, blocks))
            self.table_grids.append(grid)

    # ------------------------------------------------------------------ init / freezing / checkpointing
    def _default_init(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.reset_parameters()
            elif isinstance(m, _BN_TYPES):
                m.reset_parameters()
            elif isinstance(m, _OffsetBias):
                nn.init.zeros_(m.attention_biases)
        for m in self.modules():
            if isinstance(m, LinearBN):
                nn.init.constant_(m.bn.weight, m.bn_weight_init)

    def _stem_and_stages(self):
        return [self.stem] + list(self.stages)

    def _unavailable_intermediates(self):
        return {i: f'stage {i - 2} is not built (out_indices={self.out_indices} stop at level {max(self.out_indices)})'
                for i in range(self.num_built_stages + 2, len(self.feature_info))}

    def classifier_param_delta(self) -> int:
        """The official classifier: two BN1d + Linear(C, 1000) heads (class and distillation) on pooled
        stage-2 features; and any stage not built here (out_indices stopping early)."""
        c = self.embed_dims[-1]
        missing = 0
        if self.num_built_stages < len(self.embed_dims):
            with torch.device('meta'):
                full = type(self)(dict(self._arch_cfg), img_size=self.img_size)
            missing = sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in self.parameters())
        return 2 * (2 * c + c * 1000 + 1000) + missing

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x4, x8, x16 = self.stem(x)
        levels = {0: x4, 1: x8, 2: x16}
        hw = tuple(x16.shape[-2:])
        t = x16.flatten(2).transpose(1, 2)
        for i, stage in enumerate(self.stages):
            if stage.shrink is not None:
                t, hw = self.run_block(stage.shrink, t, hw)
            for blk in stage.blocks:
                t = self.run_block(blk, t, hw)
            if i + 2 in self.out_indices:
                levels[i + 2] = nlc_to_nchw(t, hw)
        return tuple(levels[i] for i in self.out_indices)

    # ------------------------------------------------------------------ checkpoints
    def _bias_module(self, key: str) -> Optional[_OffsetBias]:
        m = re.match(r'(.*)\.attention_biases$', key)
        if not m:
            return None
        try:
            mod = self.get_submodule(m.group(1))
        except AttributeError:
            return None
        return mod if isinstance(mod, _OffsetBias) else None

    def resize_checkpoint_tensor(self, key: str, value: torch.Tensor) -> Optional[torch.Tensor]:
        mod = self._bias_module(key)
        if mod is None or value.ndim != 2 or value.shape[0] != mod.attention_biases.shape[0]:
            return None
        side = math.isqrt(value.shape[1])
        if side * side != value.shape[1]:
            return None
        return resize_offset_bias_table(value, (side, side), mod.table_hw, self.bias_interpolation)

    def convert_checkpoint(self, sd: Dict[str, torch.Tensor]):
        sd = unwrap_keys(strip_prefix(sd, ('backbone.', )), ('module.', 'levit.'))  # DDP, HF task models
        out, fmt, dropped = to_ours(sd)
        for k in list(out):
            m = re.match(r'stages\.(\d+)\.', k)
            if m and int(m.group(1)) >= self.num_built_stages:
                dropped[k] = (f'stage {m.group(1)} is not built (out_indices {self.out_indices} stop at level '
                              f'{max(self.out_indices)})')
                del out[k]
        return out, fmt, dropped
