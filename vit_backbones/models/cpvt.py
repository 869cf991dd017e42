"""CPVT (Chu et al., "Conditional Positional Encodings for Vision Transformers") as a pyramid backbone.

CPVT is DeiT without the learned absolute position embedding: a positional encoding generator (PEG, a
depthwise 3x3 convolution added back to the token grid) after the first block gives the position
information (:class:`~vit_backbones.layers.PositionalEncodingGenerator`). The class token, where there is
one, skips the PEG. The GAP variants ('tiny-gap' ...) have no class token (the classifier averages the
tokens). Because the PEG is a zero-padded convolution, nothing depends on the input size: no table is
resampled for a new resolution, any H x W grid works as is.

Checkpoints: the authors never released code or weights for the plain (DeiT-based) CPVT (their PEG code
is the ``PosCNN`` of Meituan-AutoML/Twins ``gvt.py``). The layout recognised as "official" is the DeiT
one (``patch_embed.proj``, ``cls_token``, ``blocks.N.attn.qkv`` ..., ``norm``, ``head``) without
``pos_embed``, plus the PEG under Twins' name ``pos_block.0.proj.0.{weight,bias}`` (also
``pos_block.proj.0.`` / ``pos_block.0.proj.``). timm and HF transformers have no CPVT (timm's ``twins_*``
use a PEG too but are the pyramid Twins models; their checkpoints are refused, as are ViT/DeiT ones,
which carry an absolute position embedding and no PEG, and CeiT ones).
"""
import math
import re
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checkpoint.loader import CheckpointMismatchError, strip_prefix
from ..checkpoint.rename import rename_keys
from ..layers import PositionalEncodingGenerator
from ..registry import register_backbone
from .base import resolve_arch
from .plain import PlainBackbone, plain_arguments

_HEAD_KEYS = ('head.', 'head_dist.', 'fc_norm.', 'pre_logits.')


