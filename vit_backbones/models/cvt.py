"""CvT, the Convolutional vision Transformer (Wu et al., 2021), as a four-level pyramid backbone.

Three stages, each a convolutional token embedding (an overlapping strided convolution, 7x7/4 then
3x3/2 and 3x3/2, followed by a LayerNorm over the tokens) and transformer blocks whose queries, keys and
values come from depthwise-conv + BatchNorm projections of the token grid (keys and values with stride
2); the attention scale is ``dim ** -0.5`` over the whole embedding width. Only the last stage has a
class token: it takes part in the attention but bypasses the convolutional projections, and it is
removed from the output map. No position embedding.

Stage i runs on a ceil(H / s_i) x ceil(W / s_i) grid, s = 4, 8, 16. The stride-32 level that dense
heads expect is derived from the stride-16 map with a parameter-free 2x2 max-pool of stride 2 in
``ceil_mode`` (size ceil(H / 32)), as FPN's extra level or ViTDet's pyramid do: every parameter of the
backbone is then a pretrained one, and the necks (FPN laterals, UperNet) put their own learned
convolutions on top of it.
"""
import re
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checkpoint.loader import CheckpointMismatchError, strip_prefix
from ..checkpoint.rename import any_key_matches, rename_keys
from ..layers import Mlp, PatchEmbed, ceil_max_pool2d, make_drop_path, nlc_to_nchw
from ..layers.conv_proj import ConvProjectionAttention
from ..layers.mlp import QuickGELU
from ..registry import register_backbone
from .base import BaseBackbone, drop_path_rates, init_transformer_weights, resolve_arch

_ACTS = {'quick_gelu': QuickGELU, 'gelu': nn.GELU}


