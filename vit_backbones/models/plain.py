"""The shared machinery of plain (single-stride) backbones: ViT, DeiT and, later, CaiT, DeepViT, CPVT, CeiT.

A plain model is a stem (patch embedding to a stride-16 token grid), prefix tokens (class,
distillation), an absolute position embedding over prefix + grid, and a stack of blocks that keeps
the grid. :class:`PlainBackbone` turns that into the four-level pyramid of the backbone contract:

    image -> stem -> [prefix tokens] + grid tokens (+ position embedding resampled to the grid)
          -> blocks (tapped at ``block_indices``) -> prefix tokens removed -> FeaturePyramid -> levels

A subclass supplies its pieces by overriding the hooks, each small:

* ``_build_stem()``        the module mapping (B, C, H, W) to NHWC tokens (default :class:`PatchEmbed`);
* ``prefix_token_names``   names of the prefix-token parameters, in sequence order (``('cls_token',)``);
* ``pos_embed_on_prefix``  whether the position embedding has slots for the prefix tokens;
* ``abs_pos_embed``        False builds no absolute position embedding (``pos_embed`` is None: CPVT, whose
  position information comes from a convolution after a block);
* ``_after_block(i, x, hw)`` applied to the token sequence after block i (default: nothing; CPVT's PEG);
* ``_build_block(i, drop_path, window_size)`` one block (default :class:`ViTBlock`); blocks are called
  as ``block(tokens, hw)``;
* ``embed(x)``             stem + prefix + position embedding, returns (tokens, grid hw);
* ``forward_features(x)``  the tapped block outputs as token sequences (what parity tests compare).

ViTDet's high-resolution option is available to every plain model: ``window_size=w`` makes every block
attend inside w x w windows except those in ``global_attn_indexes``; ``rel_pos=True`` adds a learned
relative position bias in the windowed blocks. As in ViTDet the prefix tokens belong to no window, so a
windowed model has none: it keeps the position embedding's prefix slots (so classification checkpoints
load unchanged) but builds no prefix-token parameters (a checkpoint's are dropped with a reason), and
every parameter takes part in the forward (no unused parameters under DistributedDataParallel).
"""
import inspect
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checkpoint.loader import CheckpointMismatchError
from ..layers import PatchEmbed, nlc_to_nchw, resample_abs_pos_embed, token_map
from ..layers.pyramid import FeaturePyramid
from ..layers.vit_block import LayerNormEps6, ViTBlock
from .base import BaseBackbone, drop_path_rates, init_transformer_weights


