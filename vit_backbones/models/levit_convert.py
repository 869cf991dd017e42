"""Checkpoint conversion for LeViT: the official facebookresearch/LeViT layout (flat ``blocks.N``), timm's
(``stem.convK``, ``stages.S``) and HF transformers' (``patch_embeddings``, ``encoder.stages``) to our
names (:func:`to_ours`); timm and HF go through the official names first.
"""
import re
from typing import Dict, Tuple

import torch

from ..checkpoint.errors import CheckpointMismatchError
from ..checkpoint.rename import any_key_matches, rename_key


def to_ours(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], str, Dict[str, str]]:
    """Any supported layout (official, timm, HF transformers, ours) -> our names; returns
    ``(sd, format, dropped)``."""
    keys = sorted(sd)

    def has(pat):
        return any_key_matches(keys, pat)

    if not any(k.endswith('attention_biases') for k in keys):
        raise CheckpointMismatchError(
            'not a LeViT checkpoint: it has no attention_biases tables (official blocks.N.m.attention_biases, '
            'timm stages.N.blocks.M.attn.attention_biases or HF encoder.stages.N.layers.M.module.'
            f'attention_biases); first keys: {keys[:5]}')
    if has(r'stem\.conv1\.conv\.weight$') or has(r'stages\.\d+\.blocks\.\d+\.attn\.qkv\.fc\.'):
        out, fmt = dict(sd), 'vit_backbones'
        dropped = {}
    else:
        if has(r'patch_embeddings\.embedding_layer_1\.') or has(r'encoder\.stages\.\d+\.layers\.'):
            official, fmt = _hf_to_official(sd), 'hf'
        elif has(r'stem\.conv1\.linear\.') or has(r'stages\.\d+\.(blocks|downsample)\.'):
            official, fmt = _timm_to_official(sd), 'timm'
        elif has(r'patch_embed\.0\.c\.') or has(r'blocks\.\d+\.m\.qkv\.c\.'):
            official, fmt = dict(sd), 'official'
        else:
            raise CheckpointMismatchError(
                'not a LeViT checkpoint layout this package knows: found none of the official '
                '(patch_embed.0.c / blocks.N.m.qkv.c), timm (stem.conv1.linear / stages.N.blocks), HF '
                f'transformers (patch_embeddings / encoder.stages) or vit_backbones keys; first keys: {keys[:5]}')
        out, dropped = _official_to_ours(official)
    return out, fmt, dropped


# ---------------------------------------------------------------------- layout converters
def _official_to_ours(sd: Dict[str, torch.Tensor]):
    """Official facebookresearch/LeViT names (flat ``blocks.N``) -> ours; returns (state dict, dropped)."""
    out, dropped = {}, {}
    units = sorted({int(m.group(1)) for k in sd for m in [re.match(r'blocks\.(\d+)\.', k)] if m})
    kind_of = {}
    stage, block, last = 0, -1, None
    for n in units:
        pre = f'blocks.{n}.'
        if any(k.startswith(pre + 'kv.') for k in sd):
            stage, block, last = stage + 1, -1, 'shrink'
            kind_of[n] = f'stages.{stage}.shrink.attn.'
        elif any(k.startswith(pre + 'm.qkv.') for k in sd):
            block, last = block + 1, 'attn'
            kind_of[n] = f'stages.{stage}.blocks.{block}.attn.'
        else:  # residual MLP: belongs to the unit before it
            kind_of[n] = (f'stages.{stage}.shrink.mlp.' if last == 'shrink' else f'stages.{stage}.blocks.{block}.mlp.')
            last = 'mlp'
    for k, v in sd.items():
        if k.endswith('attention_bias_idxs'):
            dropped[k] = 'bias index buffer: recomputed for the runtime grid'
            continue
        if k.startswith(('head.', 'head_dist.')):
            dropped[k] = 'classification head'
            continue
        m = re.match(r'patch_embed\.(\d)\.(c|bn)\.(.*)$', k)
        if m:
            out[f'stem.conv{int(m.group(1)) // 2 + 1}.{"conv" if m.group(2) == "c" else "bn"}.{m.group(3)}'] = v
            continue
        m = re.match(r'blocks\.(\d+)\.(.*)$', k)
        if not m:
            out[k] = v  # unknown: reported as unexpected by the loader
            continue
        target, rest = kind_of[int(m.group(1))], m.group(2)
        rest = rename_key(rest, [(r'^m\.qkv\.', 'qkv.'), (r'^m\.proj\.1\.', 'proj.'), (r'^m\.attention_biases$',
                                 'attention_biases'), (r'^m\.0\.', 'fc1.'), (r'^m\.2\.', 'fc2.'), (r'^q\.1\.', 'q.'),
                                (r'^proj\.1\.', 'proj.')])
        rest = re.sub(r'(^|\.)c\.weight$', r'\1fc.weight', rest)
        if rest.endswith('fc.weight') and v.ndim == 4:  # timm's levit_conv_* (1x1 convolutions)
            v = v.flatten(1)
        out[target + rest] = v
    return out, dropped


