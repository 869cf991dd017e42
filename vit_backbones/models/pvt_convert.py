"""Checkpoint conversion for PVT v1 and v2: every supported layout (official whai362/PVT, timm, HF
transformers v1 and v2, mmdet) to the official names (:func:`to_official`), then the official names to
ours (:func:`official_to_ours`). :meth:`~vit_backbones.models.pvt.PVTv2.convert_checkpoint` runs both.
"""
import re
from typing import Dict, Optional, Tuple

import torch

from ..checkpoint.errors import CheckpointMismatchError
from ..checkpoint.rename import any_key_matches, rename_key, rename_keys


def to_official(sd: Dict[str, torch.Tensor]) -> Tuple[Optional[Dict[str, torch.Tensor]], str]:
    """Any supported layout -> official whai362/PVT classification names; returns ``(sd, format)``, with
    ``sd`` None for a checkpoint already in our names."""
    keys = set(sd)

    def has(pat):
        return any_key_matches(keys, pat)

    if not (has(r'.*\.attn\.(kv|attn\.in_proj_weight)\.?') or has(r'.*\.attention\.(self\.)?key\.')):
        raise CheckpointMismatchError(
            'not a PVT checkpoint: no spatial-reduction attention (attn.kv, attn.attn.in_proj_weight or '
            f'attention.key) found; first keys: {sorted(keys)[:5]}')
    if has(r'stages\.\d+\.patch_embed\.proj\.'):
        return None, 'vit_backbones'
    if has(r'layers\.\d+\.0\.projection\.') or has(r'layers\.\d+\.1\.\d+\.attn\.attn\.in_proj_weight'):
        return _mmdet_to_official(sd), 'mmdet'
    if has(r'encoder\.layers\.\d+\.patch_embedding\.'):
        return _hf_v2_to_official(sd), 'hf'
    if has(r'encoder\.patch_embeddings\.\d+\.'):
        return _hf_v1_to_official(sd), 'hf'
    if has(r'stages\.\d+\.downsample\.') or (has(r'patch_embed\.proj\.') and has(r'stages\.\d+\.blocks\.')):
        return _timm_to_official(sd), 'timm'
    if has(r'patch_embed\d+\.proj\.') or has(r'block\d+\.\d+\.attn\.q\.'):
        return dict(sd), 'official'
    raise CheckpointMismatchError(
        f'not a PVT checkpoint: found none of the official (patch_embed1 / block1.0.attn.q), timm '
        f'(stages.N.blocks / stages.N.downsample), HF transformers (encoder.layers.N.patch_embedding or '
        f'encoder.patch_embeddings.N), mmdet (layers.N.0.projection) or vit_backbones layouts; '
        f'first keys: {sorted(keys)[:5]}')


def official_to_ours(model, sd: Dict[str, torch.Tensor], fmt: str):
    """Official PVT names -> those of ``model`` (a PVT or PVTv2); returns ``(sd, format, dropped)``: the class
    token, its position slot and the final norm are kept only where the model has them."""
    out, dropped = {}, {}
    last = len(model.stages) - 1
    for k, v in sd.items():
        if k.startswith(('head.', 'classifier.')):
            dropped[k] = 'classification head'
            continue
        nk = k
        m = re.match(r'patch_embed(\d+)\.(.*)$', k) or re.match(r'block(\d+)\.(.*)$', k)
        if m:
            i = int(m.group(1)) - 1
            rest = m.group(2).replace('mlp.dwconv.dwconv.', 'mlp.dwconv.')
            nk = f'stages.{i}.{"patch_embed" if k.startswith("patch") else "blocks"}.{rest}'
        elif re.match(r'pos_embed\d+$', k):
            i = int(k[len('pos_embed'):]) - 1
            nk = f'stages.{i}.pos_embed'
            n = v.shape[1]
            has_slot = int(round(n**0.5))**2 != n and int(round((n - 1)**0.5))**2 == n - 1
            if has_slot and i < len(model.stages) and model.stages[i].cls_token is None:
                v = v[:, 1:]
                dropped[f'{k}[:, :1]'] = ('class-token position slot (the backbone has no class token; '
                                          'use_cls_token=True keeps it)')
        elif k == 'cls_token':
            if model.stages[last].cls_token is None:
                dropped[k] = 'class token (the backbone has none; use_cls_token=True keeps it)'
                continue
            nk = f'stages.{last}.cls_token'
        elif re.match(r'norm\d+\.', k):
            i = int(re.match(r'norm(\d+)\.', k).group(1)) - 1
            nk = f'stages.{i}.norm.' + k.split('.', 1)[1]
        elif k.startswith('norm.'):
            if not hasattr(model, f'norm{last}'):
                dropped[k] = ('final classification norm (the backbone returns raw stage maps; '
                              f'out_norm=True with level {last} in out_indices uses it)')
                continue
            nk = f'norm{last}.' + k[len('norm.'):]
        out[nk] = v
    return out, fmt, dropped