def quarter_blocks(depth: int) -> Tuple[int, ...]:
    """The last block of each quarter of the stack: (2, 5, 8, 11) for 12 blocks, (5, 11, 17, 23) for 24."""
    return tuple(max(depth * (i + 1) // 4 - 1, 0) for i in range(4))


class PlainBackbone(BaseBackbone):
    """Base class of plain backbones (see the module docstring for the hooks a model overrides).

    Args:
        embed_dims, depth, num_heads, mlp_ratio, qkv_bias, qk_scale: transformer hyper-parameters.
        patch_size: patch embedding stride (the token stride).
        img_size: pre-training image size; the stored position embedding covers its grid
            (``img_size // patch_size`` per side) and is resampled to the runtime grid each forward
            (bicubic, ``align_corners=False``, float32, prefix slots kept apart).
        drop_rate, attn_drop_rate: dropout after the position embedding / projections, on attention.
        drop_path_rate: stochastic depth, increasing linearly over the blocks from 0 (as DeiT trains).
        layer_scale: LayerScale init value for every block branch (None: no LayerScale).
        pyramid: 'deconv' (BEiT / mmseg Feature2Pyramid: one tapped block per level) or 'simple'
            (ViTDet: every level from the last tapped block).
        block_indices: the blocks whose outputs feed the pyramid. 'deconv': one per level (default the last
            block of each quarter, e.g. (2, 5, 8, 11), as mmseg's ViT configs); 'simple': one block
            (default the last). Blocks after the last tap are not run (and get no gradient: include the
            last block, as the defaults do, when training under DistributedDataParallel).
        pyramid_norm: norm inside the pyramid ('bn', 'ln', 'gn'); default 'bn' for 'deconv' (BEiT uses
            SyncBN) and 'ln' for 'simple' (ViTDet).
        pyramid_channels: 'simple' only: project each level to this many channels (ViTDet's 256); None
            keeps C/4, C/2, C, C.
        final_norm: apply the classifier's final LayerNorm (``norm``) to the last block's output when it
            is tapped (mmseg's ``final_norm``). False leaves ``norm`` out of the model.
        window_size, global_attn_indexes, rel_pos: ViTDet's windowed attention (0 = off).
        output_cls_token: also return the prefix tokens of the last tapped block, as a (B, P, C) tensor
            after the maps (P = 1, or 2 for distilled DeiT; not possible with windows, which have none).
        out_indices: pyramid levels to return (0..3 = strides 4, 8, 16, 32).
        frozen_stages: -1 nothing; 0 the stem, prefix tokens and position embedding; k >= 1 also blocks
            0..k-1. The pyramid is never frozen.
        norm_eval, with_cp, in_chans, init_cfg, pretrained: see :class:`BaseBackbone`.
    """

    #: the pyramid serves dense prediction only (left out when comparing with the papers' classifiers)
    dense_only_prefixes = ('pyramid.', )
    prefix_token_names: Tuple[str, ...] = ('cls_token', )
    pos_embed_on_prefix: bool = True
    abs_pos_embed: bool = True
    #: the stochastic-depth rule of the paper (:func:`~vit_backbones.models.base.drop_path_rates`)
    drop_path_rule: str = 'linear'

    def __init__(self,
                 embed_dims: int,
                 depth: int,
                 num_heads: int,
                 mlp_ratio: float = 4.,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 patch_size: int = 16,
                 img_size: Union[int, Tuple[int, int]] = 224,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 layer_scale: Optional[float] = None,
                 pyramid: str = 'deconv',
                 block_indices: Optional[Sequence[int]] = None,
                 pyramid_norm: Optional[str] = None,
                 pyramid_channels: Optional[int] = None,
                 final_norm: bool = True,
                 window_size: int = 0,
                 global_attn_indexes: Sequence[int] = (),
                 rel_pos: bool = False,
                 output_cls_token: bool = False,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 in_chans: int = 3,
                 init_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None):
        super().__init__(out_indices, frozen_stages, norm_eval, with_cp, in_chans, init_cfg, pretrained)
        self.embed_dims, self.depth, self.num_heads = int(embed_dims), int(depth), int(num_heads)
        self.mlp_ratio, self.qkv_bias, self.qk_scale = mlp_ratio, qkv_bias, qk_scale
        self.patch_size = int(patch_size)
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.pos_grid = (img_size[0] // self.patch_size, img_size[1] // self.patch_size)
        self.drop_rate, self.attn_drop_rate, self.layer_scale = drop_rate, attn_drop_rate, layer_scale
        self.window_size = int(window_size)
        self.global_attn_indexes = tuple(int(i) % self.depth for i in global_attn_indexes)
        self.rel_pos = bool(rel_pos)
        if self.rel_pos and not self.window_size:
            raise ValueError('rel_pos=True is the windowed-attention bias; set window_size > 0 as well')
        if output_cls_token and self.window_size:
            raise ValueError('output_cls_token=True is not possible with window_size > 0: windowed models drop '
                             'the prefix tokens (as ViTDet); use window_size=0 to keep them')
        self.output_cls_token = output_cls_token
        self.final_norm = final_norm
        self._set_out_indices(4)

        # taps
        if pyramid not in ('deconv', 'simple'):
            raise ValueError(f"pyramid must be 'deconv' or 'simple', got {pyramid!r}")
        self.pyramid_mode = pyramid
        if block_indices is None:
            block_indices = quarter_blocks(self.depth) if pyramid == 'deconv' else (self.depth - 1, )
        block_indices = tuple(int(i) + self.depth if int(i) < 0 else int(i) for i in block_indices)
        want = 4 if pyramid == 'deconv' else 1
        if len(block_indices) != want or not all(0 <= i < self.depth for i in block_indices):
            raise ValueError(f"pyramid={pyramid!r} needs {want} block index(es) in [0, {self.depth}), "
                             f'got {block_indices}')
        self.block_indices = block_indices

        # stem, prefix tokens, position embedding
        self.patch_embed = self._build_stem()
        for name in self.prefix_params:
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, self.embed_dims)))
        n_pos = self.pos_grid[0] * self.pos_grid[1] + (self.num_prefix_tokens if self.pos_embed_on_prefix else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, self.embed_dims)) if self.abs_pos_embed else None
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()

        # blocks
        dpr = drop_path_rates(drop_path_rate, (self.depth, ), self.drop_path_rule)[0]
        self.blocks = nn.ModuleList([
            self._build_block(i, dpr[i], self.window_size if i not in self.global_attn_indexes else 0)
            for i in range(self.depth)
        ])
        self.norm = LayerNormEps6(self.embed_dims) if final_norm else None

        # pyramid
        self.pyramid = FeaturePyramid(self.embed_dims, (4, 2, 1, 0.5), pyramid,
                                      pyramid_norm or ('bn' if pyramid == 'deconv' else 'ln'), pyramid_channels,
                                      levels=self.out_indices, in_stride=self.patch_size)
        self.feature_info = [
            dict(num_chs=c, reduction=s, module=f'pyramid.branches.{i}')
            for i, (c, s) in enumerate(zip(self.pyramid.out_dims, self.pyramid.strides))
        ]
        self.min_input_size = max(self.pyramid.strides)

    # ------------------------------------------------------------------ hooks for subclasses
    @property
    def num_prefix_tokens(self) -> int:
        return len(self.prefix_token_names)

    @property
    def prefix_params(self) -> Tuple[str, ...]:
        """The prefix-token parameters this model builds (none with windows, which drop them)."""
        return () if self.window_size else self.prefix_token_names

    def _build_stem(self) -> nn.Module:
        return PatchEmbed(self.in_chans, self.embed_dims, self.patch_size)

    def _build_block(self, index: int, drop_path: float, window_size: int) -> nn.Module:
        return ViTBlock(self.embed_dims, self.num_heads, self.mlp_ratio, self.qkv_bias, self.qk_scale, self.drop_rate,
                        self.attn_drop_rate, drop_path, layer_scale=self.layer_scale, window_size=window_size,
                        rel_pos=self.rel_pos and window_size > 0)

    def _default_init(self):
        """Prefix tokens and position embedding: truncated normal (std .02); the rest as every backbone."""
        for name in self.prefix_params:
            nn.init.trunc_normal_(getattr(self, name), std=.02)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=.02)
        self.apply(init_transformer_weights)

    # ------------------------------------------------------------------ forward
    def runtime_pos_embed(self, hw: Tuple[int, int]) -> torch.Tensor:
        """The position embedding resampled to the grid ``hw`` (prefix slots unchanged)."""
        prefix = self.num_prefix_tokens if self.pos_embed_on_prefix else 0
        return resample_abs_pos_embed(self.pos_embed, hw, self.pos_grid, prefix)

    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Image -> ([prefix tokens] + grid tokens with position embedding, grid (h, w))."""
        x = self.patch_embed(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        with_pos = self.pos_embed is not None
        if with_pos:
            pos = self.runtime_pos_embed((h, w))
            if self.pos_embed_on_prefix:
                pos_prefix, pos = pos[:, :self.num_prefix_tokens], pos[:, self.num_prefix_tokens:]
            x = x + pos
        if self.prefix_params:  # windowed models have none: prefix tokens belong to no window (as ViTDet)
            prefix = [getattr(self, n).expand(b, -1, -1) for n in self.prefix_params]
            if with_pos and self.pos_embed_on_prefix:
                prefix = [t + pos_prefix[:, i:i + 1] for i, t in enumerate(prefix)]
            x = torch.cat(prefix + [x], dim=1)
        return self.pos_drop(x), (h, w)

    @property
    def runtime_prefix_tokens(self) -> int:
        """Prefix tokens present in the block sequence (0 when windows drop them)."""
        return 0 if self.window_size else self.num_prefix_tokens

    def _needed_taps(self) -> Dict[int, int]:
        """block index -> pyramid level, for the levels that are returned."""
        if self.pyramid_mode == 'simple':
            return {self.block_indices[0]: -1}
        return {self.block_indices[lvl]: lvl for lvl in self.out_indices}

    def forward_features(self, x: torch.Tensor, taps: Optional[Sequence[int]] = None,
                         norm_last: bool = True) -> Tuple[List[torch.Tensor], Tuple[int, int]]:
        """Token sequences (B, P + h*w, C) after the blocks in ``taps`` (default: those the pyramid
        uses), in block order, and the grid. The last block's output gets the final norm when
        ``final_norm`` (and ``norm_last``). Blocks after the last tap are not run."""
        x, hw = self.embed(x)
        taps = sorted(set(self._needed_taps() if taps is None else (int(t) % self.depth for t in taps)))
        out = []
        for i, blk in enumerate(self.blocks):
            x = self._after_block(i, self.run_block(blk, x, hw), hw)
            if i in taps:
                out.append(self.norm(x) if (norm_last and i == self.depth - 1 and self.norm is not None) else x)
                if i == taps[-1]:
                    break
        return out, hw

    def _after_block(self, index: int, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """Hook applied to the (B, P + h*w, C) sequence after block ``index`` (default: unchanged)."""
        return x

    # ------------------------------------------------------------------ forward_intermediates (see BaseBackbone)
    intermediate_unit = 'blocks'

    def intermediate_info(self) -> List[dict]:
        """One entry per block: ``embed_dims`` channels at the patch stride."""
        return [dict(num_chs=self.embed_dims, reduction=self.patch_size)] * self.depth

    def _check_intermediate_options(self, norm: bool, return_prefix_tokens: bool):
        if norm and self.norm is None:
            raise ValueError(f'{type(self).__name__} has no final norm (final_norm=False); call with norm=False')

    def _intermediates(self, x: torch.Tensor, indices: Tuple[int, ...], norm: bool):
        """The block outputs (what follows ``_after_block``) without the pyramid; grid maps and prefix tokens."""
        feats, hw = self.forward_features(x, indices, norm_last=False)
        by_block = dict(zip(sorted(indices), feats))
        seqs = [self.norm(by_block[i]) if norm else by_block[i] for i in indices]
        p = self.runtime_prefix_tokens
        return [nlc_to_nchw(t[:, p:], hw) for t in seqs], [t[:, :p] for t in seqs]

    def empty_outputs(self, x: torch.Tensor):
        outs = super().empty_outputs(x)
        if self.output_cls_token:
            outs = outs + (x.new_zeros((0, self.runtime_prefix_tokens, self.embed_dims)), )
        return outs

    def forward(self, x: torch.Tensor):
        image_hw = tuple(x.shape[-2:])
        feats, hw = self.forward_features(x)
        p = self.runtime_prefix_tokens
        b = x.shape[0]
        maps = [token_map(f[:, p:], hw) for f in feats]
        if self.pyramid_mode == 'simple':
            levels = self.pyramid(maps, image_hw)
        else:
            by_block = dict(zip(sorted(self._needed_taps()), maps))
            levels = self.pyramid([by_block.get(self.block_indices[lvl]) if lvl in self.out_indices else None
                                   for lvl in range(4)], image_hw)
        outs = tuple(levels[i] for i in self.out_indices)
        if self.output_cls_token:
            outs = outs + (feats[-1][:, :p], )
        return outs

    # ------------------------------------------------------------------ freezing
    def _stem_and_stages(self) -> List[nn.Module]:
        return [self.patch_embed] + list(self.blocks)

    def _freeze_stages(self):
        super()._freeze_stages()
        if self.frozen_stages >= 0:
            for name in self.prefix_params + (('pos_embed', ) if self.pos_embed is not None else ()):
                getattr(self, name).requires_grad = False
            if self.frozen_stages == self.depth and self.norm is not None:
                self.norm.eval()
                for p in self.norm.parameters():
                    p.requires_grad = False

    # ------------------------------------------------------------------ checkpoints
    def optional_checkpoint_keys(self) -> List[str]:
        """The pyramid, and relative position tables of windowed blocks, are not in classification checkpoints."""
        return [k for k, _ in self.named_parameters() if k.startswith('pyramid.') or k.endswith('relative_position_bias_table')]

    def resize_checkpoint_tensor(self, key: str, value: torch.Tensor) -> Optional[torch.Tensor]:
        if key == 'pos_embed' and self.pos_embed is not None:
            prefix = self.num_prefix_tokens if self.pos_embed_on_prefix else 0
            grid = value.shape[1] - prefix
            side = math.isqrt(grid)
            if value.ndim != 3 or side * side != grid or value.shape[-1] != self.embed_dims:
                return None  # another prefix count or width: reported as a shape mismatch
            return resample_abs_pos_embed(value, self.pos_grid, (side, side), prefix)
        if key.endswith('rel_pos.relative_position_bias_table'):
            return self.get_submodule(key.rsplit('.', 1)[0]).resize_state(value)
        return None

    def _check_prefix_tokens(self, sd: Dict[str, torch.Tensor], fmt: str):
        """A checkpoint whose prefix tokens differ from ours (distilled vs not) is another variant."""
        has = {n for n in ('cls_token', 'dist_token') if n in sd}
        mine = set(self.prefix_token_names)
        if has and has != mine:
            raise CheckpointMismatchError(
                f'the checkpoint ({fmt} layout) has prefix tokens {sorted(has)} but {type(self).__name__}'
                f'(arch={getattr(self, "arch_name", "?")}) has {sorted(mine)}: is it another variant? '
                'A distilled DeiT checkpoint needs a distilled arch (e.g. "small-distilled") and vice versa.')



#: the :class:`PlainBackbone` arguments a model passes through (all but the four it takes from its arch)
_PLAIN_ARGUMENTS = tuple(k for k in inspect.signature(PlainBackbone.__init__).parameters
                         if k not in ('self', 'embed_dims', 'depth', 'num_heads', 'mlp_ratio'))


def plain_arguments(values: Mapping) -> dict:
    """The :class:`PlainBackbone` construction arguments among ``values`` (a model's ``locals()`` in its
    ``__init__``), so that each model lists its arguments explicitly and passes them on in one line."""
    return {k: values[k] for k in _PLAIN_ARGUMENTS if k in values}