def _timm_to_official(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm >= 0.9 ``Levit`` names (stem.convK, stages.S.downsample / blocks) -> official flat names."""
    out = {}
    stages = sorted({int(m.group(1)) for k in sd for m in [re.match(r'stages\.(\d+)\.', k)] if m})
    flat, n = {}, 0
    for s in stages:
        if any(k.startswith(f'stages.{s}.downsample.attn_downsample.') for k in sd):
            flat[f'stages.{s}.downsample.attn_downsample.'] = n
            flat[f'stages.{s}.downsample.mlp.'] = n + 1
            n += 2
        nb = {int(m.group(1)) for k in sd for m in [re.match(rf'stages\.{s}\.blocks\.(\d+)\.', k)] if m}
        for j in sorted(nb):
            flat[f'stages.{s}.blocks.{j}.attn.'] = n
            flat[f'stages.{s}.blocks.{j}.mlp.'] = n + 1
            n += 2
    leaf = [(r'(^|\.)linear\.weight$', r'\1c.weight')]
    for k, v in sd.items():
        m = re.match(r'stem\.conv(\d)\.(linear|bn)\.(.*)$', k)
        if m:
            out[f'patch_embed.{2 * (int(m.group(1)) - 1)}.{"c" if m.group(2) == "linear" else "bn"}.{m.group(3)}'] = v
            continue
        if k.startswith(('head.', 'head_dist.')):
            out[k.replace('.linear.', '.l.')] = v
            continue
        for pre, idx in flat.items():
            if k.startswith(pre):
                rest = k[len(pre):]
                if pre.endswith('attn_downsample.'):
                    rest = rename_key(rest, [(r'^q\.ln\.', 'q.1.'), (r'^proj\.ln\.', 'proj.1.')])
                elif pre.endswith('.attn.'):
                    rest = 'm.' + rename_key(rest, [(r'^proj\.ln\.', 'proj.1.')])
                else:  # MLP
                    rest = 'm.' + rename_key(rest, [(r'^ln1\.', '0.'), (r'^ln2\.', '2.')])
                out[f'blocks.{idx}.' + rename_key(rest, leaf)] = v
                break
        else:
            out[k] = v
    return out


def _hf_to_official(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """HF transformers ``LevitModel`` / ``LevitForImageClassification(WithTeacher)`` -> official names."""
    out = {}
    counts = {}
    for k in sd:
        m = re.match(r'encoder\.stages\.(\d+)\.layers\.(\d+)\.', k)
        if m:
            s, j = int(m.group(1)), int(m.group(2))
            counts[s] = max(counts.get(s, 0), j + 1)
    offset, n = {}, 0
    for s in sorted(counts):
        offset[s], n = n, n + counts[s]
    leaf = [(r'(^|\.)linear\.weight$', r'\1c.weight'), (r'(^|\.)batch_norm\.', r'\1bn.')]
    inner = [(r'^module\.queries_keys_values\.', 'm.qkv.'), (r'^module\.projection\.', 'm.proj.1.'),
             (r'^module\.attention_bias', 'm.attention_bias'), (r'^module\.linear_up\.', 'm.0.'),
             (r'^module\.linear_down\.', 'm.2.'), (r'^keys_values\.', 'kv.'), (r'^queries\.', 'q.1.'),
             (r'^projection\.', 'proj.1.')]
    for k, v in sd.items():
        m = re.match(r'patch_embeddings\.embedding_layer_(\d)\.(convolution|batch_norm)\.(.*)$', k)
        if m:
            part = 'c' if m.group(2) == 'convolution' else 'bn'
            out[f'patch_embed.{2 * (int(m.group(1)) - 1)}.{part}.{m.group(3)}'] = v
            continue
        m = re.match(r'encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)$', k)
        if m:
            idx = offset[int(m.group(1))] + int(m.group(2))
            out[f'blocks.{idx}.' + rename_key(m.group(3), inner + leaf)] = v
            continue
        m = re.match(r'(classifier|classifier_distill)\.(batch_norm|linear)\.(.*)$', k)
        if m:
            out[f'{"head" if m.group(1) == "classifier" else "head_dist"}.{"bn" if m.group(2) == "batch_norm" else "l"}.'
                f'{m.group(3)}'] = v
            continue
        out[k] = v
    return out
