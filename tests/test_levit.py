"""LeViT: parity with HF transformers (at the pre-training grid, at an odd grid, and with resampled bias
tables), the official parameter counts, checkpoint layouts (official, timm, HF, ours), the backbone
contract (any size, gradients, with_cp, frozen_stages, norm_eval) and the detection/segmentation configs."""
import functools
import os
import re

import pytest
import torch
import torch.nn.functional as F

import vit_backbones
from vit_backbones.checkpoint import CheckpointMismatchError

from test_configs import _build_model, _load, _set_size, _tiny_run  # tests/ is on sys.path under pytest, as for helpers.py

# a tiny variant with every code path (two shrink blocks, multi-block stages, value ratio != 1)
TINY = dict(embed_dims=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4), depths=(1, 2, 1), attn_ratio=2, mlp_ratio=2,
            shrink_attn_ratio=4, shrink_mlp_ratio=2, drop_path_rate=0.)
HF_TINY = dict(hidden_sizes=[32, 48, 64], key_dim=[8, 8, 8], num_attention_heads=[2, 3, 4], depths=[1, 2, 1],
               mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2])


def _levit(arch=TINY, **kw):
    return vit_backbones.build_backbone('LeViT', arch, **kw)


def _randomize(module, seed=0):
    """Random values in every parameter and BatchNorm statistic, so no mapping or BN hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in module.named_parameters():
            # large bias tables and BN scales: a wrongly indexed or resampled table changes the outputs a lot
            scale = 3. if k.endswith('attention_biases') else 0.5 if re.search(r'(bn|batch_norm)\.weight$', k) else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        for name, b in module.named_buffers():
            if name.endswith('running_mean'):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith('running_var'):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return module


def _max_diff(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape, (x.shape, y.shape)
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _hf_model(image_size=224, seed=0, **over):
    from transformers import LevitConfig, LevitModel
    torch.manual_seed(seed)
    hf = LevitModel(LevitConfig(image_size=image_size, **dict(HF_TINY, **over)))
    return _randomize(hf, seed).eval()


def _hf_levels(hf, x):
    """HF's stem taps (after its 2nd/3rd conv + Hardswish) and every stage's output *before* the stage's
    trailing subsample (HF puts the shrink block at the end of a stage), via forward hooks."""
    got = {}
    hooks = [hf.patch_embeddings.activation_layer_2.register_forward_hook(lambda m, i, o: got.__setitem__(0, o)),
             hf.patch_embeddings.activation_layer_3.register_forward_hook(lambda m, i, o: got.__setitem__(1, o))]
    depths = hf.config.depths
    for s, stage in enumerate(hf.encoder.stages):
        last_block = 2 * depths[s] - 1  # (attention, MLP) residual pairs come first
        hooks.append(stage.layers[last_block].register_forward_hook(
            lambda m, i, o, s=s: got.__setitem__(2 + s, o)))
    with torch.no_grad():
        hf(x)
    for h in hooks:
        h.remove()
    out = [got[0], got[1]]
    res = -(-x.shape[-1] // 16)
    for s in range(len(depths)):
        t = got[2 + s]
        out.append(t.transpose(1, 2).reshape(t.shape[0], t.shape[2], res, res))
        res = -(-res // 2)
    return out


# ----------------------------------------------------------------------------- parity with HF transformers
@pytest.mark.parametrize('image_size, hw', [(224, 224), (208, 200)])
def test_parity_hf_levit(image_size, hw):
    """At the pre-training size (224: 14/7/4 grids) and at an awkward one: a 200x200 input gives 13/7/4
    grids (odd, ceil subsampling); HF runs only at its configured grid, so it is built for image_size=208
    (13x13 tokens, the tables for 13/7/4) and ours with img_size=208 from the converted HF weights."""
    hf = _hf_model(image_size)
    ours = _levit(img_size=image_size).eval()
    report = ours.load_checkpoint(hf.state_dict())
    assert report.source_format == 'hf' and report.missing == []
    x = torch.randn(2, 3, hw, hw)
    with torch.no_grad():
        mine = ours(x)
    ref = _hf_levels(hf, x)
    assert [tuple(o.shape[-2:]) for o in mine] == [(-(-hw // s), ) * 2 for s in (4, 8, 16, 32, 64)]
    assert _max_diff(mine, ref) < 1e-4
    # the comparison is sensitive to the bias layout: (|dx|, |dy|) instead of (|dy|, |dx|) is far off
    _transpose_tables(ours)
    with torch.no_grad():
        assert _max_diff(ours(x), ref) > 1e-2


def _transpose_tables(model):
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, 'attention_biases'):
                th, tw = mod.table_hw
                mod.attention_biases.copy_(mod.attention_biases.reshape(-1, th, tw).transpose(1, 2).reshape(-1, th * tw))


def _resampled_reference_table(table, t, g):
    """Test-side restatement of the documented resampling: the (heads, t*t) |offset| table written out as a
    signed-offset table S[i, j] = T[|i - (t-1)|, |j - (t-1)|], bicubic (align_corners=False) to 2g-1, and
    its non-negative quarter."""
    heads = table.shape[0]
    tt = table.reshape(heads, t, t)
    signed = (torch.arange(2 * t - 1) - (t - 1)).abs()
    s = tt[:, signed][:, :, signed]
    r = F.interpolate(s[None].float(), size=(2 * g - 1, 2 * g - 1), mode='bicubic', align_corners=False)[0]
    return r[:, g - 1:, g - 1:].reshape(heads, g * g)


def test_parity_hf_with_resampled_bias_tables():
    """Ours built for 224 (tables 14/7/4) run at 256x256 (grids 16/8/4, larger than the tables) equals HF
    built for 256 whose tables are ours resampled by the reference definition above."""
    ours = _randomize(_levit(img_size=224)).eval()
    hf = _hf_model(256)
    sd = {k: v for k, v in hf.state_dict().items()}
    ours_sd = ours.state_dict()
    # HF keys <- ours, by position: both enumerate the same modules in the same order
    own_keys = [k for k in ours_sd if not k.endswith('num_batches_tracked')]
    hf_keys = [k for k in sd if not k.endswith('num_batches_tracked')]
    assert len(own_keys) == len(hf_keys)
    grids = {14: 16, 7: 8, 4: 4}
    new = {}
    for ko, kh in zip(_hf_order(own_keys), hf_keys):
        v = ours_sd[ko]
        if ko.endswith('attention_biases'):
            t = int(round(v.shape[1]**0.5))
            v = _resampled_reference_table(v, t, grids[t]) if grids[t] != t else v
        assert v.shape == sd[kh].shape, (ko, kh)
        new[kh] = v
    hf.load_state_dict(new, strict=False)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        mine = ours(x)
    ref = _hf_levels(hf, x)
    assert _max_diff(mine, ref) < 1e-4
    # sensitive to the resampling kernel: bilinear instead of the documented bicubic is clearly off
    for mod in ours.modules():
        if hasattr(mod, 'attention_biases'):
            mod.bias_interpolation = 'bilinear'
    with torch.no_grad():
        assert _max_diff(ours(x), ref) > 1e-3
    for mod in ours.modules():
        if hasattr(mod, 'attention_biases'):
            mod.bias_interpolation = 'bicubic'
    # and loading the 224 weights into a model built for 256 resizes the tables on load: same outputs
    big = _levit(img_size=256).eval()
    report = big.load_checkpoint(ours.state_dict())
    assert any(k.endswith('attention_biases') for k in report.resized)
    with torch.no_grad():
        assert _max_diff(big(x), mine) < 1e-5


def _hf_order(keys):
    """Our state-dict keys in HF's module order (HF: stem, then per stage blocks then its shrink)."""
    def rank(k):
        m = re.match(r'stages\.(\d+)\.(shrink|blocks\.(\d+))\.', k)
        if not m:
            return (-1, 0, 0)
        s = int(m.group(1))
        if m.group(2) == 'shrink':
            return (s - 1, 10**6, 0)
        return (s, int(m.group(3)), 0)
    return sorted(keys, key=lambda k: (rank(k), keys.index(k)))


