"""ViT (Dosovitskiy et al., 2021) and DeiT (Touvron et al., 2021) as pyramid backbones.

Both are the plain pre-norm transformer of :class:`PlainBackbone` (patch 16, LayerNorm eps 1e-6, qkv
bias, a class token and a learned position embedding with a class slot). The distilled DeiT variants
add a distillation token (sequence ``[cls, dist, patches]``, position embedding with two prefix slots);
both prefix tokens are removed from the maps.

Checkpoints load from the timm / official DeiT layout (``blocks.N.attn.qkv`` ...), HF transformers
(``ViTModel``/``DeiTModel`` and their task models, with the hub's ``attention.attention.query`` names or
the transformers-5 ``attention.q_proj`` names) and mmseg's ``VisionTransformer`` (``layers.N.ln1``,
``attn.attn.in_proj_weight``, ``ffn.layers.0.0``, final norm ``ln1``). A position embedding for another
grid is resampled on load (bicubic, align_corners=False).
"""
import re
from typing import Dict, Optional, Sequence, Union

import torch

from ..checkpoint.loader import CheckpointMismatchError, strip_prefix
from ..checkpoint.rename import rename_keys
from ..registry import register_backbone
from .base import resolve_arch
from .plain import PlainBackbone, plain_arguments

_HEAD_KEYS = ('head.', 'head_dist.', 'classifier.', 'cls_classifier.', 'distillation_classifier.', 'fc_norm.',
              'pooler.', 'pre_logits.')


def _drop_reason(k: str) -> Optional[str]:
    if k.startswith(_HEAD_KEYS):
        return 'classification head'
    if k.startswith('embeddings.mask_token') or k == 'mask_token':
        return 'masked-image-modeling token'
    return None


