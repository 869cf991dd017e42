"""Shuffle Transformer (Huang et al., 2021, "Rethinking Spatial Shuffle for Vision Transformer") as a
four-level pyramid backbone.

The network, as in the official classification code (mulinmeng/Shuffle-Transformer):

- a convolutional stem of stride 4: conv 3x3/2 (3 -> 32) + BatchNorm + ReLU6, conv 3x3/2 (32 -> C) +
  BatchNorm + ReLU6, conv 1x1 (C -> C);
- four stages; stages 2-4 open with a patch merging (BatchNorm, then a 2x2 stride-2 conv without bias);
- blocks alternate *regular* window attention and *shuffled* window attention. In a regular window the
  ws x ws tokens are neighbours; in a shuffled window they are spread over the whole map with stride
  ``Hp / ws`` (``Wp / ws``): window (a, b) holds the tokens at rows ``a + i * Hp / ws`` and columns
  ``b + j * Wp / ws`` for i, j < ws (the official ``'(ws1 hh) (ws2 ww)'`` instead of ``'(hh ws1) (ww ws2)'``);
- every block: ``x + DropPath(attn(BN(x)))``, then the neighbour-window connection ``x + dwconv(BN(x))``
  (depthwise conv, kernel = window size, no drop path), then ``x + DropPath(mlp(BN(x)))`` with a
  ReLU6 MLP. qkv has no bias; a Swin-style relative position bias is added inside every window
  (shuffled windows index it by the position inside the window);
- stochastic depth is constant inside a stage: ``linspace(0, drop_path_rate, num_stages)`` per stage.

The official 1x1 convolutions (qkv, proj, MLP) are Linear layers here (same weights, reshaped on load),
and the maps are kept NHWC inside (BatchNorm and the convolutions run on channels-last views).

**Any input size.** The official code needs every stage map to be a multiple of the window. Here, inside
each attention (after ``norm1``), the map is zero-padded at the bottom/right to ``Hp x Wp``, the next
multiples of the window, and the windows are formed on the padded map: regular windows as in Swin's
detection code, shuffled windows with the stride ``Hp / ws`` of the padded map. Padded tokens are
*masked out as keys* (additive -inf), so a real token attends to exactly the real tokens of its (regular
or shuffled) window, whatever the padding holds; their own outputs are dropped. Every window keeps at
least one real token (row ``a < Hp / ws <= H``), so no softmax row is empty. When H and W are multiples
of the window nothing is padded or masked and the computation is the official one. A map smaller than
the window becomes one (masked) window: the same as attention over the whole map. The stem's padded
3x3/2 convs give ``ceil(H / 4)``; patch merging pads odd maps (after its BatchNorm) at the bottom/right,
so level i has ``ceil(H / 2^(i+2)) x ceil(W / 2^(i+2))``. The depthwise conv pads with zeros at the
map borders, as the official one does.

Outputs are the raw stage outputs (the official model has no output norms).
"""
import re
from functools import lru_cache
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.loader import CheckpointMismatchError, strip_prefix
from ..layers import Mlp, WindowAttention, WindowPlan, make_drop_path
from ..layers.tracing import pad_amount, refuse_static_trace, symbolic_tracing, tracing
from ..layers.window import get_window_plan, key_padding_mask
from ..registry import register_backbone
from .base import BaseBackbone, drop_path_rates, init_transformer_weights, resolve_arch


# ---------------------------------------------------------------------------------------------- windows
def _plan_and_mask(hw: Tuple[int, int], window: int, shuffle: bool,
                   device: torch.device) -> Tuple[WindowPlan, Optional[torch.Tensor]]:
    plan = get_window_plan(hw, (window, window), (0, 0), device, shuffled=shuffle)
    if not tracing() and plan.pad_slots is None:
        return plan, None
    # traced: the mask is always there (all zeros where nothing is padded): no branch on the size
    return plan, key_padding_mask(plan)


_cached_plan_and_mask = lru_cache(maxsize=64)(_plan_and_mask)


def shuffle_window_plan(hw: Tuple[int, int], window: int, shuffle: bool,
                        device: torch.device) -> Tuple[WindowPlan, Optional[torch.Tensor]]:
    """(plan, key mask) for a map size: regular or shuffled windows on the bottom/right zero-padded map
    (:class:`~vit_backbones.layers.window.WindowPlan`); the mask is (num_windows, 1, N), -inf on padded key
    slots and 0 elsewhere, or None when nothing is padded. Cached in eager mode (do not modify the results
    in place); built in the graph when traced."""
    if tracing():
        return _plan_and_mask(tuple(hw), window, shuffle, device)
    return _cached_plan_and_mask(tuple(hw), window, shuffle, device)


