"""Swin Transformer (Liu et al., 2021) as a four-level pyramid backbone.

Layout follows the official detection/segmentation code: NHWC maps inside, window attention with a
relative position bias, shifted windows on odd blocks, inputs padded at the bottom/right to a multiple of
the window before the cyclic shift, patch merging between stages, and a LayerNorm per returned level
applied to the stage output *before* merging. Any H, W works: the patch embedding, window attention
and patch merging pad as needed, and level i has size ceil(H / 2^(i+2)) x ceil(W / 2^(i+2)).
"""
import re
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checkpoint.loader import CheckpointMismatchError, strip_prefix
from ..checkpoint.rename import rename_keys, unwrap_keys
from ..layers import Mlp, PatchEmbed, WindowAttention, make_drop_path, window_plan
from ..layers.tracing import ceil_div, is_symbolic, refuse_static_trace, symbolic_tracing
from ..layers.window import shift_mask
from ..registry import register_backbone
from .base import BaseBackbone, drop_path_rates, resolve_arch


class SwinBlock(nn.Module):
    """(Shifted-)window attention + MLP, pre-norm residual, on raster tokens (B, H*W, C)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0., clamp_window: bool = False):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f'shift_size {shift_size} must be in [0, window_size={window_size})')
        self.window_size = window_size
        self.shift_size = shift_size
        self.clamp_window = clamp_window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, (window_size, window_size), qkv_bias=qkv_bias, qk_scale=qk_scale,
                                    attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = make_drop_path(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def _attend(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        ws, shift = self.window_size, self.shift_size
        if self.clamp_window:
            if is_symbolic(*hw):
                raise RuntimeError('Swin(clamp_window=True) chooses the window from the map size, which a graph with '
                                   'symbolic sizes cannot do; export it with static shapes, or use clamp_window=False '
                                   '(the detection rule, the same whenever every map exceeds the window)')
            refuse_static_trace('the clamped window size')
        if self.clamp_window and min(hw) <= ws:
            # the classification model's rule: one window covers the map, no shift
            ws, shift = min(hw), 0
        window = (ws, ws)
        # pad (bottom/right) -> cyclic shift -> partition, as one gather (cached per size in eager mode)
        plan = window_plan(tuple(hw), window, (shift, shift), x.device)
        mask = shift_mask(plan) if shift else None
        return self.attn(x, plan, mask)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = self.drop_path.add(x, self._attend(self.norm1(x), hw))
        return self.drop_path.add(x, self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (official channel order: (0,0), (1,0), (0,1), (1,1)) -> LN(4C) -> Linear(4C, 2C).

    Odd H or W is zero-padded at the bottom/right.
    """

    def __init__(self, dim: int, out_dim: Optional[int] = None):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(B, H*W, C) tokens -> (B, ceil(H/2)*ceil(W/2), 2C) tokens and the new grid."""
        b, _, c = x.shape
        h, w = hw
        x = x.view(b, h, w, c)
        refuse_static_trace('the patch-merging padding')
        h2, w2 = ceil_div(h, 2), ceil_div(w, 2)
        if symbolic_tracing() or h % 2 or w % 2:  # traced: no branch on the sizes (a zero-width pad is a no-op)
            x = nn.functional.pad(x, (0, 0, 0, 2 * w2 - w, 0, 2 * h2 - h))
        x = x.view(b, h2, 2, w2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h2 * w2, 4 * c)
        return self.reduction(self.norm(x)), (h2, w2)


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, drop_paths: Sequence[float],
                 downsample: bool, **block_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, drop_path=drop_paths[i],
                      **block_kwargs) for i in range(depth)
        ])
        self.downsample = PatchMerging(dim) if downsample else None


def _unfold_to_official(t: torch.Tensor) -> torch.Tensor:
    """mmdet's nn.Unfold channel order (c-major, (0,0),(0,1),(1,0),(1,1)) -> official order."""
    lead = t.shape[:-1]
    c = t.shape[-1] // 4
    t = t.reshape(*lead, c, 4).transpose(-1, -2)  # (..., 4, C) in unfold kernel order
    return t[..., [0, 2, 1, 3], :].reshape(*lead, 4 * c)


