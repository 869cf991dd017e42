"""CaiT (Touvron et al., "Going deeper with Image Transformers", ICCV 2021) as a pyramid backbone.

CaiT is a plain stride-16 transformer in two stages. The self-attention stage is a stack of pre-norm
blocks with talking-heads attention (the attention logits are mixed across heads before the softmax,
the probabilities after it) and LayerScale (every residual branch is multiplied by a per-channel vector
initialised to a small constant, 1e-5 for 24 blocks, 1e-6 for S36). It has no class token and its
position embedding has no class slot. The class-attention stage (two blocks in which only a class token
attends to the patch tokens, which it leaves unchanged) exists only for classification.

The dense backbone is therefore the self-attention stage: the class token and the class-attention
layers are not built (:meth:`CaiT.classifier_param_delta` counts them for the comparison with the paper),
the final norm (which the classifier applies to the patch tokens too) is kept for the last block, and
the shared :class:`PlainBackbone` pyramid turns the stride-16 tokens into four levels. Stochastic depth
is constant over the blocks, as the official code trains it.

Checkpoints load from the official layout (facebookresearch/deit ``cait_models.py``: ``{'model':
{'module.<key>'}}``) and timm's ``cait.py``, which uses the same names (``blocks.N.attn.proj_l``,
``blocks.N.gamma_1``, ``blocks_token_only.N...``). There is no HF transformers CaiT.
"""
import re
from typing import Dict, Optional, Sequence, Union

import torch

from ..checkpoint.loader import CheckpointMismatchError, strip_prefix
from ..checkpoint.rename import rename_keys
from ..layers.head_mixing import TalkingHeadAttention
from ..layers.vit_block import ViTBlock
from ..registry import register_backbone
from .base import resolve_arch
from .plain import PlainBackbone, plain_arguments


def paper_layer_scale_init(depth: int) -> float:
    """LayerScale initialisation by depth, as the CaiT paper prescribes (Sec. 2.1): 0.1 up to 18 blocks,
    1e-5 up to 24, 1e-6 beyond (the released XXS36 uses 1e-5, kept in its arch entry)."""
    return 0.1 if depth <= 18 else (1e-5 if depth <= 24 else 1e-6)