def test_bias_matrix_on_a_non_square_grid_follows_the_definition():
    """bias[h, q, k] = table'[h, |qy*s - ky|, |qx*s - kx|] for a non-square runtime grid, where table' is the
    learned table cropped (short side) or resampled (long side), computed here by explicit loops."""
    m = _randomize(_levit(img_size=(64, 64)))  # stage-0 tables 4x4, shrink table 4x4
    attn = m.stages[0].blocks[0].attn
    shrink = m.stages[1].shrink.attn
    kh, kw = 3, 7  # height cropped (3 < 4), width resampled (7 > 4)
    for mod, stride in ((attn, 1), (shrink, 2)):
        heads = mod.attention_biases.shape[0]
        t = mod.attention_biases.detach().reshape(heads, 4, 4)
        # width resampled on the signed offsets, height kept (crop to 3 offsets first)
        crop = t[:, :3, :]
        signed = crop[:, :, (torch.arange(7) - 3).abs()]
        wide = F.interpolate(signed[:, None].float(), size=(3, 13), mode='bicubic', align_corners=False)[:, 0]
        ref_table = wide[:, :, 6:]  # heads, 3, 7
        qh, qw = -(-kh // stride), -(-kw // stride)
        ref = torch.empty(heads, qh * qw, kh * kw)
        for qy in range(qh):
            for qx in range(qw):
                for ky in range(kh):
                    for kx in range(kw):
                        ref[:, qy * qw + qx, ky * kw + kx] = ref_table[:, abs(qy * stride - ky), abs(qx * stride - kx)]
        got = mod.attention_bias((qh, qw), (kh, kw), stride, torch.device('cpu')).detach()
        assert torch.allclose(got, ref, atol=1e-6)
    # at the table's own grid: exactly the learned values (no interpolation)
    got = attn.attention_bias((4, 4), (4, 4), 1, torch.device('cpu')).detach()
    assert torch.equal(got[:, 0].reshape(-1, 4, 4), attn.attention_biases.detach().reshape(-1, 4, 4))


def test_hf_teacher_checkpoint_drops_both_heads():
    from transformers import LevitConfig, LevitForImageClassificationWithTeacher
    hf = _randomize(LevitForImageClassificationWithTeacher(LevitConfig(num_labels=10, **HF_TINY))).eval()
    ours = _levit().eval()
    report = ours.load_checkpoint(hf.state_dict())
    assert report.source_format == 'hf' and report.missing == []
    heads = [k for k in report.dropped if k.startswith(('head.', 'head_dist.'))]
    assert len(heads) == 2 * (5 + 2)  # BN (weight, bias, 3 buffers) + Linear (weight, bias), twice
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert _max_diff(ours(x), _hf_levels(hf.levit, x)) < 1e-4


# ----------------------------------------------------------------------------- parameter counts (paper)
@pytest.mark.parametrize('arch', ['128s', '128', '192', '256', '384'])
def test_param_count_matches_paper(arch):
    """Paper/README counts include the two BN+Linear ImageNet heads (class + distillation), unfused."""
    with torch.device('meta'):
        m = _levit(arch)
    table = m.paper_table[arch]['params']
    assert abs(m.paper_param_count() / 1e6 - table) / table < 0.02
    c = m.embed_dims[-1]
    assert m.classifier_param_delta() == 2 * (2 * c + c * 1000 + 1000)


# ----------------------------------------------------------------------------- shapes / contract
@functools.lru_cache(maxsize=None)
def _eval_model():
    return _randomize(_levit('128s')).eval()


def test_out_indices_subset_builds_only_needed_stages():
    m = _levit(out_indices=(1, 2, 3))
    assert len(m.stages) == 2 and m.out_strides == [8, 16, 32] and m.min_input_size == 32
    full = _randomize(_levit()).eval()
    report = m.load_checkpoint(full.state_dict())
    assert all('not built' in report.dropped[k] for k in report.dropped if k.startswith('stages.2.'))
    assert any(k.startswith('stages.2.') for k in report.dropped)
    m.eval()
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        assert _max_diff(m(x), full(x)[1:4]) == 0
    with torch.device('meta'):
        short = _levit('128s', out_indices=(0, 1, 2, 3))
    assert short.paper_param_count() == pytest.approx(7.777058e6, rel=1e-6)  # unbuilt stage counted back


def test_bad_inputs_and_arch_names():
    m = _eval_model()
    with pytest.raises(ValueError, match='at least 64x64'):
        m(torch.randn(1, 3, 48, 200))
    with pytest.raises(ValueError, match='input channels'):
        m(torch.randn(1, 1, 64, 64))
    with pytest.raises(TypeError, match='floating-point'):
        m(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match='unknown arch'):
        _levit('512')
    with torch.device('meta'):
        assert _levit('LeViT-128S').arch_name == '128s' and _levit('levit_256').arch_name == '256'
        assert _levit('384').drop_path_rate == 0.1 and _levit('256').drop_path_rate == 0.0
    t = _levit().train()
    with pytest.raises(ValueError, match='more than one token'):
        t(torch.randn(1, 3, 64, 64))  # batch 1, one stride-64 token: BatchNorm cannot train on it


def test_frozen_stages():
    m = _levit(frozen_stages=1).train()
    for k, p in m.named_parameters():
        assert p.requires_grad == (not k.startswith(('stem.', 'stages.0.'))), k
    assert not m.stem.training and not m.stages[0].training and m.stages[1].training
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.randn(2, 3, 96, 96))
    after = m.state_dict()
    for k in before:
        if k.startswith(('stem.', 'stages.0.')):
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before['stages.1.blocks.0.attn.qkv.bn.running_mean'],
                           after['stages.1.blocks.0.attn.qkv.bn.running_mean'])