@register_backbone
class ViT(PlainBackbone):
    """Vision Transformer backbone (registered as ``'ViT'``; mmseg's ``VisionTransformer`` stays usable).

    Args:
        arch: 'tiny' | 'small' | 'base' | 'large' (aliases 'ti', 's', 'b', 'l', 'vit-b' ...), all at patch
            16, or a dict of ``embed_dims``, ``depth``, ``num_heads``, ``mlp_ratio`` (with ``'base': name``
            to override a variant).
        img_size: pre-training resolution (224; 384 for the 384 checkpoints): fixes the stored position
            embedding grid, which is resampled to every runtime grid.
        Other arguments: see :class:`PlainBackbone` (pyramid, block taps, ViTDet windows, freezing ...).

    Outputs: four NCHW levels of strides 4, 8, 16, 32 (``feature_info`` gives the channels: all
    ``embed_dims`` for ``pyramid='deconv'``; C/4, C/2, C, C for ``pyramid='simple'`` unless
    ``pyramid_channels`` is set).
    """

    arch_zoo = {
        'tiny': dict(embed_dims=192, depth=12, num_heads=3, mlp_ratio=4.),
        'small': dict(embed_dims=384, depth=12, num_heads=6, mlp_ratio=4.),
        'base': dict(embed_dims=768, depth=12, num_heads=12, mlp_ratio=4.),
        'large': dict(embed_dims=1024, depth=24, num_heads=16, mlp_ratio=4.),
    }
    arch_aliases = {'ti': 'tiny', 't': 'tiny', 's': 'small', 'b': 'base', 'l': 'large', 'vit-ti': 'tiny',
                    'vit-t': 'tiny', 'vit-s': 'small', 'vit-b': 'base', 'vit-l': 'large'}
    model_name = 'ViT'
    #: timm's counts of the classifiers at 224 (params with the 1000-way head; GMACs), see backbones.md
    paper_table = {
        'tiny': dict(params=5.72, gmacs=1.26, source='timm vit_tiny_patch16_224'),
        'small': dict(params=22.05, gmacs=4.61, source='timm vit_small_patch16_224'),
        'base': dict(params=86.57, gmacs=17.58, source='timm vit_base_patch16_224'),
        'large': dict(params=304.33, gmacs=61.6, source='timm vit_large_patch16_224'),
    }

    def __init__(self,
                 arch: Union[str, dict] = 'base',
                 img_size: int = 224,
                 patch_size: int = 16,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
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
        self.arch_name, cfg = resolve_arch(arch, self.arch_zoo, self.model_name, self.arch_aliases)
        self._configure_prefix(cfg)
        super().__init__(cfg['embed_dims'], cfg['depth'], cfg['num_heads'], cfg['mlp_ratio'],
                         **plain_arguments(locals()))

    def _configure_prefix(self, cfg: dict):
        pass

    def classifier_param_delta(self) -> int:
        """One 1000-way head per prefix token (class, distillation); prefix tokens a windowed model does not
        build; the final norm when ``final_norm=False``."""
        c = self.embed_dims
        n = (c * 1000 + 1000) * self.num_prefix_tokens
        n += c * (self.num_prefix_tokens - len(self.prefix_params))
        if self.norm is None:
            n += 2 * c
        return n

    # ------------------------------------------------------------------ checkpoints
    def convert_checkpoint(self, sd: Dict[str, torch.Tensor]):
        sd = strip_prefix(sd, ('backbone.', ))
        for p in ('vit.', 'deit.'):  # HF task models
            if any(k.startswith(p) for k in sd):
                sd = {(k[len(p):] if k.startswith(p) else k): v for k, v in sd.items()}
        keys = set(sd)
        if any(re.match(r'blocks\.\d+\.attn\.qkv\.weight$', k) for k in keys) and 'pos_embed' in keys:
            out, fmt, dropped = self._from_timm(sd)
        elif any(re.match(r'(encoder\.layer|layers)\.\d+\.attention\.', k) for k in keys):
            out, fmt, dropped = self._from_hf(sd)
        elif any(re.match(r'layers\.\d+\.attn\.attn\.in_proj_weight$', k) for k in keys):
            out, fmt, dropped = self._from_mmseg(sd)
        else:
            raise CheckpointMismatchError(
                f'not a {self.model_name} checkpoint: found none of the timm/official (blocks.N.attn.qkv + pos_embed), '
                'HF transformers (encoder.layer.N.attention / layers.N.attention), mmseg (layers.N.attn.attn.'
                f'in_proj_weight) or vit_backbones layouts; first keys: {sorted(keys)[:5]}')
        self._check_prefix_tokens(out, fmt)
        for k in [k for k in self.prefix_token_names if k in out and k not in self.prefix_params]:
            dropped[k] = 'prefix token (windowed models have none, as ViTDet)'
            del out[k]
        if self.norm is None:
            for k in [k for k in out if k.startswith('norm.')]:
                dropped[k] = 'final norm (final_norm=False)'
                del out[k]
        return out, fmt, dropped

    def _from_timm(self, sd):
        out, dropped = rename_keys(sd, [], _drop_reason)
        ours = any(k.startswith('pyramid.') for k in out)
        return out, 'vit_backbones' if ours else 'timm', dropped

    def _from_hf(self, sd):
        blk = r'^(?:encoder\.layer|layers)\.(\d+)\.'
        rules = [
            (r'^embeddings\.cls_token$', 'cls_token'),
            (r'^embeddings\.distillation_token$', 'dist_token'),
            (r'^embeddings\.position_embeddings$', 'pos_embed'),
            (r'^embeddings\.patch_embeddings\.projection\.', 'patch_embed.proj.'),
            (blk + r'layernorm_before\.', r'blocks.\1.norm1.'),
            (blk + r'layernorm_after\.', r'blocks.\1.norm2.'),
            (blk + r'attention\.(?:attention\.query|q_proj)\.', r'blocks.\1.attn.q.'),
            (blk + r'attention\.(?:attention\.key|k_proj)\.', r'blocks.\1.attn.k.'),
            (blk + r'attention\.(?:attention\.value|v_proj)\.', r'blocks.\1.attn.v.'),
            (blk + r'attention\.(?:output\.dense|o_proj)\.', r'blocks.\1.attn.proj.'),
            (blk + r'(?:intermediate\.dense|mlp\.fc1)\.', r'blocks.\1.mlp.fc1.'),
            (blk + r'(?:output\.dense|mlp\.fc2)\.', r'blocks.\1.mlp.fc2.'),
            (r'^layernorm\.', 'norm.'),
        ]
        out, dropped = rename_keys(sd, rules, _drop_reason)
        for k in [k for k in out if re.search(r'\.attn\.q\.(weight|bias)$', k)]:
            base, kind = k.rsplit('.attn.q.', 1)
            out[f'{base}.attn.qkv.{kind}'] = torch.cat([out.pop(f'{base}.attn.{p}.{kind}') for p in 'qkv'], 0)
        return out, 'hf', dropped

    def _from_mmseg(self, sd):
        blk = r'^layers\.(\d+)\.'
        rules = [
            (r'^patch_embed\.projection\.', 'patch_embed.proj.'),
            (r'^ln1\.', 'norm.'),
            (blk + r'ln1\.', r'blocks.\1.norm1.'),
            (blk + r'ln2\.', r'blocks.\1.norm2.'),
            (blk + r'attn\.attn\.in_proj_(weight|bias)$', r'blocks.\1.attn.qkv.\2'),
            (blk + r'attn\.attn\.out_proj\.', r'blocks.\1.attn.proj.'),
            (blk + r'ffn\.layers\.0\.0\.', r'blocks.\1.mlp.fc1.'),
            (blk + r'ffn\.layers\.1\.', r'blocks.\1.mlp.fc2.'),
        ]
        out, dropped = rename_keys(sd, rules, _drop_reason)
        if 'patch_embed.proj.weight' in out and 'patch_embed.proj.bias' not in out:
            # mmseg's VisionTransformer defaults to patch_bias=False: a zero bias is the same function
            out['patch_embed.proj.bias'] = out['patch_embed.proj.weight'].new_zeros(out['patch_embed.proj.weight'].shape[0])
        return out, 'mmseg', dropped


@register_backbone
class DeiT(ViT):
    """Data-efficient image Transformer backbone (registered as ``'DeiT'``).

    Args:
        arch: 'tiny' | 'small' | 'base' (aliases 'ti', 's', 'b', 'deit-s' ...) and the distilled variants
            'tiny-distilled' | 'small-distilled' | 'base-distilled' (aliases 'ti-d', 's-d', 'b-d'), which
            carry a distillation token after the class token; or a dict (add ``distilled=True``).
        Other arguments: see :class:`ViT` / :class:`PlainBackbone`.
    """

    arch_zoo = {
        'tiny': dict(embed_dims=192, depth=12, num_heads=3, mlp_ratio=4., distilled=False),
        'small': dict(embed_dims=384, depth=12, num_heads=6, mlp_ratio=4., distilled=False),
        'base': dict(embed_dims=768, depth=12, num_heads=12, mlp_ratio=4., distilled=False),
        'tiny-distilled': dict(embed_dims=192, depth=12, num_heads=3, mlp_ratio=4., distilled=True),
        'small-distilled': dict(embed_dims=384, depth=12, num_heads=6, mlp_ratio=4., distilled=True),
        'base-distilled': dict(embed_dims=768, depth=12, num_heads=12, mlp_ratio=4., distilled=True),
    }
    arch_aliases = {'ti': 'tiny', 't': 'tiny', 's': 'small', 'b': 'base', 'deit-ti': 'tiny', 'deit-t': 'tiny',
                    'deit-s': 'small', 'deit-b': 'base', 'ti-d': 'tiny-distilled', 't-d': 'tiny-distilled',
                    's-d': 'small-distilled', 'b-d': 'base-distilled', 'tiny-d': 'tiny-distilled',
                    'small-d': 'small-distilled', 'base-d': 'base-distilled'}
    model_name = 'DeiT'
    #: DeiT README params (with the head(s)); GMACs from timm (the README gives none for distilled models)
    paper_table = {
        'tiny': dict(params=5.7, gmacs=1.26, source='DeiT README / timm'),
        'small': dict(params=22.0, gmacs=4.61, source='DeiT README / timm'),
        'base': dict(params=86.0, gmacs=17.58, source='DeiT README / timm'),
        'tiny-distilled': dict(params=5.9, gmacs=None, source='DeiT README / timm'),
        'small-distilled': dict(params=22.4, gmacs=None, source='DeiT README / timm'),
        'base-distilled': dict(params=87.0, gmacs=None, source='DeiT README / timm'),
    }

    def _configure_prefix(self, cfg: dict):
        self.distilled = bool(cfg.pop('distilled', False))
        self.prefix_token_names = ('cls_token', 'dist_token') if self.distilled else ('cls_token', )
