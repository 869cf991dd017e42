"""CeiT (Yuan et al., "Incorporating Convolution Designs into Visual Transformers") as a pyramid backbone.

CeiT is a DeiT-sized plain transformer with two convolutional changes that matter for dense features:

* image-to-tokens stem (I2T): conv 7x7 stride 2 (no bias) + BatchNorm + max-pool 3x3 stride 2 (no
  activation), then a 4x4 stride-4 patch embedding of that feature map: tokens at stride 16;
* locally-enhanced feed-forward (LeFF, :class:`~vit_backbones.layers.LocallyEnhancedFeedForward`) in every
  block instead of the MLP: 1x1 conv + BN + GELU, depthwise 3x3 conv + BN + GELU, 1x1 conv + BN on the
  token grid, the class token passing through unchanged.

Its third part, layer-wise class-token attention (LCA: one attention + MLP block over the 12 per-block
class tokens, then the final norm and the head), only feeds the classifier: it is not built here, its
parameters are counted by :meth:`CeiT.classifier_param_delta` and dropped from checkpoints. The class
token and the learned absolute position embedding (with a class slot) are kept, the embedding resampled
to the runtime grid as for ViT.

Deviations from the official code (coeusguo/ceit ``ceit_model.py``), all invisible at 224 x 224:
the LeFF grid is the real (h, w) grid, so non-square inputs work (the official code reshapes to a square
``sqrt(N)`` grid); the image is zero-padded bottom/right to a multiple of 16 so any H, W gives
``ceil(H/16) x ceil(W/16)`` tokens (the official stem needs the 224/384 sizes its position embedding has).

Checkpoints: the official layout (``i2t.backbone.conv``, ``i2t.backbone.bn``, ``i2t.proj``,
``blocks.N.leff.conv1..3/bn1..3``, ``lca.*``, ``pos_layer_embed``, ``norm``, ``head``) and ours. timm and
HF transformers have no CeiT.
"""
import re
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from ..checkpoint.loader import CheckpointMismatchError, strip_prefix
from ..checkpoint.rename import rename_keys
from ..layers import ConvStem, LocallyEnhancedFeedForward, PatchEmbed, ViTBlock, pad_to_multiple
from ..registry import register_backbone
from .base import resolve_arch
from .plain import PlainBackbone, plain_arguments


class ImageToTokens(nn.Module):
    """CeiT's stem: (B, C, H, W) -> NHWC tokens (B, ceil(H/16), ceil(W/16), D).

    ``conv`` (7x7/2 conv, BN, 3x3/2 max-pool; a :class:`ConvStem`) then ``proj`` (a :class:`PatchEmbed`
    with 4x4 patches). The image is zero-padded bottom/right to a multiple of the total stride first.
    """

    def __init__(self, in_chans: int, embed_dims: int, stem_chans: int = 64, patch_size: int = 4):
        super().__init__()
        self.conv = ConvStem(in_chans, (stem_chans, ), (2, ), kernel_size=7, act_last=False, pool=(3, 2))
        self.proj = PatchEmbed(stem_chans, embed_dims, patch_size)
        self.stride = self.conv.stride * patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(pad_to_multiple(x, self.stride, "CeiT's stem padding")).permute(0, 3, 1, 2))