# ----------------------------------------------------------------------------- checkpoint layouts
def _to_official(sd):
    """Our names -> facebookresearch/LeViT levit.py names, written from its module structure: stem
    Sequential ``patch_embed.{0,2,4,6}`` of Conv2d_BN (``c``, ``bn``), flat ``blocks.N``: Residual(``m``)
    around Attention (``qkv``, ``proj.1``, ``attention_biases``) and MLP Sequential (``m.0``, ``m.2``);
    AttentionSubsample unwrapped (``kv``, ``q.1``, ``proj.1``); persistent ``attention_bias_idxs``."""
    out, n, flat = {}, 0, {}
    stages = sorted({int(m.group(1)) for k in sd for m in [re.match(r'stages\.(\d+)\.', k)] if m})
    for s in stages:
        if any(k.startswith(f'stages.{s}.shrink.') for k in sd):
            flat[f'stages.{s}.shrink.attn.'], flat[f'stages.{s}.shrink.mlp.'] = (f'blocks.{n}.', f'blocks.{n + 1}.m.')
            n += 2
        nb = sorted({int(m.group(1)) for k in sd for m in [re.match(rf'stages\.{s}\.blocks\.(\d+)\.', k)] if m})
        for j in nb:
            flat[f'stages.{s}.blocks.{j}.attn.'], flat[f'stages.{s}.blocks.{j}.mlp.'] = (f'blocks.{n}.m.',
                                                                                      f'blocks.{n + 1}.m.')
            n += 2
    for k, v in sd.items():
        m = re.match(r'stem\.conv(\d)\.(conv|bn)\.(.*)', k)
        if m:
            out[f'patch_embed.{2 * int(m.group(1)) - 2}.{"c" if m.group(2) == "conv" else "bn"}.{m.group(3)}'] = v
            continue
        for pre, new in flat.items():
            if k.startswith(pre):
                rest = k[len(pre):].replace('fc.weight', 'c.weight')
                rest = rest.replace('fc1.', '0.').replace('fc2.', '2.').replace('proj.', 'proj.1.').replace('q.', 'q.1.')
                out[new + rest] = v
                break
    for k in list(out):
        if k.endswith('attention_biases'):
            out[k[:-len('attention_biases')] + 'attention_bias_idxs'] = torch.zeros(3, 3, dtype=torch.long)
    out['head.bn.weight'] = out['head_dist.l.weight'] = torch.ones(5)
    return out