class CvTBlock(nn.Module):
    """Pre-norm residual block: convolutional-projection attention, then an MLP.
    ``forward(x, hw, num_prefix_tokens)`` on (B, P + H*W, C) tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = True, drop: float = 0.,
                 attn_drop: float = 0., drop_path: float = 0., act_layer=QuickGELU, eps: float = 1e-5,
                 kernel_size: int = 3, stride_kv: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = ConvProjectionAttention(dim, num_heads, qkv_bias, kernel_size, 1, stride_kv, kernel_size // 2,
                                            kernel_size // 2, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = make_drop_path(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        x = self.drop_path.add(x, self.attn(self.norm1(x), hw, num_prefix_tokens))
        return self.drop_path.add(x, self.mlp(self.norm2(x)))


class CvTStage(nn.Module):
    """Convolutional token embedding + optional class token + blocks."""

    def __init__(self, patch_embed: PatchEmbed, blocks, cls_token: bool = False):
        super().__init__()
        self.patch_embed = patch_embed
        dim = patch_embed.proj.out_channels
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.blocks = nn.ModuleList(blocks)


@register_backbone
class CvT(BaseBackbone):
    """CvT backbone (registered as ``'CvT'``).

    Args:
        arch: '13' | '21' | 'w24' (also 'cvt-13', 'cvt_21', 'W24'...), or a dict of ``embed_dims``,
            ``depths``, ``num_heads`` and ``mlp_ratio`` (three stages; optionally ``'base': name``).
        act: MLP activation. 'quick_gelu' (default), ``x * sigmoid(1.702 x)``, is what the official
            models were trained with; 'gelu' (exact) matches HF transformers' ``CvtModel``.
        use_cls_token: keep the last stage's class token (default True, as the official models: it
            takes part in every attention of the stage, so the maps depend on it). It is never part of
            the outputs. False drops it (and its checkpoint tensor).
        out_norm: a LayerNorm on each returned level's tokens (``norm0``..``norm2``; level 3 is pooled
            from the normalised stride-16 map), as mmdet's Swin does; these norms are not in the
            classification checkpoints and start at identity (weight 1, bias 0). False returns the raw
            stage outputs (those of the official ``VisionTransformer.forward`` and HF ``CvtModel``).
        qkv_bias: biases of ``proj_q/k/v``.
        drop_rate, attn_drop_rate: dropout after the embeddings and projections / on attention.
        drop_path_rate: stochastic depth as the official code schedules it: per stage, linear from 0
            to the stage's rate; one number is the last stage's rate (official: 0, 0, 0.1), or give one
            rate per stage.
        layer_norm_eps: epsilon of every LayerNorm (1e-5, as the official code and HF).
        out_indices, frozen_stages, norm_eval, with_cp, in_chans, init_cfg, pretrained: see
            :class:`BaseBackbone`. ``frozen_stages=k`` (0..3) freezes the stem (stage 0's token
            embedding) and the first k stages (stage 0's blocks; stages 1 and 2 whole, with their token
            embeddings and class token), each with its output norm. ``norm_eval`` keeps the BatchNorms
            of the q/k/v projections in eval mode.

    Outputs: a tuple of NCHW maps for ``out_indices`` over four levels with strides 4, 8, 16, 32 and
    ``embed_dims[0..2]``, ``embed_dims[2]`` channels; level i has size ceil(H / s_i) x ceil(W / s_i)
    for any H, W >= 32. Level 3 is ``max_pool2d(level 2, 2, 2, ceil_mode=True)``.

    Differences from the official code: the 7x7/4 embedding (padding 2) gives floor((H + 1) / 4) rows,
    one fewer than ceil(H / 4) when H mod 4 is 1 or 2; here the input is zero-padded at the bottom/right
    so the grid is ceil (identical results where H, W mod 4 is 0 or 3; elsewhere identical to the official
    model run on the padded image). The 3x3/2 embeddings and the stride-2 key/value projections already
    give ceil sizes. Stochastic depth follows the official blocks (each residual branch); HF
    transformers' ``CvtLayer`` applies it to the sum after the MLP residual instead (training only).

    Memory: attention is global within a stage, with H/4 x W/4 queries against H/8 x W/8 keys in stage 0,
    so its score matrix grows with the square of the image area (an 800x1216 image: 60800 x 15200
    scores, 3.7 GB in float32 per image). Under training the explicit attention path keeps it for the
    backward pass; ``with_cp=True`` keeps one block's worth at a time.
    """

    arch_zoo: Dict[str, dict] = {
        '13': dict(embed_dims=(64, 192, 384), depths=(1, 2, 10), num_heads=(1, 3, 6), mlp_ratio=4.),
        '21': dict(embed_dims=(64, 192, 384), depths=(1, 4, 16), num_heads=(1, 3, 6), mlp_ratio=4.),
        'w24': dict(embed_dims=(192, 768, 1024), depths=(2, 2, 20), num_heads=(3, 12, 16), mlp_ratio=4.),
    }
    arch_aliases = {**{f'{p}{k}': k for p in ('cvt-', 'cvt_', 'cvt') for k in ('13', '21', 'w24')}}
    paper_table = {
        '13': dict(params=20.0, gmacs=4.5, source='CvT paper Table 2 / official README (224x224)'),
        '21': dict(params=32.0, gmacs=7.1, source='CvT paper Table 2 / official README (224x224)'),
        'w24': dict(params=277.0, gmacs=None,
                    source='CvT paper Table 2 / official README (given at 384x384 only: 193.2 GFLOPs)'),
    }
    dense_only_prefixes = ('norm0.', 'norm1.', 'norm2.')
    _PATCH = ((7, 4, 2), (3, 2, 1), (3, 2, 1))  # kernel, stride, padding of the token embeddings

    def __init__(self,
                 arch: Union[str, dict] = '13',
                 act: str = 'quick_gelu',
                 use_cls_token: bool = True,
                 out_norm: bool = True,
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: Union[float, Sequence[float]] = 0.1,
                 layer_norm_eps: float = 1e-5,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 in_chans: int = 3,
                 init_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None):
        super().__init__(out_indices, frozen_stages, norm_eval, with_cp, in_chans, init_cfg, pretrained)
        self.arch_name, cfg = resolve_arch(arch, self.arch_zoo, 'CvT', self.arch_aliases)
        dims, depths, heads = tuple(cfg['embed_dims']), tuple(cfg['depths']), tuple(cfg['num_heads'])
        if not len(dims) == len(depths) == len(heads) == 3:
            raise ValueError(f'CvT arch: embed_dims, depths and num_heads need three entries (three stages), got {cfg}')
        for d, h in zip(dims, heads):
            if d % h:
                raise ValueError(f'CvT arch: embed dim {d} is not divisible by {h} heads')
        if act not in _ACTS:
            raise ValueError(f"CvT act must be one of {sorted(_ACTS)}, got {act!r} ('quick_gelu' is the official "
                             "models' activation, 'gelu' HF transformers')")
        self.embed_dims, self.depths, self.num_heads = dims, depths, heads
        self.mlp_ratio = float(cfg['mlp_ratio'])
        self.act, self.use_cls_token, self.out_norm = act, use_cls_token, out_norm
        self._set_out_indices(4)
        dpr = drop_path_rates(drop_path_rate, depths, 'stage_linear')
        norm = partial(nn.LayerNorm, eps=layer_norm_eps)
        self.embed_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.stages = nn.ModuleList()
        in_ch = self.in_chans
        for i in range(3):
            k, s, p = self._PATCH[i]
            blocks = [
                CvTBlock(dims[i], heads[i], self.mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i][j],
                         _ACTS[act], layer_norm_eps) for j in range(depths[i])
            ]
            self.stages.append(CvTStage(PatchEmbed(in_ch, dims[i], k, s, p, norm_layer=norm), blocks,
                                        cls_token=use_cls_token and i == 2))
            in_ch = dims[i]
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2**i, module=f'stages.{i}') for i in range(3)]
        self.feature_info.append(dict(num_chs=dims[2], reduction=32, module='stages.2 (max-pool 2x2/2)'))
        if out_norm:
            for i in self._needed:
                self.add_module(f'norm{i}', norm(dims[i]))

    @property
    def _needed(self) -> List[int]:
        """The stage maps the returned levels need (level 3 is pooled from level 2)."""
        return sorted({min(i, 2) for i in self.out_indices})

    def _unavailable_intermediates(self):
        return self._levels_without({i: f'norm{min(i, 2)}' for i in range(4)}) if self.out_norm else {}

    # ------------------------------------------------------------------ model zoo
    def classifier_param_delta(self) -> int:
        """The classifier's final LayerNorm and ImageNet-1k head (and the class token if dropped)."""
        c = self.embed_dims[-1]
        return 2 * c + c * 1000 + 1000 + (0 if self.use_cls_token else c)

    # ------------------------------------------------------------------ init / freezing
    def _default_init(self):
        self.apply(init_transformer_weights)
        cls = self.stages[2].cls_token
        if cls is not None and cls.device.type != 'meta':
            nn.init.trunc_normal_(cls, std=.02)

    def _stem_and_stages(self):
        units = [nn.ModuleList([self.stages[0].patch_embed])]
        for i, stage in enumerate(self.stages):
            parts = [stage] if i else [stage.blocks]
            if hasattr(self, f'norm{i}'):
                parts.append(getattr(self, f'norm{i}'))
            units.append(nn.ModuleList(parts))
        return units

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        maps = {}
        last = self._needed[-1]
        for i, stage in enumerate(self.stages):
            t = stage.patch_embed(x)  # NHWC, ceil(H / s) x ceil(W / s)
            b, h, w, c = t.shape
            t = t.reshape(b, h * w, c)
            npfx = 0
            if stage.cls_token is not None:
                t = torch.cat([stage.cls_token.expand(b, -1, -1), t], dim=1)
                npfx = 1
            t = self.embed_drop(t)  # official: dropout after the class token joins
            for blk in stage.blocks:
                t = self.run_block(blk, t, (h, w), npfx)
            t = t[:, npfx:]
            if i in self._needed:
                maps[i] = nlc_to_nchw(getattr(self, f'norm{i}')(t) if self.out_norm else t, (h, w))
            if i == last:
                break
            x = nlc_to_nchw(t, (h, w))
        if 3 in self.out_indices:
            maps[3] = ceil_max_pool2d(maps[2], 2)
        return tuple(maps[i] for i in self.out_indices)

    # ------------------------------------------------------------------ checkpoints
    def optional_checkpoint_keys(self):
        return [k for k, _ in self.named_parameters() if k.startswith(self.dense_only_prefixes)]

    @staticmethod
    def _layout(sd) -> str:
        keys = list(sd)

        def has(pat):
            return any_key_matches(keys, pat)

        if has(r'stages\.\d+\.blocks\.\d+\.attn\.conv_proj_q\.'):
            return 'vit_backbones'
        if has(r'stage\d+\.blocks\.\d+\.attn\.conv_proj_q\.'):
            return 'official'
        if has(r'encoder\.stages\.\d+\.layers\.\d+\.attention\.attention\.convolution_projection_query\.'):
            return 'hf'
        raise CheckpointMismatchError(
            'not a CvT checkpoint: found no convolutional q/k/v projection (official stageN.blocks.M.attn.conv_proj_q, '
            'HF transformers encoder.stages.N.layers.M.attention.attention.convolution_projection_query, or '
            f'vit_backbones stages.N.blocks.M.attn.conv_proj_q); first keys: {sorted(keys)[:5]}')

    def convert_checkpoint(self, sd: Dict[str, torch.Tensor]):
        sd = strip_prefix(sd, ('backbone.', ))
        for p in ('module.', 'cvt.'):  # DDP wrappers, HF CvtForImageClassification
            if any(k.startswith(p) for k in sd):
                sd = {k[len(p):] if k.startswith(p) else k: v for k, v in sd.items()}
        fmt = self._layout(sd)
        if fmt == 'vit_backbones':
            return dict(sd), fmt, {}
        official = _hf_to_official(sd) if fmt == 'hf' else dict(sd)
        out, dropped = {}, {}
        for k, v in official.items():
            if k.startswith('head.'):
                dropped[k] = 'classification head'
                continue
            if k.startswith('norm.'):
                dropped[k] = 'final classification norm (applied to the class token only)'
                continue
            m = re.match(r'stage(\d+)\.(.*)$', k)
            if not m:
                out[k] = v  # unknown: reported as 'not a parameter of this model'
                continue
            nk = f'stages.{m.group(1)}.{m.group(2)}'
            if m.group(2) == 'cls_token' and (int(m.group(1)) >= 3 or self.stages[int(m.group(1))].cls_token is None):
                dropped[k] = 'class token (the backbone has none; use_cls_token=True keeps it)'
                continue
            out[nk] = v
        return out, fmt, dropped


