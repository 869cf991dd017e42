"""Pyramid Vision Transformer v1 (Wang et al., 2021a) and v2 (Wang et al., 2021b) as four-level pyramid
backbones.

Both are four stages of (patch embedding -> transformer blocks with spatial-reduction attention) on
raster token sequences; stage i runs on a ceil(H / 2^(i+2)) x ceil(W / 2^(i+2)) grid.

- **PVT v2** (``'PVTv2'``): overlapping patch embeddings (7x7 stride 4, then 3x3 stride 2), no position
  embedding, a depthwise 3x3 convolution inside the MLP, a LayerNorm closing every stage (its output is
  the level's map and the next stage's input). ``b2_li`` uses linear SRA (7x7 average pool) and a ReLU
  after ``fc1``, as the official b2-li model.
- **PVT v1** (``'PVT'``): non-overlapping patch embeddings (4x4, then 2x2), a learned absolute position
  embedding per stage, resampled bilinearly to the runtime grid in every forward pass; a plain MLP.

Any H, W >= 32 works. Where a side is not a multiple of a patch embedding's stride, the input of that
embedding is zero-padded at the bottom/right so the grid is ``ceil`` (PVT v2's padded convolutions give
the same grid without padding; the official PVT v1 code instead drops the remainder, see :class:`PVT`).
"""
import re
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.loader import CheckpointMismatchError, strip_prefix
from ..checkpoint.rename import unwrap_keys
from ..layers import Mlp, PatchEmbed, make_drop_path, nlc_to_nchw, resample_abs_pos_embed
from ..layers.sra import SpatialReductionAttention
from ..registry import register_backbone
from .base import BaseBackbone, drop_path_rates, init_transformer_weights, resolve_arch
from .pvt_convert import official_to_ours, to_official

_WIDE = (64, 128, 320, 512)
_HEADS = (1, 2, 5, 8)