# ---------------------------------------------------------------------- layout converters (to official names)
def _cat_kv(out: dict, sd: dict, key_k: str, key_v: str, dst: str):
    for kind in ('weight', 'bias'):
        if f'{key_k}.{kind}' in sd:
            out[f'{dst}.{kind}'] = torch.cat([sd[f'{key_k}.{kind}'], sd[f'{key_v}.{kind}']], 0)


_TIMM_RULES = [
    (r'^patch_embed\.', 'patch_embed1.'),
    (r'^stages\.(\d+)\.downsample\.', lambda m: f'patch_embed{int(m.group(1)) + 1}.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.', lambda m: f'block{int(m.group(1)) + 1}.{m.group(2)}.'),
    (r'^stages\.(\d+)\.norm\.', lambda m: f'norm{int(m.group(1)) + 1}.'),
    (r'\.mlp\.dwconv\.(weight|bias)$', r'.mlp.dwconv.dwconv.\1'),
]


def _timm_to_official(sd):
    return rename_keys(sd, _TIMM_RULES)[0]


def _hf_to_official(sd, rules, inner, kv):
    """HF PVT layouts -> the official one: ``rules`` rename the outer (stage/block) part, ``inner`` the
    parts inside a block, and the separate key/value projections under ``kv`` are fused into ``attn.kv``."""
    out = {}
    for k, v in sd.items():
        if re.search(rf'\.{re.escape(kv)}\.(key|value)\.', k):
            if f'.{kv}.key.' in k and k.endswith('.weight'):
                base = k[:-len(f'.{kv}.key.weight')]
                _cat_kv(out, sd, f'{base}.{kv}.key', f'{base}.{kv}.value', rename_key(base + '.', rules) + 'attn.kv')
            continue
        nk = rename_key(k, rules)
        for a, b in inner:
            nk = nk.replace('.' + a, '.' + b)
        if nk.startswith('classifier.'):
            nk = 'head.' + nk[len('classifier.'):]
        out[nk] = v
    return out


_HF_V2_RULES = [
    (r'^encoder\.layers\.(\d+)\.patch_embedding\.proj\.', lambda m: f'patch_embed{int(m.group(1)) + 1}.proj.'),
    (r'^encoder\.layers\.(\d+)\.patch_embedding\.layer_norm\.', lambda m: f'patch_embed{int(m.group(1)) + 1}.norm.'),
    (r'^encoder\.layers\.(\d+)\.layer_norm\.', lambda m: f'norm{int(m.group(1)) + 1}.'),
    (r'^encoder\.layers\.(\d+)\.blocks\.(\d+)\.', lambda m: f'block{int(m.group(1)) + 1}.{m.group(2)}.'),
]
_HF_V2_INNER = [('layer_norm_1.', 'norm1.'), ('layer_norm_2.', 'norm2.'), ('attention.query.', 'attn.q.'),
                ('attention.proj.', 'attn.proj.'), ('attention.spatial_reduction.', 'attn.sr.'),
                ('attention.layer_norm.', 'attn.norm.'), ('mlp.dense1.', 'mlp.fc1.'), ('mlp.dense2.', 'mlp.fc2.')]