@register_backbone
class CPVT(PlainBackbone):
    """Conditional Position encoding Vision Transformer backbone (registered as ``'CPVT'``).

    Args:
        arch: 'tiny' | 'small' | 'base' (DeiT sizes, with a class token) or 'tiny-gap' | 'small-gap' |
            'base-gap' (no class token); aliases 'ti', 's', 'b', 'ti-gap' ...; or a dict of ``embed_dims``,
            ``depth``, ``num_heads``, ``mlp_ratio``, ``class_token`` (or ``'base': name`` plus overrides).
        peg_index: the block after which the PEG runs (0: after the first block, the paper's choice).
        img_size: accepted for config compatibility; CPVT has no size-dependent parameter.
        Other arguments: see :class:`PlainBackbone` (pyramid, block taps, ViTDet windows, freezing ...).
            ``frozen_stages >= 0`` freezes the patch embedding, the class token and the PEG.

    Outputs: four NCHW levels of strides 4, 8, 16, 32 (see ``feature_info``).
    """

    arch_zoo = {
        'tiny': dict(embed_dims=192, depth=12, num_heads=3, mlp_ratio=4., class_token=True),
        'small': dict(embed_dims=384, depth=12, num_heads=6, mlp_ratio=4., class_token=True),
        'base': dict(embed_dims=768, depth=12, num_heads=12, mlp_ratio=4., class_token=True),
        'tiny-gap': dict(embed_dims=192, depth=12, num_heads=3, mlp_ratio=4., class_token=False),
        'small-gap': dict(embed_dims=384, depth=12, num_heads=6, mlp_ratio=4., class_token=False),
        'base-gap': dict(embed_dims=768, depth=12, num_heads=12, mlp_ratio=4., class_token=False),
    }
    arch_aliases = {'ti': 'tiny', 't': 'tiny', 's': 'small', 'b': 'base', 'cpvt-ti': 'tiny', 'cpvt-s': 'small',
                    'cpvt-b': 'base', 'ti-gap': 'tiny-gap', 't-gap': 'tiny-gap', 's-gap': 'small-gap',
                    'b-gap': 'base-gap', 'cpvt-ti-gap': 'tiny-gap', 'cpvt-s-gap': 'small-gap',
                    'cpvt-b-gap': 'base-gap'}
    paper_table = {
        name: dict(params=p, gmacs=None, source='CPVT paper (Chu et al. 2021), ImageNet table: CPVT-Ti/S/B '
                   '5.7M/22M/86M, GAP variants the same size (reference sheet section 11: unverified)')
        for name, p in (('tiny', 5.7), ('small', 22.0), ('base', 86.0), ('tiny-gap', 5.7), ('small-gap', 22.0),
                        ('base-gap', 86.0))
    }
    abs_pos_embed = False
    model_name = 'CPVT'

    def __init__(self,
                 arch: Union[str, dict] = 'small',
                 img_size: int = 224,
                 patch_size: int = 16,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 peg_index: int = 0,
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
        self.arch_name, cfg = resolve_arch(arch, self.arch_zoo, self.model_name, self.arch_aliases)
        self.class_token = bool(cfg.pop('class_token', True))
        self.prefix_token_names = ('cls_token', ) if self.class_token else ()
        if output_cls_token and not self.class_token:
            raise ValueError(f'output_cls_token=True needs a class token; arch {self.arch_name!r} is a GAP '
                             'variant without one (use e.g. arch="small")')
        depth = int(cfg['depth'])
        if not -depth <= peg_index < depth:
            raise ValueError(f'peg_index={peg_index} is not a block of the {depth}-block model')
        self.peg_index = peg_index % depth
        super().__init__(cfg['embed_dims'], depth, cfg['num_heads'], cfg['mlp_ratio'], **plain_arguments(locals()))
        self.pos_block = PositionalEncodingGenerator(self.embed_dims)

    def _init_peg(self):
        """As Twins initialises its PEG: normal(0, sqrt(2 / fan_out)) with fan_out = k*k*C/groups, zero bias."""
        conv = self.pos_block.proj
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
        nn.init.normal_(conv.weight, 0., math.sqrt(2. / fan_out))
        nn.init.zeros_(conv.bias)

    def _default_init(self):
        super()._default_init()
        if hasattr(self, 'pos_block'):
            self._init_peg()

    def _after_block(self, index: int, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        if index == self.peg_index:
            return self.pos_block(x, hw, self.runtime_prefix_tokens)
        return x

    def _freeze_stages(self):
        super()._freeze_stages()
        if self.frozen_stages >= 0 and hasattr(self, 'pos_block'):
            self.pos_block.eval()
            for p in self.pos_block.parameters():
                p.requires_grad = False

    def classifier_param_delta(self) -> int:
        """The ImageNet head (and the final norm when ``final_norm=False`` leaves it out)."""
        c = self.embed_dims
        return c * 1000 + 1000 + (2 * c if self.norm is None else 0)

    # ------------------------------------------------------------------ checkpoints
    def convert_checkpoint(self, sd: Dict[str, torch.Tensor]):
        sd = strip_prefix(sd, ('backbone.', ))
        keys = set(sd)
        first = sorted(keys)[:5]
        if any(k.startswith('i2t.') or '.leff.' in k for k in keys):
            raise CheckpointMismatchError(f'this is a CeiT checkpoint (i2t stem / LeFF keys), not CPVT: build '
                                          f"'CeiT' for it; first keys: {first}")
        if any(re.match(r'(patch_embeds|blocks)\.\d+\.\d+\.|(patch_embeds)\.\d+\.', k) for k in keys):
            raise CheckpointMismatchError(
                'this is a Twins (PCPVT / SVT, pyramid) checkpoint: it has per-stage patch_embeds / blocks.S.N. '
                'keys. It shares the PEG with CPVT but is another model; plain CPVT needs a DeiT-style '
                f'checkpoint with a single pos_block; first keys: {first}')
        if not any(re.match(r'blocks\.\d+\.attn\.qkv\.weight$', k) for k in keys):
            raise CheckpointMismatchError(
                f'not a CPVT checkpoint: no blocks.N.attn.qkv.weight (DeiT-style blocks); first keys: {first}')
        if not any(k.startswith('pos_block.') for k in keys):
            raise CheckpointMismatchError(
                'not a CPVT checkpoint: it has DeiT-style blocks but no PEG (pos_block.*)'
                + (' and a learned absolute position embedding (pos_embed): it is a ViT/DeiT checkpoint; '
                   "build 'ViT' or 'DeiT' for it" if 'pos_embed' in keys else '') + f'; first keys: {first}')
        ours = 'pos_block.proj.weight' in keys or any(k.startswith('pyramid.') for k in keys)
        rules = [(r'^pos_block\.0\.proj\.0\.', 'pos_block.proj.'),
                 (r'^pos_block\.proj\.0\.', 'pos_block.proj.'),
                 (r'^pos_block\.0\.proj\.', 'pos_block.proj.')]

        def drop(k: str) -> Optional[str]:
            if k.startswith(_HEAD_KEYS):
                return 'classification head'
            if k.startswith('norm.') and self.norm is None:
                return 'final norm (final_norm=False)'
            if re.match(r'pos_block\.[1-9]\d*\.', k):
                return 'a PEG at another position (this model has one PEG)'
            return None

        out, dropped = rename_keys(sd, rules, drop)
        fmt = 'vit_backbones' if ours else 'official'
        has_cls = 'cls_token' in out
        if has_cls != self.class_token:
            want = 'a class-token arch (e.g. "small")' if has_cls else 'a GAP arch (e.g. "small-gap")'
            raise CheckpointMismatchError(
                f'the checkpoint ({fmt} layout) {"has" if has_cls else "has no"} class token but CPVT(arch='
                f'{self.arch_name!r}) {"has none" if has_cls else "has one"}: it is another variant; use {want}')
        if has_cls and 'cls_token' not in self.prefix_params:
            dropped['cls_token'] = 'prefix token (windowed models have none, as ViTDet)'
            del out['cls_token']
        return out, fmt, dropped