# ---------------------------------------------------------------------- HF transformers -> official names
_HF_OUTER = [
    (r'^encoder\.stages\.(\d+)\.embedding\.convolution_embeddings\.projection\.', r'stage\1.patch_embed.proj.'),
    (r'^encoder\.stages\.(\d+)\.embedding\.convolution_embeddings\.normalization\.', r'stage\1.patch_embed.norm.'),
    (r'^encoder\.stages\.(\d+)\.cls_token$', r'stage\1.cls_token'),
    (r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.', r'stage\1.blocks.\2.'),
    (r'^layernorm\.', 'norm.'),
    (r'^classifier\.', 'head.'),
]
_HF_INNER = [
    (r'\.attention\.attention\.convolution_projection_(query|key|value)\.convolution_projection\.convolution\.',
     lambda m: f'.attn.conv_proj_{m.group(1)[0]}.conv.'),
    (r'\.attention\.attention\.convolution_projection_(query|key|value)\.convolution_projection\.normalization\.',
     lambda m: f'.attn.conv_proj_{m.group(1)[0]}.bn.'),
    (r'\.attention\.attention\.projection_(query|key|value)\.', lambda m: f'.attn.proj_{m.group(1)[0]}.'),
    (r'\.attention\.output\.dense\.', '.attn.proj.'),
    (r'\.layernorm_before\.', '.norm1.'),
    (r'\.layernorm_after\.', '.norm2.'),
    (r'\.intermediate\.dense\.', '.mlp.fc1.'),
    (r'(\.blocks\.\d+)\.output\.dense\.', r'\1.mlp.fc2.'),
]


def _hf_to_official(sd):
    return rename_keys(sd, _HF_OUTER + _HF_INNER)[0]