@register_backbone
class Swin(BaseBackbone):
    """Swin Transformer backbone (registered as ``'Swin'``; mmdet's/mmseg's ``SwinTransformer`` stay usable).

    Args:
        arch: 'tiny' | 'small' | 'base' | 'large' (or 't', 's', 'b', 'l'), or a dict of ``embed_dims``,
            ``depths``, ``num_heads`` (optionally with ``'base': name`` to override a variant).
        window_size: attention window (7 for the 224 models, 12 for the 384 models). A checkpoint with a
            different window has its relative position bias tables resized bicubically on load.
        mlp_ratio, qkv_bias, qk_scale: block hyper-parameters.
        drop_rate, attn_drop_rate: dropout after projections / on attention.
        drop_path_rate: stochastic depth, increasing linearly over all blocks from 0 (as in the paper).
        patch_size: patch embedding stride.
        clamp_window: when a stage's map is no larger than the window, use one window of the map's
            size and no shift (the official *classification* model's rule, also HF ``SwinModel``).
            Default False: the detection/segmentation rule (mmdet, official det code) which pads to a
            full window and keeps the shift. The two agree whenever every map exceeds the window.
        out_indices, frozen_stages, norm_eval, with_cp, in_chans, init_cfg, pretrained: see
            :class:`BaseBackbone`. ``frozen_stages=k`` freezes the patch embedding and stages 0..k-1
            (with their output norms).

    Outputs: a tuple of NCHW maps for ``out_indices``; level i has ``embed_dims * 2**i`` channels and
    stride ``patch_size * 2**i``.
    """

    arch_zoo = {
        'tiny': dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
        'small': dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
        'base': dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
        'large': dict(embed_dims=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    }
    arch_aliases = {'t': 'tiny', 's': 'small', 'b': 'base', 'l': 'large', 'swin-t': 'tiny', 'swin-s': 'small',
                    'swin-b': 'base', 'swin-l': 'large'}
    #: official README / paper Table 1 (224x224, ImageNet-1k classifier; Swin-T 28.3M is timm's exact count
    #: of the README's 28M); FLOPs there are multiply-accumulates.
    paper_table = {
        'tiny': dict(params=28.3, gmacs=4.5, source='Swin README / paper Table 1 (224)'),
        'small': dict(params=50., gmacs=8.7, source='Swin README / paper Table 1 (224)'),
        'base': dict(params=88., gmacs=15.4, source='Swin README / paper Table 1 (224)'),
        'large': dict(params=197., gmacs=34.5, source='Swin README (22k->1k, 224)'),
    }

    @property
    def dense_only_prefixes(self) -> Tuple[str, ...]:
        """The per-level output norms of all but the last stage (the last one plays the final norm)."""
        return tuple(f'norm{i}.' for i in range(len(self.depths) - 1))

    def classifier_param_delta(self) -> int:
        """ImageNet-1k head on the last stage (plus the final norm when ``norm{last}`` is not built)."""
        last = len(self.depths) - 1
        c = self.embed_dims * 2**last
        return c * 1000 + 1000 + (0 if hasattr(self, f'norm{last}') else 2 * c)

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 window_size: int = 7,
                 mlp_ratio: float = 4.,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 patch_size: int = 4,
                 clamp_window: bool = False,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 in_chans: int = 3,
                 init_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None):
        super().__init__(out_indices, frozen_stages, norm_eval, with_cp, in_chans, init_cfg, pretrained)
        self.arch_name, cfg = resolve_arch(arch, self.arch_zoo, 'Swin', self.arch_aliases)
        depths, heads, dim = tuple(cfg['depths']), tuple(cfg['num_heads']), int(cfg['embed_dims'])
        if len(depths) != len(heads):
            raise ValueError(f'depths {depths} and num_heads {heads} must have the same length')
        num_stages = len(depths)
        self.embed_dims = dim
        self.depths = depths
        self.window_size = window_size
        self.patch_size = patch_size
        self.min_input_size = patch_size * 2**(num_stages - 1)
        self._set_out_indices(num_stages)

        self.patch_embed = PatchEmbed(in_chans, dim, patch_size, norm_layer=nn.LayerNorm)
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        dpr = drop_path_rates(drop_path_rate, depths, 'linear')
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            d = dim * 2**i
            self.stages.append(
                SwinStage(d, depths[i], heads[i], window_size, dpr[i], downsample=i < num_stages - 1,
                          mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                          attn_drop=attn_drop_rate, clamp_window=clamp_window))
            self.feature_info.append(dict(num_chs=d, reduction=patch_size * 2**i, module=f'stages.{i}'))
        for i in self.out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(dim * 2**i))

    def _unavailable_intermediates(self):
        return self._levels_without({i: f'norm{i}' for i in range(len(self.stages))})

    def _stem_and_stages(self):
        units = [nn.ModuleList([self.patch_embed])]
        for i, stage in enumerate(self.stages):
            units.append(nn.ModuleList([stage] + ([getattr(self, f'norm{i}')] if i in self.out_indices else [])))
        return units

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = self.pos_drop(self.patch_embed(x))
        b, h, w, c = x.shape
        hw = (h, w)
        x = x.reshape(b, h * w, c)
        outs = []
        for i, stage in enumerate(self.stages):
            for blk in stage.blocks:
                x = self.run_block(blk, x, hw)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(x)
                outs.append(out.view(b, *hw, -1).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                if i >= max(self.out_indices):
                    break
                x, hw = stage.downsample(x, hw)
        return tuple(outs)

    # ------------------------------------------------------------------ checkpoints
    def optional_checkpoint_keys(self):
        # classification checkpoints have no per-level output norms
        return [k for k, _ in self.named_parameters() if re.match(r'norm\d+\.', k)]

    def resize_checkpoint_tensor(self, key: str, value: torch.Tensor) -> Optional[torch.Tensor]:
        if key.endswith('rel_pos.relative_position_bias_table'):
            module = self.get_submodule(key.rsplit('.', 1)[0])
            return module.resize_state(value)
        return None

    def convert_checkpoint(self, sd: Dict[str, torch.Tensor]):
        sd = strip_prefix(sd, ('backbone.', ))
        sd = unwrap_keys(sd, ('swin.', ))  # HF task models
        keys = set(sd)
        if any('rel_pos.relative_position_bias_table' in k for k in keys) and any(k.startswith('stages.') for k in keys):
            return self._from_ours(sd)
        if any('.attn.w_msa.' in k for k in keys):
            return self._from_mmdet(sd)
        if any(re.match(r'encoder\.layers\.\d+\.blocks\.\d+\.', k) for k in keys):
            return self._from_hf(sd)
        if any(re.match(r'layers\.\d+\.blocks\.\d+\.attn\.qkv\.weight', k) for k in keys):
            official = any(k.startswith('layers.0.downsample.') for k in keys)
            return self._from_official(sd, timm_layout=not official)
        raise CheckpointMismatchError(
            'not a Swin checkpoint: found none of the official/timm (layers.N.blocks.M.attn.qkv), HF '
            '(embeddings.patch_embeddings / encoder.layers), mmdet (attn.w_msa) or vit_backbones layouts; '
            f'first keys: {sorted(keys)[:5]}')

    @staticmethod
    def _drop_reason(k: str) -> Optional[str]:
        if k.endswith(('relative_position_index', 'attn_mask')):
            return 'buffer recomputed by the model'
        if k.startswith(('head.', 'classifier.', 'fc.')):
            return 'classification head'
        if k.startswith(('norm.', 'layernorm.')):
            return 'final classification norm (the backbone has norm0..norm3 per level)'
        if 'absolute_pos_embed' in k or k.startswith('embeddings.position_embeddings'):
            return 'absolute position embedding (not used by the released Swin models)'
        if k.startswith('embeddings.mask_token'):
            return 'masked-image-modeling token'
        return None

    def _rename(self, sd, rules, fmt):
        out, dropped = rename_keys(sd, rules, self._drop_reason)
        return out, fmt, dropped

    def _from_ours(self, sd):
        return self._rename(sd, [], 'vit_backbones')

    def _from_official(self, sd, timm_layout: bool):
        rules = [(r'^layers\.', 'stages.'), (r'attn\.relative_position_bias_table', 'attn.rel_pos.relative_position_bias_table')]
        if timm_layout:  # timm puts the merging at the start of the next stage
            rules.insert(0, (r'^layers\.(\d+)\.downsample\.', lambda m: f'layers.{int(m.group(1)) - 1}.downsample.'))
        return self._rename(sd, rules, 'timm' if timm_layout else 'official')

    def _from_mmdet(self, sd):
        rules = [(r'^patch_embed\.projection\.', 'patch_embed.proj.'), (r'\.attn\.w_msa\.relative_position_bias_table',
                                                                      '.attn.rel_pos.relative_position_bias_table'),
                 (r'\.attn\.w_msa\.', '.attn.'), (r'\.ffn\.layers\.0\.0\.', '.mlp.fc1.'), (r'\.ffn\.layers\.1\.', '.mlp.fc2.')]
        out, fmt, dropped = self._rename(sd, rules, 'mmdet')
        for k in list(out):
            if re.match(r'stages\.\d+\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$', k):
                out[k] = _unfold_to_official(out[k])
        return out, fmt, dropped

    def _from_hf(self, sd):
        blk = r'^encoder\.layers\.(\d+)\.blocks\.(\d+)\.'
        rules = [
            (r'^embeddings\.patch_embeddings\.projection\.', 'patch_embed.proj.'),
            (r'^embeddings\.norm\.', 'patch_embed.norm.'),
            (r'^hidden_states_norms\.stage(\d+)\.', lambda m: f'norm{int(m.group(1)) - 1}.'),
            (blk + r'layernorm_before\.', r'stages.\1.blocks.\2.norm1.'),
            (blk + r'layernorm_after\.', r'stages.\1.blocks.\2.norm2.'),
            (blk + r'attention\.(self\.|relative_position_bias\.)relative_position_bias_table',
             r'stages.\1.blocks.\2.attn.rel_pos.relative_position_bias_table'),
            (blk + r'attention\.(output\.dense|o_proj)\.', r'stages.\1.blocks.\2.attn.proj.'),
            (blk + r'(intermediate\.dense|mlp\.fc1)\.', r'stages.\1.blocks.\2.mlp.fc1.'),
            (blk + r'(output\.dense|mlp\.fc2)\.', r'stages.\1.blocks.\2.mlp.fc2.'),
            (blk + r'attention\.(self\.query|q_proj)\.', r'stages.\1.blocks.\2.attn.q.'),
            (blk + r'attention\.(self\.key|k_proj)\.', r'stages.\1.blocks.\2.attn.k.'),
            (blk + r'attention\.(self\.value|v_proj)\.', r'stages.\1.blocks.\2.attn.v.'),
            (r'^encoder\.layers\.(\d+)\.downsample\.', r'stages.\1.downsample.'),
        ]
        out, fmt, dropped = self._rename(sd, rules, 'hf')
        for k in [k for k in out if k.endswith('.attn.q.weight') or k.endswith('.attn.q.bias')]:
            base, kind = k.rsplit('.attn.q.', 1)
            parts = [out.pop(f'{base}.attn.{p}.{kind}') for p in 'qkv']
            out[f'{base}.attn.qkv.{kind}'] = torch.cat(parts, 0)
        return out, fmt, dropped