def _bn_nhwc(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm2d on an NHWC map (as a channels-last NCHW view)."""
    return bn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------- modules
class ShuffleStem(nn.Module):
    """conv 3x3/2 + BN + ReLU6, conv 3x3/2 + BN + ReLU6, conv 1x1: image -> NHWC map at stride 4
    (``ceil(H / 4)``: each padded 3x3/2 conv gives ``ceil``)."""

    def __init__(self, in_chans: int, mid_chans: int, out_chans: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, mid_chans, 3, 2, 1)
        self.bn1 = nn.BatchNorm2d(mid_chans)
        self.conv2 = nn.Conv2d(mid_chans, out_chans, 3, 2, 1)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.conv3 = nn.Conv2d(out_chans, out_chans, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn1(self.conv1(x)))
        x = F.relu6(self.bn2(self.conv2(x)))
        return self.conv3(x).permute(0, 2, 3, 1)


class ShufflePatchMerging(nn.Module):
    """BN, then a 2x2 stride-2 conv without bias (NHWC in and out); odd sides are zero-padded after the BN."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.reduction = nn.Conv2d(dim, out_dim, 2, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        y = self.norm(x.permute(0, 3, 1, 2))
        refuse_static_trace('the patch-merging padding')
        if symbolic_tracing() or h % 2 or w % 2:  # traced: no branch on the sizes (a zero-width pad is a no-op)
            y = F.pad(y, (0, pad_amount(w, 2), 0, pad_amount(h, 2)))
        return self.reduction(y).permute(0, 2, 3, 1)


class ShuffleBlock(nn.Module):
    """Window (``shuffle=False``) or shuffled-window attention, neighbour-window depthwise conv, ReLU6 MLP;
    each behind a BatchNorm, with residuals. ``forward(x)`` on an NHWC map."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shuffle: bool, mlp_ratio: float = 4.,
                 conv_bias: bool = True, qk_scale: Optional[float] = None, drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0., local_kernel_size: Optional[int] = None):
        super().__init__()
        self.window_size = window_size
        self.shuffle = shuffle
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = WindowAttention(dim, num_heads, (window_size, window_size), qkv_bias=False, qk_scale=qk_scale,
                                    attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.BatchNorm2d(dim)
        k = local_kernel_size or window_size
        self.local = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim, bias=conv_bias)
        self.norm3 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.ReLU6, drop=drop)
        self.drop_path = make_drop_path(drop_path)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of an (already normalised) NHWC map inside its regular or shuffled windows."""
        b, h, w, c = x.shape
        ws = self.window_size
        plan, mask = shuffle_window_plan((h, w), ws, self.shuffle, x.device)
        return self.attn(x.reshape(b, h * w, c), plan, mask).view(b, h, w, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_path.add(x, self.attend(_bn_nhwc(self.norm1, x)))
        x = x + self.local(self.norm2(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        return self.drop_path.add(x, self.mlp(_bn_nhwc(self.norm3, x)))


class ShuffleStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, window_size: int,
                 drop_paths: Sequence[float], **block_kwargs):
        super().__init__()
        self.downsample = ShufflePatchMerging(in_dim, dim) if in_dim != dim else None
        self.blocks = nn.ModuleList([
            ShuffleBlock(dim, num_heads, window_size, shuffle=i % 2 == 1, drop_path=drop_paths[i], **block_kwargs)
            for i in range(depth)
        ])


# ---------------------------------------------------------------------------------------------- backbone
@register_backbone
class ShuffleTransformer(BaseBackbone):
    """Shuffle Transformer backbone (registered as ``'ShuffleTransformer'``).

    Args:
        arch: 'tiny' | 'small' | 'base' (or 't', 's', 'b', 'shuffle-t', ...), or a dict of ``embed_dims``
            (stage-1 width; stage i has ``embed_dims * 2**i``), ``depths``, ``num_heads`` (optionally with
            ``'base': name``). The official code derives the widths as ``32 * num_heads``, which is the
            same for the released variants.
        window_size: attention window (7 in the released models). A checkpoint with another window has
            its relative position bias tables resized bicubically on load.
        local_kernel_size: kernel of the depthwise neighbour-window conv; None (default) = ``window_size``,
            the official rule. Checkpoint kernels of another (odd) size are zero-padded around the centre
            (exact: same function) or centre-cropped on load.
        mlp_ratio: MLP hidden width ratio.
        conv_bias: bias of the depthwise neighbour-window conv (the official ``qkv_bias``, True in its
            config; the qkv projection itself never has a bias).
        qk_scale: attention scale (default head_dim ** -0.5).
        stem_channels: width of the stem's first conv (official ``token_dim`` = 32).
        drop_rate, attn_drop_rate: dropout after projections / MLP, on attention.
        drop_path_rate: stochastic depth; constant within a stage, ``linspace(0, rate, num_stages)`` over the
            stages (the official schedule), on the attention and MLP branches only.
        out_indices, frozen_stages, norm_eval, with_cp, in_chans, init_cfg, pretrained: see
            :class:`BaseBackbone`. ``frozen_stages=k`` freezes the stem and stages 0..k-1 (a stage
            includes the patch merging that opens it). ``with_cp`` recomputes each block in the backward
            without updating BatchNorm statistics a second time.

    Outputs: a tuple of NCHW maps for ``out_indices``; level i has ``embed_dims * 2**i`` channels and
    stride ``4 * 2**i``.
    """

    arch_zoo = {
        'tiny': dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
        'small': dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
        'base': dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    }
    arch_aliases = {'t': 'tiny', 's': 'small', 'b': 'base', 'shuffle-t': 'tiny', 'shuffle-s': 'small',
                    'shuffle-b': 'base'}
    _readme = 'official README table (ImageNet-1K, 224x224)'
    paper_table = {
        'tiny': dict(params=28., gmacs=4.6, source=_readme),
        'small': dict(params=50., gmacs=8.9, source=_readme),
        'base': dict(params=88., gmacs=15.6, source=_readme),
    }

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 window_size: int = 7,
                 mlp_ratio: float = 4.,
                 conv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 stem_channels: int = 32,
                 local_kernel_size: Optional[int] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 in_chans: int = 3,
                 init_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None):
        super().__init__(out_indices, frozen_stages, norm_eval, with_cp, in_chans, init_cfg, pretrained)
        self.arch_name, cfg = resolve_arch(arch, self.arch_zoo, 'ShuffleTransformer', self.arch_aliases)
        depths, heads, dim = tuple(cfg['depths']), tuple(cfg['num_heads']), int(cfg['embed_dims'])
        if len(depths) != len(heads):
            raise ValueError(f'depths {depths} and num_heads {heads} must have the same length')
        num_stages = len(depths)
        self.embed_dims, self.depths, self.num_heads = dim, depths, heads
        self.window_size = window_size
        self.min_input_size = 4 * 2**(num_stages - 1)
        self._set_out_indices(num_stages)

        self.patch_embed = ShuffleStem(in_chans, stem_channels, dim)
        rates = drop_path_rates(drop_path_rate, depths, 'stage_constant')  # the official rule
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            d = dim * 2**i
            self.stages.append(
                ShuffleStage(dim * 2**max(i - 1, 0), d, depths[i], heads[i], window_size, rates[i],
                             mlp_ratio=mlp_ratio, conv_bias=conv_bias, qk_scale=qk_scale, drop=drop_rate,
                             attn_drop=attn_drop_rate, local_kernel_size=local_kernel_size))
            self.feature_info.append(dict(num_chs=d, reduction=4 * 2**i, module=f'stages.{i}'))

    def _default_init(self):
        """The official initialisation: truncated-normal (std .02) Linear and conv weights, zero biases,
        BatchNorm at 1/0 (the relative position tables keep their own truncated-normal init)."""
        self.apply(init_transformer_weights)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def classifier_param_delta(self) -> int:
        """The official classifier adds global average pooling and a Linear(C4, 1000) head; no final norm."""
        c = self.feature_info[-1]['num_chs']
        return c * 1000 + 1000

    def _stem_and_stages(self):
        return [self.patch_embed] + list(self.stages)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = self.patch_embed(x)
        outs = []
        last = max(self.out_indices)
        for i, stage in enumerate(self.stages):
            if stage.downsample is not None:
                x = stage.downsample(x)
            for blk in stage.blocks:
                x = self.run_block(blk, x)
            if i in self.out_indices:
                outs.append(x.permute(0, 3, 1, 2).contiguous())
            if i >= last:
                break
        return tuple(outs)

    # ------------------------------------------------------------------ checkpoints
    def resize_checkpoint_tensor(self, key: str, value: torch.Tensor) -> Optional[torch.Tensor]:
        if key.endswith('rel_pos.relative_position_bias_table'):
            return self.get_submodule(key.rsplit('.', 1)[0]).resize_state(value)
        if key.endswith('.local.weight'):
            own = self.get_submodule(key.rsplit('.', 1)[0]).weight
            k, src = own.shape[-1], value.shape[-1]
            if value.shape[:2] != own.shape[:2] or k % 2 == 0 or src % 2 == 0 or value.shape[-2] != src:
                return None
            if src < k:  # zero ring around the centre: the same convolution
                return F.pad(value, ((k - src) // 2, ) * 4)
            cut = (src - k) // 2
            return value[..., cut:cut + k, cut:cut + k].clone()
        return None

    def convert_checkpoint(self, sd: Dict[str, torch.Tensor]):
        """Recognise the official layout (``to_token.*``, ``stageN.layers.J.K.*``, 1x1-conv weights) or ours
        (also under a detector's/segmentor's ``backbone.`` prefix). There is no timm, HF transformers or
        OpenMMLab implementation of this model, hence no such layouts."""
        sd = strip_prefix(sd, ('backbone.', ))
        keys = set(sd)
        if any(re.match(r'stage\d+\.layers\.\d+\.\d+\.attn\.to_qkv\.weight$', k) for k in keys):
            return self._from_official(sd)
        if 'patch_embed.conv1.weight' in keys and any(re.match(r'stages\.\d+\.blocks\.\d+\.local\.weight$', k)
                                                      for k in keys):
            return self._from_ours(sd)
        raise CheckpointMismatchError(
            'not a Shuffle Transformer checkpoint: found neither the official layout '
            '(to_token.*, stageN.layers.J.K.attn.to_qkv) nor the vit_backbones one (patch_embed.conv1, '
            f'stages.N.blocks.M.local); first keys: {sorted(keys)[:5]}. Pass a checkpoint of '
            'mulinmeng/Shuffle-Transformer (or of this backbone).')

    @staticmethod
    def _drop_reason(k: str) -> Optional[str]:
        if k.endswith('relative_position_index'):
            return 'buffer recomputed by the model'
        if k.startswith('head.'):
            return 'classification head'
        if k == 'pos_embed':
            return 'fixed sinusoidal position embedding (has_pos_embed, off in the released models)'
        return None

    def _from_ours(self, sd):
        out, dropped = {}, {}
        for k, v in sd.items():
            why = self._drop_reason(k)
            if why:
                dropped[k] = why
            else:
                out[k] = v
        return out, 'vit_backbones', dropped

    def _from_official(self, sd):
        stem = {'conv1.0': 'conv1', 'conv1.1': 'bn1', 'conv2.0': 'conv2', 'conv2.1': 'bn2', 'conv3': 'conv3'}
        out, dropped = {}, {}
        for k, v in sd.items():
            why = self._drop_reason(k)
            if why:
                dropped[k] = why
                continue
            m = re.match(r'to_token\.(conv\d(?:\.\d)?)\.(.+)$', k)
            if m and m.group(1) in stem:
                out[f'patch_embed.{stem[m.group(1)]}.{m.group(2)}'] = v
                continue
            m = re.match(r'stage(\d+)\.patch_partition\.(.+)$', k)
            if m:
                out[f'stages.{int(m.group(1)) - 1}.downsample.{m.group(2)}'] = v
                continue
            m = re.match(r'stage(\d+)\.layers\.(\d+)\.(\d)\.(.+)$', k)
            if m:
                rest = m.group(4)
                rest = {'attn.to_qkv.weight': 'attn.qkv.weight',
                        'attn.relative_position_bias_table': 'attn.rel_pos.relative_position_bias_table'}.get(rest, rest)
                if rest in ('attn.qkv.weight', 'attn.proj.weight', 'mlp.fc1.weight', 'mlp.fc2.weight') and v.ndim == 4:
                    v = v.flatten(1)  # 1x1 conv -> Linear
                out[f'stages.{int(m.group(1)) - 1}.blocks.{2 * int(m.group(2)) + int(m.group(3))}.{rest}'] = v
                continue
            out[k] = v  # unknown: reported by the loader as 'not a parameter of this model'
        return out, 'official', dropped