@register_backbone
class CaiT(PlainBackbone):
    """Class-attention image Transformer backbone (registered as ``'CaiT'``).

    Args:
        arch: 'xxs24' | 'xxs36' | 'xs24' | 's24' | 's36' (aliases 'cait-xxs24', 'cait_s24' ...) or a dict of
            ``embed_dims``, ``depth``, ``num_heads``, ``init_values`` (optionally with ``'base': name``).
            All variants: patch 16, mlp ratio 4, qkv bias, LayerNorm eps 1e-6, two class-attention layers
            in the classifier (not built here).
        img_size: pre-training resolution fixing the stored position embedding grid (224; the official
            XS24 / S24 / S36 checkpoints are at 384 and their 24x24 embedding is resampled on load).
        drop_path_rate: stochastic depth, the same rate in every block (CaiT's schedule).
        init_values: LayerScale initial value; None takes the arch's (the official value). (CaiT's name for
            :class:`PlainBackbone`'s ``layer_scale``, which it does not take.)
        Other arguments: see :class:`PlainBackbone` (pyramid, taps, ViTDet windows, freezing ...).
            ``output_cls_token`` is not available: the self-attention stage has no class token.
    """

    arch_zoo = {
        'xxs24': dict(embed_dims=192, depth=24, num_heads=4, init_values=1e-5),
        'xxs36': dict(embed_dims=192, depth=36, num_heads=4, init_values=1e-5),
        'xs24': dict(embed_dims=288, depth=24, num_heads=6, init_values=1e-5),
        's24': dict(embed_dims=384, depth=24, num_heads=8, init_values=1e-5),
        's36': dict(embed_dims=384, depth=36, num_heads=8, init_values=1e-6),
    }
    arch_aliases = {f'{p}{k}{s}': k for k in ('xxs24', 'xxs36', 'xs24', 's24', 's36')
                    for p in ('', 'cait-', 'cait_', 'cait') for s in ('', '_224', '-224')}
    model_name = 'CaiT'
    paper_table = {
        'xxs24': dict(params=12.0, gmacs=2.5, source='CaiT paper Table 1 / README_cait (224)'),
        'xxs36': dict(params=17.3, gmacs=3.8, source='CaiT paper Table 1 / README_cait (224)'),
        'xs24': dict(params=26.6, gmacs=5.4, source='CaiT paper Table 1 (224)'),
        's24': dict(params=46.9, gmacs=9.4, source='CaiT paper Table 1 / README_cait (224)'),
        's36': dict(params=68.2, gmacs=13.9, source='CaiT paper Table 1 (224)'),
    }

    prefix_token_names = ()  # no class token in the self-attention stage
    drop_path_rule = 'constant'  # the official code trains every block at the same rate
    pos_embed_on_prefix = False
    #: classifier-only parts of the official model (not built): class-attention layers and their MLP ratio
    depth_token_only = 2
    mlp_ratio_clstk = 4.

    def __init__(self,
                 arch: Union[str, dict] = 's24',
                 img_size: int = 224,
                 patch_size: int = 16,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 init_values: Optional[float] = None,
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
        if output_cls_token:
            raise ValueError('CaiT has no class token in its self-attention stage (the class token only enters '
                             'the classification-only class-attention layers, which this backbone does not '
                             'build); use output_cls_token=False')
        cfg_init = cfg.get('init_values')
        self.init_values = float(init_values if init_values is not None else
                                 (cfg_init if cfg_init is not None else paper_layer_scale_init(cfg['depth'])))
        layer_scale = self.init_values
        super().__init__(cfg['embed_dims'], cfg['depth'], cfg['num_heads'], 4., **plain_arguments(locals()))

    def _build_block(self, index: int, drop_path: float, window_size: int) -> ViTBlock:
        attn = TalkingHeadAttention(self.embed_dims, self.num_heads, self.qkv_bias, self.qk_scale,
                                    self.attn_drop_rate, self.drop_rate)
        return ViTBlock(self.embed_dims, self.num_heads, self.mlp_ratio, self.qkv_bias, self.qk_scale, self.drop_rate,
                        self.attn_drop_rate, drop_path, layer_scale=self.layer_scale,
                        window_size=window_size, rel_pos=self.rel_pos and window_size > 0, attn=attn)

    def classifier_param_delta(self) -> int:
        """Class token, two class-attention layers (q, k, v, proj, two norms, MLP, two LayerScales), the
        1000-way head, and the final norm when ``final_norm=False`` leaves it out."""
        c = self.embed_dims
        hid = int(c * self.mlp_ratio_clstk)
        qkv = 3 * c * c + (3 * c if self.qkv_bias else 0)
        ca_block = 2 * c + qkv + c * c + c + 2 * c + (c * hid + hid) + (hid * c + c) + 2 * c
        n = self.depth_token_only * ca_block + c + (c * 1000 + 1000)
        if self.norm is None:
            n += 2 * c
        return n

    # ------------------------------------------------------------------ checkpoints
    def convert_checkpoint(self, sd: Dict[str, torch.Tensor]):
        sd = strip_prefix(sd, ('backbone.', ))
        keys = set(sd)
        talking = any(re.match(r'blocks\.\d+\.attn\.proj_l\.weight$', k) for k in keys)
        if talking and any(re.match(r'blocks\.\d+\.gamma_1$', k) for k in keys):
            out, fmt, dropped = self._from_official(sd)
        elif talking and any(re.match(r'blocks\.\d+\.ls1\.gamma$', k) for k in keys):
            out, fmt, dropped = dict(sd), 'vit_backbones', {}
        else:
            hint = ''
            if any(re.search(r'\.attn\.reatten_matrix\.', k) for k in keys):
                hint = ' It has re-attention layers (attn.reatten_matrix): a DeepViT checkpoint; use DeepViT.'
            elif any(re.match(r'blocks\.\d+\.attn\.qkv\.weight$', k) for k in keys):
                hint = (' It has plain attention blocks without talking heads (attn.proj_l) or LayerScale '
                        '(gamma_1): a ViT / DeiT checkpoint; use ViT or DeiT.')
            raise CheckpointMismatchError(
                f'not a CaiT checkpoint: expected the official / timm layout (blocks.N.attn.proj_l, blocks.N.gamma_1, '
                f'blocks_token_only.N ...) or ours (blocks.N.ls1.gamma); first keys: {sorted(keys)[:5]}.' + hint)
        if self.norm is None:
            for k in [k for k in out if k.startswith('norm.')]:
                dropped[k] = 'final norm (final_norm=False)'
                del out[k]
        return out, fmt, dropped

    @staticmethod
    def _drop_reason(k: str) -> Optional[str]:
        if k.startswith('blocks_token_only.'):
            return 'class-attention layer (classification only; dense features come from the self-attention stack)'
        if k == 'cls_token':
            return 'class token (used only by the class-attention layers)'
        if k.startswith(('head.', 'head_dist.', 'fc_norm.')):
            return 'classification head'
        return None

    def _from_official(self, sd):
        rules = [
            (r'^blocks\.(\d+)\.gamma_1$', r'blocks.\1.ls1.gamma'),
            (r'^blocks\.(\d+)\.gamma_2$', r'blocks.\1.ls2.gamma'),
        ]
        out, dropped = rename_keys(sd, rules, self._drop_reason)
        return out, 'official/timm', dropped