class _LinearReLU(nn.Linear):
    """``fc1`` of the linear-SRA MLP (PVT v2 b2-li): a Linear followed by a ReLU, under the same keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class PVTBlock(nn.Module):
    """Pre-norm residual block: spatial-reduction attention, then an MLP (with a depthwise 3x3 conv on
    the token grid for PVT v2). ``forward(x, hw)`` on (B, N, C) tokens of an (H, W) grid."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, linear: bool = False,
                 conv_mlp: bool = False, qkv_bias: bool = True, qk_scale: Optional[float] = None, drop: float = 0.,
                 attn_drop: float = 0., drop_path: float = 0., eps: float = 1e-6, sr_eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, linear=linear, qkv_bias=qkv_bias,
                                              qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop, norm_eps=sr_eps)
        self.drop_path = make_drop_path(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = Mlp(dim, hidden, drop=drop, dwconv=conv_mlp)
        if linear:
            self.mlp.fc1 = _LinearReLU(dim, hidden)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = self.drop_path.add(x, self.attn(self.norm1(x), hw))
        return self.drop_path.add(x, self.mlp(self.norm2(x), hw))


class PVTStage(nn.Module):
    """Patch embedding (+ v1 position embedding / class token) + blocks (+ v2 stage norm)."""

    def __init__(self, patch_embed: PatchEmbed, blocks: List[PVTBlock], norm: Optional[nn.Module] = None,
                 pos_grid: Optional[Tuple[int, int]] = None, cls_token: bool = False):
        super().__init__()
        self.patch_embed = patch_embed
        dim = patch_embed.proj.out_channels
        self.pos_grid = pos_grid
        self.num_prefix_tokens = int(cls_token)
        self.pos_embed = None if pos_grid is None else nn.Parameter(
            torch.zeros(1, self.num_prefix_tokens + pos_grid[0] * pos_grid[1], dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm


_COMMON_DOC = """
        out_indices, frozen_stages, norm_eval, with_cp, in_chans, init_cfg, pretrained: see
            :class:`BaseBackbone`. The stem is stage 0's patch embedding (with its position embedding in
            v1); stage i is its blocks and norms, and for i > 0 its own patch embedding (the
            downsampling at its start).
"""


class _PyramidVisionTransformer(BaseBackbone):
    """What PVT v1 and v2 share: stages, forward loop, freezing, init and checkpoint layouts."""

    version = 0
    arch_zoo: Dict[str, dict] = {}
    arch_aliases: Dict[str, str] = {}

    def _build(self, cfg: dict, patch_sizes, strides, paddings, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
               drop_path_rate, layer_norm_eps, pos_grids=None, cls_token=False, stage_norm=False, conv_mlp=False):
        dims, depths = tuple(cfg['embed_dims']), tuple(cfg['depths'])
        heads, mlp_ratios, srs = tuple(cfg['num_heads']), tuple(cfg['mlp_ratios']), tuple(cfg['sr_ratios'])
        linear = bool(cfg.get('linear', False))
        n = len(depths)
        if not all(len(t) == n for t in (dims, heads, mlp_ratios, srs)):
            raise ValueError(f'{type(self).__name__} arch: embed_dims, depths, num_heads, mlp_ratios and sr_ratios '
                             f'need one entry per stage, got {cfg}')
        for d, h in zip(dims, heads):
            if d % h:
                raise ValueError(f'{type(self).__name__} arch: embed dim {d} is not divisible by {h} heads')
        self.embed_dims, self.depths, self.num_heads = dims, depths, heads
        self.mlp_ratios, self.sr_ratios, self.linear = mlp_ratios, srs, linear
        block_eps = 1e-6 if layer_norm_eps is None else layer_norm_eps
        aux_eps = 1e-5 if layer_norm_eps is None else layer_norm_eps  # official: default-eps LN in embeds and SRA
        self.min_input_size = max(32, 4 * 2**(n - 1))
        self._set_out_indices(n)
        dpr = drop_path_rates(drop_path_rate, depths, 'linear')
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.stages = nn.ModuleList()
        self.feature_info = []
        stride, in_ch = 1, self.in_chans
        for i in range(n):
            stride *= strides[i]
            embed = PatchEmbed(in_ch, dims[i], patch_sizes[i], strides[i], paddings[i],
                               norm_layer=partial(nn.LayerNorm, eps=aux_eps))
            blocks = [
                PVTBlock(dims[i], heads[i], mlp_ratios[i], srs[i], linear=linear, conv_mlp=conv_mlp, qkv_bias=qkv_bias,
                         qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i][j],
                         eps=block_eps, sr_eps=aux_eps) for j in range(depths[i])
            ]
            self.stages.append(
                PVTStage(embed, blocks, nn.LayerNorm(dims[i], eps=block_eps) if stage_norm else None,
                         pos_grid=None if pos_grids is None else pos_grids[i], cls_token=cls_token and i == n - 1))
            self.feature_info.append(dict(num_chs=dims[i], reduction=stride, module=f'stages.{i}'))
            in_ch = dims[i]
        self._block_eps = block_eps

    # ------------------------------------------------------------------ init / freezing
    @staticmethod
    def _init_conv_and_pos(m: nn.Module):
        if isinstance(m, nn.Conv2d):  # the official PVT init (fan-out normal)
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, (2.0 / fan_out)**0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, PVTStage):
            for p in (m.pos_embed, m.cls_token):
                if p is not None:
                    nn.init.trunc_normal_(p, std=.02)

    def _default_init(self):
        self.apply(init_transformer_weights)
        self.apply(self._init_conv_and_pos)

    def _stem_and_stages(self):
        units = [nn.ModuleList([self.stages[0].patch_embed])]
        for i, stage in enumerate(self.stages):
            parts = [stage] if i else [stage.blocks] + ([stage.norm] if stage.norm is not None else [])
            if hasattr(self, f'norm{i}'):
                parts.append(getattr(self, f'norm{i}'))
            units.append(nn.ModuleList(parts))
        return units

    def _freeze_stages(self):
        super()._freeze_stages()
        if self.frozen_stages >= 0:  # parameters held by stage modules directly
            if self.frozen_stages >= 1:
                self.stages[0].eval()
            for i, stage in enumerate(self.stages):
                for p in (stage.pos_embed, stage.cls_token):
                    if p is not None and (i == 0 or i < self.frozen_stages):
                        p.requires_grad = False

    # ------------------------------------------------------------------ forward
    def _output(self, i: int, tokens: torch.Tensor, fmap: torch.Tensor) -> torch.Tensor:
        return fmap

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outs = []
        last = max(self.out_indices)
        for i, stage in enumerate(self.stages):
            t = stage.patch_embed(x)  # NHWC
            b, h, w, c = t.shape
            hw = (h, w)
            t = t.reshape(b, h * w, c)
            if stage.pos_embed is not None:
                pos = resample_abs_pos_embed(stage.pos_embed, hw, stage.pos_grid, stage.num_prefix_tokens, 'bilinear')
                if stage.cls_token is not None:
                    t = torch.cat([stage.cls_token.expand(b, -1, -1), t], dim=1)
                t = self.pos_drop(t + pos)
            for blk in stage.blocks:
                t = self.run_block(blk, t, hw)
            if stage.cls_token is not None:
                t = t[:, 1:]
            if stage.norm is not None:
                t = stage.norm(t)
            x = nlc_to_nchw(t, hw)
            if i in self.out_indices:
                outs.append(self._output(i, t, x))
            if i == last:
                break
        return tuple(outs)

    # ------------------------------------------------------------------ checkpoints
    def resize_checkpoint_tensor(self, key: str, value: torch.Tensor) -> Optional[torch.Tensor]:
        m = re.match(r'stages\.(\d+)\.pos_embed$', key)
        if not m or value.ndim != 3:
            return None
        stage = self.stages[int(m.group(1))]
        n = value.shape[1]
        side = int(round(n**0.5))
        pfx = 0 if side * side == n else 1
        side = int(round((n - pfx)**0.5))
        if side * side != n - pfx or pfx < stage.num_prefix_tokens:
            return None
        grid = resample_abs_pos_embed(value[:, pfx:], stage.pos_grid, (side, side), 0, 'bilinear')
        return torch.cat([value[:, :1], grid], 1) if stage.num_prefix_tokens else grid

    def convert_checkpoint(self, sd: Dict[str, torch.Tensor]):
        sd = unwrap_keys(strip_prefix(sd, ('backbone.', )), ('module.', 'pvt_v2.', 'pvt.'))  # DDP, HF task models
        official, fmt = to_official(sd)
        if official is None:
            return dict(sd), fmt, {}
        is_v1 = any(re.match(r'pos_embed\d', k) for k in official)
        is_v2 = any('.mlp.dwconv.' in k for k in official)
        name = type(self).__name__
        if self.version == 2 and is_v1 and not is_v2:
            raise CheckpointMismatchError(f'this is a PVT v1 checkpoint (per-stage pos_embed, no depthwise conv in '
                                          f'the MLP), not one of {name}: build the backbone as type="PVT"')
        if self.version == 1 and is_v2:
            raise CheckpointMismatchError(f'this is a PVT v2 checkpoint (depthwise conv in the MLP), not one of '
                                          f'{name}: build the backbone as type="PVTv2"')
        return official_to_ours(self, official, fmt)


# ---------------------------------------------------------------------- PVT v2
@register_backbone
class PVTv2(_PyramidVisionTransformer):
    """PVT v2 backbone (registered as ``'PVTv2'``; mmdet's ``PyramidVisionTransformerV2`` stays usable).

    Args:
        arch: 'b0' | 'b1' | 'b2' | 'b2_li' | 'b3' | 'b4' | 'b5' (also 'pvt_v2_b2', 'b2-li'...), or a dict of
            ``embed_dims``, ``depths``, ``num_heads``, ``mlp_ratios``, ``sr_ratios``, ``linear`` (optionally
            with ``'base': name`` to override a variant).
        qkv_bias, qk_scale: attention projections.
        drop_rate, attn_drop_rate: dropout after projections / on attention.
        drop_path_rate: stochastic depth, linear over all blocks from 0.
        layer_norm_eps: None (default) follows the official code: 1e-6 in the blocks and stage norms, 1e-5
            in the patch embeddings and the SRA reduction norms. A number sets every LayerNorm (HF
            transformers and mmdet use 1e-6 everywhere).
""" + _COMMON_DOC + """
    Outputs: a tuple of NCHW maps for ``out_indices``, each after its stage's LayerNorm; level i has
    ``embed_dims[i]`` channels, stride ``4 * 2**i`` and size ceil(H / stride) x ceil(W / stride).
    Differences from the official code: none in the computation (the 7/3 convs with padding 3/1 give the
    ceil grid). Spatial reduction on a grid that is not a multiple of ``sr_ratio`` drops the remainder,
    as the official strided convolution does.
    """

    version = 2
    _b = dict(embed_dims=_WIDE, num_heads=_HEADS, mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1), linear=False)
    arch_zoo = {
        'b0': dict(_b, embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
        'b1': dict(_b, depths=(2, 2, 2, 2)),
        'b2': dict(_b, depths=(3, 4, 6, 3)),
        'b2_li': dict(_b, depths=(3, 4, 6, 3), linear=True),
        'b3': dict(_b, depths=(3, 4, 18, 3)),
        'b4': dict(_b, depths=(3, 8, 27, 3)),
        'b5': dict(_b, depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
    }
    del _b
    arch_aliases = {'b2-li': 'b2_li', 'b2li': 'b2_li', **{f'pvt_v2_{k}': k for k in
                                                           ('b0', 'b1', 'b2', 'b2_li', 'b3', 'b4', 'b5')},
                    **{f'pvt-v2-{k}': k for k in ('b0', 'b1', 'b2', 'b3', 'b4', 'b5')}, 'pvt-v2-b2-li': 'b2_li'}
    #: whai362/PVT README (params, ImageNet-1k classifier) and timm's results csv (GMACs at 224)
    paper_table = {
        'b0': dict(params=3.7, gmacs=0.57, source='PVT README / timm csv'),
        'b1': dict(params=14.0, gmacs=2.12, source='PVT README / timm csv'),
        'b2': dict(params=25.4, gmacs=4.05, source='PVT README / timm csv'),
        'b2_li': dict(params=22.6, gmacs=3.91, source='PVT README / timm csv'),
        'b3': dict(params=45.2, gmacs=6.92, source='PVT README / timm csv'),
        'b4': dict(params=62.6, gmacs=10.14, source='PVT README / timm csv'),
        'b5': dict(params=82.0, gmacs=11.76, source='PVT README / timm csv'),
    }

    def classifier_param_delta(self) -> int:
        """ImageNet-1k head (the last stage norm is the classifier's final norm)."""
        return self.embed_dims[-1] * 1000 + 1000

    def __init__(self,
                 arch: Union[str, dict] = 'b2',
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 layer_norm_eps: Optional[float] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 in_chans: int = 3,
                 init_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None):
        super().__init__(out_indices, frozen_stages, norm_eval, with_cp, in_chans, init_cfg, pretrained)
        self.arch_name, cfg = resolve_arch(arch, self.arch_zoo, 'PVTv2', self.arch_aliases)
        n = len(cfg['depths'])
        self._build(cfg, [7] + [3] * (n - 1), [4] + [2] * (n - 1), [3] + [1] * (n - 1), qkv_bias, qk_scale, drop_rate,
                    attn_drop_rate, drop_path_rate, layer_norm_eps, stage_norm=True, conv_mlp=True)


# ---------------------------------------------------------------------- PVT v1
@register_backbone
class PVT(_PyramidVisionTransformer):
    """PVT v1 backbone (registered as ``'PVT'``; mmdet's ``PyramidVisionTransformer`` stays usable).

    Args:
        arch: 'tiny' | 'small' | 'medium' | 'large' (also 't', 's', 'm', 'l', 'pvt_tiny'...), or a dict of
            ``embed_dims``, ``depths``, ``num_heads``, ``mlp_ratios``, ``sr_ratios``.
        pretrain_img_size: image size of the position embeddings (224: grids 56, 28, 14, 7). A checkpoint
            with other grids is resampled bilinearly on load; at run time each embedding is resampled
            bilinearly (align_corners=False, float32) to the token grid, in every forward pass.
        use_cls_token: keep the classifier's class token in the last stage (it takes part in that
            stage's attention and is removed from the output map), as the official classification model
            and HF ``PvtModel`` do. Default False: the official detection/segmentation code and mmdet,
            which drop the token and its position slot.
        out_norm: a LayerNorm on each returned level (``norm{i}``; the classifier's final ``norm``
            initialises the last one). Default False: raw stage outputs, as the official detection code
            and mmdet (whose detection results the papers report).
        qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path_rate, layer_norm_eps: as :class:`PVTv2`.
""" + _COMMON_DOC + """
    Outputs: a tuple of NCHW maps for ``out_indices``; level i has ``embed_dims[i]`` channels, stride
    ``4 * 2**i`` and size ceil(H / stride) x ceil(W / stride).

    Difference from the official code, mmdet and HF: their non-overlapping patch convolutions drop the
    last rows/columns when a side is not a multiple of the stride (floor grid); here the input of each
    patch embedding is zero-padded at the bottom/right instead (ceil grid, as every backbone of this
    package). On sizes that are multiples of 32 the two agree exactly.
    """

    version = 1
    _b = dict(embed_dims=_WIDE, num_heads=_HEADS, mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1))
    arch_zoo = {
        'tiny': dict(_b, depths=(2, 2, 2, 2)),
        'small': dict(_b, depths=(3, 4, 6, 3)),
        'medium': dict(_b, depths=(3, 4, 18, 3)),
        'large': dict(_b, depths=(3, 8, 27, 3)),
    }
    del _b
    arch_aliases = {'t': 'tiny', 's': 'small', 'm': 'medium', 'l': 'large',
                    **{f'pvt_{k}': k for k in ('tiny', 'small', 'medium', 'large')},
                    **{f'pvt-{k[0]}': k for k in ('tiny', 'small', 'medium', 'large')}}
    #: PVT paper Table (224, ImageNet-1k classifier); the GMACs are the paper's "FLOPs"
    paper_table = {
        'tiny': dict(params=13.2, gmacs=1.9, source='PVT paper (224)'),
        'small': dict(params=24.5, gmacs=3.8, source='PVT paper (224)'),
        'medium': dict(params=44.2, gmacs=6.7, source='PVT paper (224)'),
        'large': dict(params=61.4, gmacs=9.8, source='PVT paper (224)'),
    }
    #: ``out_norm`` level norms (the classifier's final norm is counted in the delta)
    dense_only_prefixes = ('norm0.', 'norm1.', 'norm2.', 'norm3.')

    def classifier_param_delta(self) -> int:
        """Final norm + ImageNet-1k head, and the class token with its position slot when not built."""
        c = self.embed_dims[-1]
        return 2 * c + c * 1000 + 1000 + (0 if self.use_cls_token else 2 * c)

    def __init__(self,
                 arch: Union[str, dict] = 'small',
                 pretrain_img_size: int = 224,
                 use_cls_token: bool = False,
                 out_norm: bool = False,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 layer_norm_eps: Optional[float] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 in_chans: int = 3,
                 init_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None):
        super().__init__(out_indices, frozen_stages, norm_eval, with_cp, in_chans, init_cfg, pretrained)
        self.arch_name, cfg = resolve_arch(arch, self.arch_zoo, 'PVT', self.arch_aliases)
        n = len(cfg['depths'])
        if use_cls_token and tuple(cfg['sr_ratios'])[-1] != 1:
            raise ValueError('use_cls_token needs sr_ratio 1 in the last stage (the class token has no grid position)')
        self.pretrain_img_size = pretrain_img_size
        grids = [(pretrain_img_size // (4 * 2**i), ) * 2 for i in range(n)]
        self._build(cfg, [4] + [2] * (n - 1), [4] + [2] * (n - 1), [0] * n, qkv_bias, qk_scale, drop_rate,
                    attn_drop_rate, drop_path_rate, layer_norm_eps, pos_grids=grids, cls_token=use_cls_token)
        self.use_cls_token, self.out_norm = use_cls_token, out_norm
        if out_norm:
            for i in self.out_indices:
                self.add_module(f'norm{i}', nn.LayerNorm(self.embed_dims[i], eps=self._block_eps))

    def _unavailable_intermediates(self):
        return self._levels_without({i: f'norm{i}' for i in range(len(self.stages))}) if self.out_norm else {}

    def _output(self, i: int, tokens: torch.Tensor, fmap: torch.Tensor) -> torch.Tensor:
        if not self.out_norm:
            return fmap
        return nlc_to_nchw(getattr(self, f'norm{i}')(tokens), fmap.shape[-2:])

    def optional_checkpoint_keys(self):
        # classification checkpoints have one final norm at most
        return [k for k, _ in self.named_parameters() if re.match(r'norm\d+\.', k)]