_HF_V1_RULES = [
    (r'^encoder\.patch_embeddings\.(\d+)\.projection\.', lambda m: f'patch_embed{int(m.group(1)) + 1}.proj.'),
    (r'^encoder\.patch_embeddings\.(\d+)\.layer_norm\.', lambda m: f'patch_embed{int(m.group(1)) + 1}.norm.'),
    (r'^encoder\.patch_embeddings\.(\d+)\.position_embeddings$', lambda m: f'pos_embed{int(m.group(1)) + 1}'),
    (r'^encoder\.patch_embeddings\.\d+\.cls_token$', lambda m: 'cls_token'),
    (r'^encoder\.layer_norm\.', lambda m: 'norm.'),
    (r'^encoder\.block\.(\d+)\.(\d+)\.', lambda m: f'block{int(m.group(1)) + 1}.{m.group(2)}.'),
]
_HF_V1_INNER = [('layer_norm_1.', 'norm1.'), ('layer_norm_2.', 'norm2.'), ('attention.self.query.', 'attn.q.'),
                ('attention.output.dense.', 'attn.proj.'), ('attention.self.sequence_reduction.', 'attn.sr.'),
                ('attention.self.layer_norm.', 'attn.norm.'), ('mlp.dense1.', 'mlp.fc1.'), ('mlp.dense2.', 'mlp.fc2.')]


def _hf_v2_to_official(sd):
    return _hf_to_official(sd, _HF_V2_RULES, _HF_V2_INNER, 'attention')


def _hf_v1_to_official(sd):
    return _hf_to_official(sd, _HF_V1_RULES, _HF_V1_INNER, 'attention.self')


def _mmdet_to_official(sd):
    """mmdet PyramidVisionTransformer(V2): nn.MultiheadAttention packing and 1x1-conv FFN."""
    out = {}
    with_pos = any(re.match(r'layers\.\d+\.1\.0\.pos_embed$', k) for k in sd)
    conv_ffn = any(re.search(r'\.ffn\.layers\.1\.weight$', k) for k in sd)
    fc2 = '4' if conv_ffn else '3'
    for k, v in sd.items():
        m = re.match(r'layers\.(\d+)\.(\d+)\.(.*)$', k)
        if not m:
            out[k] = v
            continue
        i, part, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
        if part == '0':
            out[f'patch_embed{i}.' + rest.replace('projection.', 'proj.')] = v
        elif part == '2':
            out[f'norm{i}.{rest}'] = v
        elif part == '1':
            j, rest = rest.split('.', 1)
            j = int(j)
            if with_pos and j == 0:
                out[f'pos_embed{i}'] = v
                continue
            pre = f'block{i}.{j - int(with_pos)}.'
            if rest.startswith('attn.attn.in_proj_'):
                kind = rest[len('attn.attn.in_proj_'):]
                c = v.shape[0] // 3
                out[pre + f'attn.q.{kind}'] = v[:c]
                out[pre + f'attn.kv.{kind}'] = v[c:]
            elif rest.startswith('attn.attn.out_proj.'):
                out[pre + 'attn.proj.' + rest[len('attn.attn.out_proj.'):]] = v
            elif rest.startswith('ffn.layers.'):
                idx, kind = rest[len('ffn.layers.'):].split('.', 1)
                name = {'0': 'mlp.fc1', '1': 'mlp.dwconv.dwconv', fc2: 'mlp.fc2'}[idx]
                if name != 'mlp.dwconv.dwconv' and kind == 'weight':
                    v = v.reshape(v.shape[0], v.shape[1])
                out[pre + f'{name}.{kind}'] = v
            else:
                out[pre + rest] = v
    return out