def _to_timm(sd):
    """Our names -> timm (>= 0.9) levit.py names: stem.convK.{linear,bn}, stages.S.downsample
    (attn_downsample.{kv, q.ln, proj.ln}, mlp.{ln1, ln2}), stages.S.blocks.J.{attn.{qkv, proj.ln},
    mlp.{ln1, ln2}}, LinearNorm/ConvNorm parts ``linear``/``bn``; optionally the conv variant (1x1 weights)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r'^stem\.conv(\d)\.conv\.', r'stem.conv\1.linear.', k)
        k = re.sub(r'^stages\.(\d+)\.shrink\.attn\.', r'stages.\1.downsample.attn_downsample.', k)
        k = re.sub(r'^stages\.(\d+)\.shrink\.mlp\.', r'stages.\1.downsample.mlp.', k)
        k = k.replace('.q.', '.q.ln.').replace('.proj.', '.proj.ln.').replace('.fc1.', '.ln1.').replace('.fc2.', '.ln2.')
        k = k.replace('.fc.weight', '.linear.weight')
        out[k] = v
    return out


@pytest.mark.parametrize('layout', ['official', 'timm', 'timm_conv', 'ours'])
def test_checkpoint_layouts_load_to_the_same_model(layout):
    src = _randomize(_levit()).eval()
    sd = src.state_dict()
    if layout == 'official':
        ckpt = {'model': _to_official(sd)}
    elif layout.startswith('timm'):
        ckpt = _to_timm(sd)
        if layout == 'timm_conv':
            ckpt = {k: (v[:, :, None, None] if k.endswith('linear.weight') and v.ndim == 2 else v) for k, v in ckpt.items()}
    else:
        ckpt = {f'backbone.{k}': v for k, v in sd.items()}
    dst = _levit().eval()
    report = dst.load_checkpoint(ckpt)
    assert report.source_format == {'official': 'official', 'timm': 'timm', 'timm_conv': 'timm',
                                    'ours': 'vit_backbones'}[layout]
    assert report.missing == []
    if layout == 'official':
        assert all('recomputed' in report.dropped[k] for k in report.dropped if k.endswith('attention_bias_idxs'))
    x = torch.randn(1, 3, 80, 96)
    with torch.no_grad():
        assert _max_diff(dst(x), src(x)) == 0


def test_checkpoint_of_another_model_or_variant_is_refused():
    m = _levit('128s')
    swin = vit_backbones.build_backbone('Swin', 'tiny').state_dict()
    with pytest.raises(CheckpointMismatchError, match='not a LeViT checkpoint'):
        m.load_checkpoint(swin)
    other = _levit('128').state_dict()  # more blocks per stage, more heads
    with pytest.raises(CheckpointMismatchError, match='arch'):
        m.load_checkpoint(other)


def test_checkpoint_file_and_init_cfg(tmp_path):
    src = _randomize(_levit()).eval()
    path = str(tmp_path / 'LeViT-tiny.pth')
    torch.save({'model': _to_official(src.state_dict())}, path)
    m = _levit(init_cfg=dict(type='Pretrained', checkpoint=path))
    m.init_weights()
    m.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(m(x), src(x)) == 0


# ----------------------------------------------------------------------------- configs
LEVIT_CONFIGS = ['retinanet_levit_256_fpn_1x_coco.py', 'fpn_levit_256_ade20k_40k.py']
LEVIT_TINY = dict(base='256', embed_dims=(32, 48, 64), key_dim=16, num_heads=(2, 3, 4), depths=(1, 1, 1))


@pytest.mark.parametrize('name', LEVIT_CONFIGS)
def test_levit_config_builds_model(name):
    cfg = _load(name)
    assert cfg.custom_imports == dict(imports=['vit_backbones'], allow_failed_imports=False)
    bb = cfg.model.backbone
    assert (bb.type, bb.arch) == ('LeViT', '256') and tuple(bb.out_indices) == (0, 1, 2, 3, 4)
    assert bb.init_cfg == dict(type='Pretrained', checkpoint='checkpoints/LeViT-256-13b5763e.pth')
    model = _build_model(cfg)
    backbone = model.backbone
    assert isinstance(backbone, vit_backbones.get_backbone_class('LeViT'))
    # trunk without the two ImageNet heads (18.89M - 2 * (2*512 + 512*1000 + 1000))
    assert sum(p.numel() for p in backbone.parameters()) == 18893876 - 2 * (2 * 512 + 512 * 1000 + 1000)
    assert cfg.model.neck.in_channels == backbone.out_channels == [64, 128, 256, 384, 512]
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.rand(1, 3, 96, 128))
    if cfg.default_scope == 'mmdet':  # RetinaNet FPN from stride 8: P3-P7, strides 8..128
        assert cfg.model.neck.start_level == 1 and cfg.model.neck.num_outs == 5
        assert [tuple(f.shape) for f in feats] == [(1, 256, 12, 16), (1, 256, 6, 8), (1, 256, 3, 4),
                                                    (1, 256, 2, 2), (1, 256, 1, 1)]
    else:  # Semantic FPN over all five levels, strides 4..64, all into the FPNHead
        assert cfg.model.decode_head.feature_strides == [4, 8, 16, 32, 64]
        assert cfg.model.decode_head.in_index == [0, 1, 2, 3, 4]
        assert [tuple(f.shape) for f in feats] == [(1, 256, 24, 32), (1, 256, 12, 16), (1, 256, 6, 8),
                                                    (1, 256, 3, 4), (1, 256, 2, 2)]


def _levit_on_synthetic(name, root):
    import vit_backbones as vb
    from vit_backbones.data import DEFAULT_CLASSES, ade_class_names
    cfg = _load(name)
    bb = cfg.model.backbone
    bb.update(arch=LEVIT_TINY, init_cfg=None)
    cfg.model.neck.in_channels = vb.build_backbone('LeViT', LEVIT_TINY).out_channels
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].update(num_workers=0, persistent_workers=False)
    cfg.train_dataloader.update(sampler=dict(type='InfiniteSampler', shuffle=True), batch_sampler=None)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=1, val_interval=1)
    if cfg.default_scope == 'mmdet':
        cfg.model.bbox_head.num_classes = len(DEFAULT_CLASSES)
        for loader in ('train_dataloader', 'val_dataloader'):
            cfg[loader].dataset.metainfo = dict(classes=DEFAULT_CLASSES)
    else:
        classes = ade_class_names()
        cfg.model.decode_head.num_classes = len(classes)
        cfg.model.data_preprocessor.size = (96, 96)
        for loader in ('train_dataloader', 'val_dataloader'):
            cfg[loader].dataset.update(type='BaseSegDataset', metainfo=dict(classes=classes), img_suffix='.jpg',
                                       seg_map_suffix='.png', reduce_zero_label=True)
        cfg.model.decode_head.norm_cfg = dict(type='BN', requires_grad=True)  # one CPU process: no SyncBN
    cfg.test_dataloader = cfg.val_dataloader
    _set_size(cfg, (96, 96))
    return cfg


def test_levit_retinanet_trains_and_predicts(tmp_path):
    from mmengine.dataset import pseudo_collate
    from vit_backbones.data import make_coco_instances
    root = str(tmp_path / 'coco') + os.sep
    paths = make_coco_instances(root, num_train=2, num_val=1, image_size=(96, 96), seed=0)
    cfg = _levit_on_synthetic('retinanet_levit_256_fpn_1x_coco.py', root)
    runner, changed = _tiny_run(cfg, tmp_path / 'work', root, paths['val_ann'])
    assert any(k.startswith('backbone.stages.2.') for k in changed) and any(k.startswith('bbox_head.') for k in changed)
    assert any(k.startswith('backbone.stem.conv1.') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    pred = sample.pred_instances
    assert pred.bboxes.shape[1] == 4 and len(pred) <= 100 and ((pred.labels >= 0) & (pred.labels < 3)).all()


def test_levit_semantic_fpn_trains_and_predicts(tmp_path):
    from mmengine.dataset import pseudo_collate
    from vit_backbones.data import make_ade_like
    root = str(tmp_path / 'ade') + os.sep
    make_ade_like(root, num_train=2, num_val=1, image_size=(96, 96), seed=0)
    cfg = _levit_on_synthetic('fpn_levit_256_ade20k_40k.py', root)
    runner, changed = _tiny_run(cfg, tmp_path / 'work', root)
    assert any(k.startswith('backbone.stages.2.') for k in changed) and any(k.startswith('decode_head.') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    seg = sample.pred_sem_seg.data
    assert tuple(seg.shape) == (1, 96, 96) and int(seg.min()) >= 0 and int(seg.max()) < 4


def test_eval_bias_cache_follows_the_tables():
    """Eval reuses each attention's gathered offset bias; an in-place change of a table, a new size or a
    new dtype must give what a model without the cache gives."""
    torch.manual_seed(0)
    arch = {'base': '128s', 'depths': (1, 1, 1)}
    model = vit_backbones.build_backbone('LeViT', arch).eval()
    x = torch.randn(1, 3, 97, 131)

    def fresh(inp):
        clone = vit_backbones.build_backbone('LeViT', arch).eval().to(next(model.parameters()).dtype)
        clone.load_state_dict(model.state_dict())
        with torch.no_grad():
            return clone(inp)

    with torch.no_grad():
        model(x)
        first = model(x)
    assert all(torch.equal(a, b) for a, b in zip(first, fresh(x)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('attention_biases'):
                p.add_(torch.randn_like(p))  # in place, as an optimizer step
        after = model(x)
        assert not all(torch.equal(a, b) for a, b in zip(after, first))
    assert all(torch.equal(a, b) for a, b in zip(after, fresh(x)))
    model.double()
    x64 = torch.randn(2, 3, 128, 96, dtype=torch.float64)
    with torch.no_grad():
        model(x64)
        out = model(x64)
    assert all(torch.equal(a, b) for a, b in zip(out, fresh(x64)))


@pytest.mark.parametrize('q_hw,kv_hw,stride', [((5, 7), (5, 7), 1), ((3, 4), (5, 7), 2)])
def test_offset_bias_gather_gradient_equals_indexing(monkeypatch, q_hw, kv_hw, stride):
    """The training gather of the offset bias (index_add_ backward, a few query rows at a time) gives the
    values and the table gradient of plain advanced indexing, in float64."""
    from vit_backbones.layers import attention_bias
    from vit_backbones.layers.attention_bias import gather_offset_bias, offset_bias_index
    monkeypatch.setattr(attention_bias, '_GATHER_GRAD_BLOCK', 2 * q_hw[1] * kv_hw[0] * kv_hw[1])  # 2 rows a block
    g = torch.Generator().manual_seed(0)
    table = torch.randn(3, kv_hw[0] * kv_hw[1], generator=g, dtype=torch.float64, requires_grad=True)
    index = offset_bias_index(q_hw, kv_hw, stride)
    bias = gather_offset_bias(table, kv_hw, index)
    assert '_OffsetGatherBackward' in str(bias.grad_fn.next_functions)  # the function, not plain indexing
    dy, dx = index
    ref = table.view(3, *kv_hw)[:, dy, dx].reshape(bias.shape)
    w = torch.randn(bias.shape, generator=g, dtype=torch.float64)
    assert torch.equal(bias, ref)
    got, = torch.autograd.grad((bias * w).sum(), table)
    want, = torch.autograd.grad((ref * w).sum(), table)
    assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_folded_batchnorms_give_the_modules_outputs_and_gradients(monkeypatch, dtype):
    """With frozen BatchNorm statistics (norm_eval=True) each LinearBN / ConvBN runs as one folded linear or
    convolution, in training (with autograd) and in eval: outputs, the input gradient and the gradients of
    the weights and of the BatchNorm affine parameters equal the modules' own (the running statistics stay)."""
    import vit_backbones.layers.linear as linear_mod
    torch.manual_seed(0)
    model = _levit(norm_eval=True).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.)
                m.weight.normal_(1., 0.2)
                m.bias.normal_(0., 0.2)
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k}
    x = torch.randn(2, 3, 64, 96, dtype=dtype)

    def run(fold):
        if not fold:
            monkeypatch.setattr(linear_mod, 'foldable', lambda *a: False)
            monkeypatch.setattr(linear_mod, 'inference_linear_bn', lambda *a: None)
            monkeypatch.setattr(linear_mod, 'inference_conv_bn', lambda *a: None)
        xi = x.clone().requires_grad_()
        outs = model(xi)
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=dtype).view(o.shape)).sum() for o in outs).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            evals = model(x)
        monkeypatch.undo()
        return outs, xi.grad, grads, evals

    outs, gx, grads, evals = run(True)
    ref_outs, ref_gx, ref_grads, ref_evals = run(False)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for a, b in zip(outs + evals, ref_outs + ref_evals):
        assert (a - b).abs().max() <= tol * b.abs().max()
    assert (gx - ref_gx).abs().max() <= tol * ref_gx.abs().max()
    assert grads.keys() == ref_grads.keys()
    scale = max(g.abs().max() for g in ref_grads.values())
    for name in ref_grads:
        assert (grads[name] - ref_grads[name]).abs().max() <= tol * scale, name
    assert any('bn.weight' in n for n in grads) and all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