@register_backbone
class CeiT(PlainBackbone):
    """Convolution-enhanced image Transformer backbone (registered as ``'CeiT'``).

    Args:
        arch: 'tiny' | 'small' | 'base' (aliases 't', 'ti', 's', 'b', 'ceit-t' ...), or a dict of
            ``embed_dims``, ``depth``, ``num_heads``, ``mlp_ratio`` (or ``'base': name`` plus overrides).
        img_size: pre-training resolution (224, or 384 for the 384 checkpoints): the stored position
            embedding grid (img_size // 16), resampled to every runtime grid.
        leff_kernel_size: depthwise kernel of LeFF (3).
        final_norm: False by default: CeiT's final norm follows the LCA and normalises the class token only.
        Other arguments: see :class:`PlainBackbone` (pyramid, block taps, ViTDet windows, freezing ...).
            ``norm_eval`` keeps the stem's and LeFF's BatchNorms in eval mode.

    Outputs: four NCHW levels of strides 4, 8, 16, 32 (see ``feature_info``).
    """

    arch_zoo = {
        'tiny': dict(embed_dims=192, depth=12, num_heads=3, mlp_ratio=4.),
        'small': dict(embed_dims=384, depth=12, num_heads=6, mlp_ratio=4.),
        'base': dict(embed_dims=768, depth=12, num_heads=12, mlp_ratio=4.),
    }
    arch_aliases = {'t': 'tiny', 'ti': 'tiny', 's': 'small', 'b': 'base', 'ceit-t': 'tiny', 'ceit-ti': 'tiny',
                    'ceit-s': 'small', 'ceit-b': 'base'}
    paper_table = {
        'tiny': dict(params=6.4, gmacs=1.2, source='coeusguo/ceit README (params); CeiT paper Table (1.2G FLOPs, '
                     'unverified)'),
        'small': dict(params=24.2, gmacs=4.5, source='coeusguo/ceit README (params); CeiT paper Table (4.5G FLOPs, '
                      'unverified)'),
        'base': dict(params=94.4, gmacs=None, source='coeusguo/ceit README (params)'),
    }
    model_name = 'CeiT'
    stem_chans = 64

    def __init__(self,
                 arch: Union[str, dict] = 'small',
                 img_size: int = 224,
                 patch_size: int = 16,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 leff_kernel_size: int = 3,
                 layer_scale: Optional[float] = None,
                 pyramid: str = 'deconv',
                 block_indices: Optional[Sequence[int]] = None,
                 pyramid_norm: Optional[str] = None,
                 pyramid_channels: Optional[int] = None,
                 final_norm: bool = False,
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
        if patch_size != 16:
            raise ValueError('CeiT tokens are at stride 16 (stem stride 4 x 4x4 patches); patch_size cannot change')
        self.leff_kernel_size = int(leff_kernel_size)
        super().__init__(cfg['embed_dims'], cfg['depth'], cfg['num_heads'], cfg['mlp_ratio'],
                         **plain_arguments(locals()))

    def _build_stem(self) -> nn.Module:
        return ImageToTokens(self.in_chans, self.embed_dims, self.stem_chans, patch_size=4)

    def _build_block(self, index: int, drop_path: float, window_size: int) -> nn.Module:
        leff = LocallyEnhancedFeedForward(self.embed_dims, int(self.embed_dims * self.mlp_ratio), self.leff_kernel_size)
        return ViTBlock(self.embed_dims, self.num_heads, self.mlp_ratio, self.qkv_bias, self.qk_scale, self.drop_rate,
                        self.attn_drop_rate, drop_path, layer_scale=self.layer_scale, window_size=window_size,
                        rel_pos=self.rel_pos and window_size > 0, mlp=leff)

    def classifier_param_delta(self) -> int:
        """LCA block (attention + MLP + two norms), its per-layer embedding, the final norm (when not built)
        and the 1000-way head."""
        c, hidden = self.embed_dims, int(self.embed_dims * self.mlp_ratio)
        qkv_b = 3 * c if self.qkv_bias else 0
        lca = 2 * c + (3 * c * c + qkv_b) + (c * c + c) + 2 * c + (c * hidden + hidden) + (hidden * c + c)
        return lca + self.depth * c + (2 * c if self.norm is None else 0) + c * 1000 + 1000

    # ------------------------------------------------------------------ checkpoints
    def convert_checkpoint(self, sd: Dict[str, torch.Tensor]):
        sd = strip_prefix(sd, ('backbone.', ))
        keys = set(sd)
        first = sorted(keys)[:5]
        official = any(k.startswith('i2t.') for k in keys) and any('.leff.' in k for k in keys)
        ours = 'patch_embed.conv.layers.0.weight' in keys and any(re.match(r'blocks\.\d+\.mlp\.conv1\.', k)
                                                                  for k in keys)
        if not (official or ours):
            if any(k.startswith('pos_block.') for k in keys):
                what = 'a CPVT/Twins checkpoint (PEG pos_block keys)'
            elif any(re.match(r'blocks\.\d+\.mlp\.fc1\.', k) for k in keys):
                what = 'a ViT/DeiT-style checkpoint (MLP blocks, no LeFF)'
            else:
                what = 'not a CeiT checkpoint'
            raise CheckpointMismatchError(
                f'{what}: CeiT needs the official layout (i2t.* stem, blocks.N.leff.*) or ours '
                f'(patch_embed.conv.layers.*, blocks.N.mlp.conv1); first keys: {first}')
        rules = [
            (r'^i2t\.backbone\.conv\.', 'patch_embed.conv.layers.0.'),
            (r'^i2t\.backbone\.bn\.', 'patch_embed.conv.layers.1.'),
            (r'^i2t\.proj\.', 'patch_embed.proj.proj.'),
            (r'^blocks\.(\d+)\.leff\.', r'blocks.\1.mlp.'),
        ]

        def drop(k: str) -> Optional[str]:
            if k.startswith(('head.', 'head_dist.')):
                return 'classification head'
            if k.startswith('lca.') or k == 'pos_layer_embed':
                return 'layer-wise class-token attention (classification only)'
            if k.startswith('norm.') and self.norm is None:
                return "final norm (normalises the LCA's class token; final_norm=False)"
            return None

        out, dropped = rename_keys(sd, rules, drop)
        fmt = 'official' if official else 'vit_backbones'
        self._check_prefix_tokens(out, fmt)
        if 'cls_token' in out and 'cls_token' not in self.prefix_params:
            dropped['cls_token'] = 'prefix token (windowed models have none, as ViTDet)'
            del out['cls_token']
        return out, fmt, dropped
