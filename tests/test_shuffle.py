"""Shuffle Transformer: the paper's sizes, the (shuffled-)window attention against direct implementations of
its definition, padding, the official checkpoint layout, the backbone contract and the two configs.

No PyPI package implements this model (no timm / HF transformers / OpenMMLab version), so the references
here are written from the paper's and the official code's definitions: a loop-based window attention
(which tokens share a window, the relative offsets, the softmax over real tokens only) and an einops
forward of the whole network in the official NCHW / 1x1-conv form, which needs divisible sizes.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import vit_backbones
from vit_backbones.checkpoint import CheckpointMismatchError
from test_configs import _build_model, _load, _set_size, _tiny_run  # tests/ is on sys.path under pytest, as for helpers.py

NAME = 'ShuffleTransformer'
SMALL = dict(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
# exact counts printed by the official training logs (output/shuffle_vit_*_local7midV2/default/log_rank0.txt,
# "number of params"), ImageNet-1k head included
OFFICIAL_COUNTS = {'tiny': 28532482, 'small': 50076178, 'base': 88398560}


def _randomize(module, seed=0):
    """Random values in every parameter and BatchNorm statistic, so no mapping or norm can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in module.state_dict().items():
            if k.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return module


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- paper numbers
@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
def test_param_count_matches_paper_with_head(arch):
    """paper_param_count = backbone + Linear(C4, 1000) head (the official model has no final norm)."""
    with torch.device('meta'):
        m = vit_backbones.build_backbone(NAME, arch)
    paper = m.paper_table[arch]['params']
    assert abs(m.paper_param_count() / 1e6 - paper) / paper < 0.02, m.paper_param_count()
    assert m.paper_param_count() == OFFICIAL_COUNTS[arch]
    c = m.feature_info[-1]['num_chs']
    assert sum(p.numel() for p in m.parameters()) == OFFICIAL_COUNTS[arch] - (c * 1000 + 1000)


def test_paper_table_and_arch_hyper_parameters():
    cls = vit_backbones.get_backbone_class(NAME)
    assert {k: (v['params'], v['gmacs']) for k, v in cls.paper_table.items()} == {
        'tiny': (28., 4.6), 'small': (50., 8.9), 'base': (88., 15.6)}
    with torch.device('meta'):
        b = vit_backbones.build_backbone(NAME, 'shuffle-b')
    assert b.out_channels == [128, 256, 512, 1024] and b.depths == (2, 2, 18, 2)
    assert [s.blocks[0].attn.num_heads for s in b.stages] == [4, 8, 16, 32]
    assert [blk.shuffle for blk in b.stages[2].blocks[:4]] == [False, True, False, True]


def test_drop_path_is_per_stage():
    """Official: one rate per stage, linspace(0, rate, 4); the depthwise branch has no drop path."""
    with torch.device('meta'):
        m = vit_backbones.build_backbone(NAME, 'small', drop_path_rate=0.3)
    for i, s in enumerate(m.stages):
        assert [blk.drop_path.drop_prob for blk in s.blocks] == pytest.approx([0.1 * i] * len(s.blocks))


# ----------------------------------------------------------------------------- shapes
# ----------------------------------------------------------------------------- the definition, directly
def _naive_window_attention(y, attn, ws, shuffle):
    """Loop over windows of an NHWC map as the paper defines them. With nh = ceil(H/ws), window (a, b) holds
    rows a*ws + i (regular) or i*nh + a (shuffled: stride nh across the map), same for columns; tokens
    beyond the map (padding) are simply absent. Softmax(q k^T * scale + B[offset]) v over the window's
    real tokens, B read from the (2ws-1)^2 table by the offset (di, dj) of the in-window positions."""
    bsz, h, w, c = y.shape
    heads, d = attn.num_heads, c // attn.num_heads
    table = attn.rel_pos.relative_position_bias_table
    nh, nw = math.ceil(h / ws), math.ceil(w / ws)
    out = torch.zeros_like(y)
    for a in range(nh):
        for b in range(nw):
            members = []
            for i in range(ws):
                for j in range(ws):
                    r = i * nh + a if shuffle else a * ws + i
                    col = j * nw + b if shuffle else b * ws + j
                    if r < h and col < w:
                        members.append((r, col, i, j))
            tok = torch.stack([y[:, r, col] for r, col, _, _ in members], 1)  # (B, M, C)
            q, k, v = (tok @ attn.qkv.weight.t()).split(c, dim=-1)
            q, k, v = (t.reshape(bsz, len(members), heads, d).transpose(1, 2) for t in (q, k, v))
            bias = torch.stack([
                torch.stack([table[(p[2] - s[2] + ws - 1) * (2 * ws - 1) + (p[3] - s[3] + ws - 1)] for s in members])
                for p in members
            ]).permute(2, 0, 1)  # heads, M, M
            o = torch.softmax(q @ k.transpose(-1, -2) * attn.scale + bias, -1) @ v
            o = attn.proj(o.transpose(1, 2).reshape(bsz, len(members), c))
            for n, (r, col, _, _) in enumerate(members):
                out[:, r, col] = o[:, n]
    return out


@pytest.mark.parametrize('shuffle', [True, False])
@pytest.mark.parametrize('hw,ws', [((14, 14), 7), ((12, 8), 4), ((10, 13), 4), ((5, 3), 7)])
def test_window_attention_matches_loop_definition(shuffle, hw, ws):
    """Divisible maps (nothing padded) and padded ones (10x13 -> 12x16, nh=3, nw=4: shuffled window (a, b)
    holds rows a, a+3, a+6, a+9 < 10 only; 5x3 < window: one window of the whole map)."""
    torch.manual_seed(0)
    m = vit_backbones.build_backbone(NAME, dict(base='tiny', embed_dims=16, num_heads=(2, 2, 2, 2)),
                                     window_size=ws)
    blk = _randomize(m.stages[0].blocks[1 if shuffle else 0]).eval()
    assert blk.shuffle is shuffle
    y = torch.randn(2, *hw, 16)
    with torch.no_grad():
        ref = _naive_window_attention(y, blk.attn, ws, shuffle)
        ours = blk.attend(y)
    assert ours.shape == ref.shape and float((ours - ref).abs().max()) < 1e-5


def test_shuffled_window_members_are_strided():
    """Perturbing one token changes exactly the outputs of the tokens of its window: for a 21x14 map and
    window 7 the shuffled window of (r, c) is {(r', c'): r' = r mod 3, c' = c mod 2}; the regular one is
    the 7x7 block around it."""
    m = vit_backbones.build_backbone(NAME, dict(base='tiny', embed_dims=16, num_heads=(2, 2, 2, 2)))
    y = torch.randn(1, 21, 14, 16)
    r0, c0 = 8, 5
    y2 = y.clone()
    y2[0, r0, c0] += 1.
    for blk, same in ((m.stages[0].blocks[1], lambda r, c: r % 3 == r0 % 3 and c % 2 == c0 % 2),
                      (m.stages[0].blocks[0], lambda r, c: r // 7 == r0 // 7 and c // 7 == c0 // 7)):
        with torch.no_grad():
            changed = (blk.attend(y) - blk.attend(y2)).abs().amax(-1)[0] > 0
        expect = torch.tensor([[same(r, c) for c in range(14)] for r in range(21)])
        assert torch.equal(changed, expect)


def _bn(x, bn):  # eval-mode BatchNorm2d, written out
    return ((x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
            * bn.weight[:, None, None] + bn.bias[:, None, None])


def _rel_bias(table, ws):
    pos = [(i, j) for i in range(ws) for j in range(ws)]
    idx = torch.tensor([[(p[0] - s[0] + ws - 1) * (2 * ws - 1) + p[1] - s[1] + ws - 1 for s in pos] for p in pos])
    return table[idx].permute(2, 0, 1)


def _official_form_forward(m, x):
    """The whole network in the official form: NCHW, 1x1 convs as einsums, windows by einops rearrange,
    '(hh ws1) (ww ws2)' for regular and '(ws1 hh) (ws2 ww)' for shuffled windows. Needs every stage map
    to be a multiple of the window (no padding exists in this form)."""
    ws = m.window_size
    pe = m.patch_embed
    x = F.relu6(_bn(F.conv2d(x, pe.conv1.weight, pe.conv1.bias, 2, 1), pe.bn1))
    x = F.relu6(_bn(F.conv2d(x, pe.conv2.weight, pe.conv2.bias, 2, 1), pe.bn2))
    x = F.conv2d(x, pe.conv3.weight, pe.conv3.bias)
    outs = []
    for stage in m.stages:
        if stage.downsample is not None:
            x = F.conv2d(_bn(x, stage.downsample.norm), stage.downsample.reduction.weight, stride=2)
        for blk in stage.blocks:
            b, c, h, w = x.shape
            heads = blk.attn.num_heads
            qkv = torch.einsum('oc,bchw->bohw', blk.attn.qkv.weight, _bn(x, blk.norm1))
            pattern = '(ws1 hh) (ws2 ww)' if blk.shuffle else '(hh ws1) (ww ws2)'
            q, k, v = rearrange(qkv, f'b (qkv h d) {pattern} -> qkv (b hh ww) h (ws1 ws2) d', qkv=3, h=heads,
                                ws1=ws, ws2=ws)
            att = (q @ k.transpose(-2, -1) * blk.attn.scale + _rel_bias(blk.attn.rel_pos.relative_position_bias_table,
                                                                        ws)).softmax(-1)
            o = rearrange(att @ v, f'(b hh ww) h (ws1 ws2) d -> b (h d) {pattern}', b=b, hh=h // ws, h=heads,
                          ws1=ws, ws2=ws)
            x = x + torch.einsum('oc,bchw->bohw', blk.attn.proj.weight, o) + blk.attn.proj.bias[:, None, None]
            x = x + F.conv2d(_bn(x, blk.norm2), blk.local.weight, blk.local.bias, padding=ws // 2, groups=c)
            hid = F.relu6(torch.einsum('oc,bchw->bohw', blk.mlp.fc1.weight, _bn(x, blk.norm3))
                          + blk.mlp.fc1.bias[:, None, None])
            x = x + torch.einsum('oc,bchw->bohw', blk.mlp.fc2.weight, hid) + blk.mlp.fc2.bias[:, None, None]
        outs.append(x)
    return outs


@pytest.mark.parametrize('hw', [(224, 224), (224, 448)])
def test_divisible_sizes_equal_unpadded_official_form(hw):
    """At sizes where every stage map is a multiple of the window, nothing is padded or masked and the
    outputs equal the official (padding-free) formulation."""
    from vit_backbones.models.shuffle import shuffle_window_plan
    # float64: random weights make the 8 blocks amplify rounding, so compare where rounding is negligible
    m = _randomize(vit_backbones.build_backbone(NAME, SMALL, drop_path_rate=0.), seed=1).double().eval()
    x = torch.randn(1, 3, *hw, dtype=torch.float64)
    with torch.no_grad():
        ours = m(x)
        ref = _official_form_forward(m, x)
    for o in ours:
        for shuffle in (False, True):
            assert shuffle_window_plan(tuple(o.shape[-2:]), 7, shuffle, o.device)[1] is None  # no mask
    scale = max(float(r.abs().max()) for r in ref)
    assert _max_diff(ours, ref) < 1e-10 * scale, (_max_diff(ours, ref), scale)


# ----------------------------------------------------------------------------- checkpoints
def _to_official(sd):
    """Our names -> the official ones (from models/shuffle_transformer.py: to_token.convK.{0,1}, stageN,
    patch_partition, layers.J.{0,1} pairs of (regular, shuffled) blocks, to_qkv, 1x1-conv weights)."""
    import re
    stem = {'conv1': 'conv1.0', 'bn1': 'conv1.1', 'conv2': 'conv2.0', 'bn2': 'conv2.1', 'conv3': 'conv3'}
    out = {}
    for k, v in sd.items():
        m = re.match(r'patch_embed\.(\w+)\.(.+)$', k)
        if m:
            out[f'to_token.{stem[m.group(1)]}.{m.group(2)}'] = v
            continue
        m = re.match(r'stages\.(\d+)\.downsample\.(.+)$', k)
        if m:
            out[f'stage{int(m.group(1)) + 1}.patch_partition.{m.group(2)}'] = v
            continue
        m = re.match(r'stages\.(\d+)\.blocks\.(\d+)\.(.+)$', k)
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        rest = rest.replace('attn.qkv.', 'attn.to_qkv.').replace('attn.rel_pos.', 'attn.')
        if rest.endswith(('to_qkv.weight', 'proj.weight', 'fc1.weight', 'fc2.weight')):
            v = v[:, :, None, None]
        out[f'stage{i + 1}.layers.{j // 2}.{j % 2}.{rest}'] = v
    return out


def test_official_layout_loads_and_gives_same_outputs():
    src = _randomize(vit_backbones.build_backbone(NAME, SMALL, drop_path_rate=0.), seed=2).eval()
    official = _to_official(src.state_dict())
    assert 'stage3.layers.0.1.attn.to_qkv.weight' in official and official['to_token.conv1.1.running_var'].ndim == 1
    official['head.weight'] = torch.zeros(10, 256)
    official['head.bias'] = torch.zeros(10)
    for i in range(1, 5):  # buffers the official model saves
        official[f'stage{i}.layers.0.0.attn.relative_position_index'] = torch.zeros(49, 49, dtype=torch.long)
    ours = vit_backbones.build_backbone(NAME, SMALL, drop_path_rate=0.).eval()
    report = ours.load_checkpoint({'model': official, 'epoch': 299})
    assert report.source_format == 'official' and not report.missing
    assert report.dropped['head.weight'] == 'classification head'
    x = torch.randn(1, 3, 70, 101)
    with torch.no_grad():
        assert _max_diff(src(x), ours(x)) == 0
    det = vit_backbones.build_backbone(NAME, SMALL).eval()  # our layout under a detector's prefix
    rep = det.load_checkpoint({'state_dict': {'backbone.' + k: v for k, v in src.state_dict().items()}})
    assert rep.source_format == 'vit_backbones' and not rep.missing
    with torch.no_grad():
        assert _max_diff(src(x), det(x)) == 0


def test_window_change_resizes_bias_tables_and_kernels():
    src = _randomize(vit_backbones.build_backbone(NAME, SMALL), seed=5)
    dst = vit_backbones.build_backbone(NAME, SMALL, window_size=12, local_kernel_size=9)
    report = dst.load_checkpoint(_to_official(src.state_dict()))
    key = 'stages.1.blocks.0.attn.rel_pos.relative_position_bias_table'
    assert report.resized[key] == ((13 * 13, 2), (23 * 23, 2))
    assert sum(k.endswith('relative_position_bias_table') for k in report.resized) == 8
    t = src.state_dict()[key]
    ref = F.interpolate(t.t().reshape(1, 2, 13, 13), size=(23, 23), mode='bicubic', align_corners=False)
    assert torch.allclose(dst.state_dict()[key], ref.reshape(2, -1).t(), atol=1e-6)
    k7 = src.stages[2].blocks[1].local.weight
    k9 = dst.stages[2].blocks[1].local.weight
    assert torch.equal(k9[..., 1:8, 1:8], k7) and k9[..., 0, :].abs().sum() == 0 and k9[..., :, 8].abs().sum() == 0
    assert all(torch.isfinite(o).all() for o in dst.eval()(torch.randn(1, 3, 100, 90)))


def test_checkpoint_of_another_model_or_variant_is_refused():
    with torch.device('meta'):
        swin_sd = vit_backbones.build_backbone('Swin', 'tiny').state_dict()
        tiny_sd = vit_backbones.build_backbone(NAME, 'tiny').state_dict()
        small = vit_backbones.build_backbone(NAME, 'small')
    m = vit_backbones.build_backbone(NAME, SMALL)
    with pytest.raises(CheckpointMismatchError, match='not a Shuffle Transformer checkpoint'):
        m.load_checkpoint(swin_sd)
    with pytest.raises(CheckpointMismatchError, match='not a Shuffle Transformer checkpoint'):
        m.load_checkpoint({'layers.0.blocks.0.attn.qkv.weight': torch.zeros(3, 3)})
    with pytest.raises(CheckpointMismatchError, match='another variant'):
        small.load_checkpoint(_to_official(tiny_sd))


def test_checkpoint_file_and_init_cfg(tmp_path):
    src = _randomize(vit_backbones.build_backbone(NAME, SMALL), seed=7)
    path = tmp_path / 'shuffle_vit_tiny_patch4_window7_224.pth'
    torch.save({'model': _to_official(src.state_dict())}, path)
    m = vit_backbones.build_backbone(NAME, SMALL, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    m.init_weights()
    assert m.load_report.source_format == 'official'
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), src.state_dict().values()))


# ----------------------------------------------------------------------------- training behaviour
def test_frozen_stages():
    m = vit_backbones.build_backbone(NAME, SMALL, frozen_stages=2)
    m.train()
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    expect = {n for n, _ in m.named_parameters() if n.startswith(('patch_embed.', 'stages.0.', 'stages.1.'))}
    assert frozen == expect and 'stages.1.downsample.reduction.weight' in frozen
    assert not m.patch_embed.training and not m.stages[1].blocks[0].norm1.training and m.stages[2].training
    stats = {k: v.clone() for k, v in m.state_dict().items() if 'running' in k}
    sum(o.mean() for o in m(torch.randn(2, 3, 64, 64))).backward()
    after = m.state_dict()
    assert all(torch.equal(stats[k], after[k]) for k in stats if k.startswith(('patch_embed.', 'stages.0.', 'stages.1.')))
    assert not torch.equal(stats['stages.2.blocks.0.norm1.running_mean'], after['stages.2.blocks.0.norm1.running_mean'])
    assert m.stages[0].blocks[0].attn.qkv.weight.grad is None
    assert m.stages[2].blocks[0].attn.qkv.weight.grad is not None
    assert not any(p.requires_grad for p in vit_backbones.build_backbone(NAME, SMALL, frozen_stages=4).parameters())


# ----------------------------------------------------------------------------- bad input
# ----------------------------------------------------------------------------- configs
SHUFFLE_CONFIGS = ['mask_rcnn_shuffle_t_fpn_1x_coco.py', 'upernet_shuffle_t_ade20k.py']


@pytest.mark.parametrize('name', SHUFFLE_CONFIGS)
def test_config_builds_model_with_shuffle_t(name):
    cfg = _load(name)
    assert cfg.custom_imports == dict(imports=['vit_backbones'], allow_failed_imports=False)
    bb = cfg.model.backbone
    assert (bb.type, bb.arch, bb.window_size, bb.norm_eval) == (NAME, 'tiny', 7, True)
    assert bb.init_cfg == dict(type='Pretrained', checkpoint='checkpoints/shuffle_vit_tiny_patch4_window7_224.pth')
    model = _build_model(cfg)
    assert isinstance(model.backbone, vit_backbones.get_backbone_class(NAME))
    assert sum(p.numel() for p in model.backbone.parameters()) == OFFICIAL_COUNTS['tiny'] - (768 * 1000 + 1000)
    keys = cfg.optim_wrapper.paramwise_cfg
    assert keys.norm_decay_mult == 0.0 and keys.custom_keys == {'relative_position_bias_table': dict(decay_mult=0.0)}
    if cfg.default_scope == 'mmdet':  # Swin's Mask R-CNN 1x recipe
        assert cfg.model.type == 'MaskRCNN' and cfg.model.neck.in_channels == [96, 192, 384, 768]
        assert bb.drop_path_rate == 0.2 and cfg.train_cfg.max_epochs == 12
        assert (cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.optimizer.weight_decay) == (1e-4, 0.05)
    else:  # Swin's UperNet 160k recipe
        assert cfg.model.decode_head.type == 'UPerHead' and cfg.model.decode_head.in_channels == [96, 192, 384, 768]
        assert cfg.model.auxiliary_head.in_channels == 384 and cfg.model.auxiliary_head.in_index == 2
        assert bb.drop_path_rate == 0.3 and cfg.train_cfg.max_iters == 160000
        assert (cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.optimizer.weight_decay) == (6e-5, 0.01)


def _shuffle_on_synthetic(name, root):
    """The config with a 16-wide, one-block-pair-in-stages-1-and-4 Shuffle backbone (window 3, random init)
    and its datasets pointed at tiny synthetic data (3 shapes, 96 px images)."""
    from vit_backbones.data import DEFAULT_CLASSES, ade_class_names
    cfg = _load(name)
    bb = cfg.model.backbone
    bb.update(arch=dict(base='tiny', embed_dims=16, depths=(2, 1, 1, 2), num_heads=(1, 1, 2, 2)), window_size=3,
              init_cfg=None)
    chans = vit_backbones.build_backbone(NAME, bb.arch).out_channels
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].update(num_workers=0, persistent_workers=False)
    cfg.train_dataloader.update(sampler=dict(type='InfiniteSampler', shuffle=True), batch_sampler=None)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=1, val_interval=1)
    if cfg.default_scope == 'mmdet':
        cfg.model.neck.in_channels = chans
        # lighter RoI stages (CPU test budget); the recipe's values are checked in the config test
        cfg.model.train_cfg.rpn_proposal.max_per_img = cfg.model.test_cfg.rpn.max_per_img = 100
        cfg.model.train_cfg.rcnn.sampler.num = 64
        cfg.model.test_cfg.rcnn.max_per_img = 20
        cfg.model.roi_head.bbox_head.num_classes = cfg.model.roi_head.mask_head.num_classes = len(DEFAULT_CLASSES)
        for loader in ('train_dataloader', 'val_dataloader'):
            cfg[loader].dataset.metainfo = dict(classes=DEFAULT_CLASSES)
    else:
        classes = ade_class_names()
        cfg.model.decode_head.in_channels = chans
        cfg.model.auxiliary_head.in_channels = chans[2]
        cfg.model.decode_head.num_classes = cfg.model.auxiliary_head.num_classes = len(classes)
        cfg.model.decode_head.channels, cfg.model.auxiliary_head.channels = 32, 16
        cfg.model.data_preprocessor.size = (96, 96)
        for loader in ('train_dataloader', 'val_dataloader'):
            cfg[loader].dataset.update(type='BaseSegDataset', metainfo=dict(classes=classes), img_suffix='.jpg',
                                       seg_map_suffix='.png', reduce_zero_label=True)
        for head in (cfg.model.decode_head, cfg.model.auxiliary_head):
            head.norm_cfg = dict(type='BN', requires_grad=True)  # one CPU process: no SyncBN
    cfg.test_dataloader = cfg.val_dataloader
    _set_size(cfg, (96, 96))
    return cfg


def test_mask_rcnn_shuffle_trains_and_predicts(tmp_path):
    from mmengine.dataset import pseudo_collate
    from vit_backbones.data import make_coco_instances
    root = str(tmp_path / 'coco') + os.sep
    paths = make_coco_instances(root, num_train=2, num_val=1, image_size=(96, 96), seed=0)
    cfg = _shuffle_on_synthetic('mask_rcnn_shuffle_t_fpn_1x_coco.py', root)
    runner, changed = _tiny_run(cfg, tmp_path / 'work', root, paths['val_ann'])
    assert any(k.startswith('backbone.stages.3.') for k in changed)
    assert any(k.startswith('roi_head.mask_head') for k in changed)
    bn = runner.model.backbone.stages[1].blocks[0].norm1  # norm_eval=True: statistics stay at their init
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    pred = sample.pred_instances
    assert pred.bboxes.shape[1] == 4 and tuple(pred.masks.shape[1:]) == (96, 96)
    assert ((pred.labels >= 0) & (pred.labels < 3)).all()


def test_upernet_shuffle_trains_and_predicts(tmp_path):
    from mmengine.dataset import pseudo_collate
    from vit_backbones.data import make_ade_like
    root = str(tmp_path / 'ade') + os.sep
    make_ade_like(root, num_train=2, num_val=1, image_size=(96, 96), seed=0)
    cfg = _shuffle_on_synthetic('upernet_shuffle_t_ade20k.py', root)
    runner, changed = _tiny_run(cfg, tmp_path / 'work', root)
    assert any(k.startswith('backbone.stages.0.') for k in changed) and any(k.startswith('decode_head.') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    seg = sample.pred_sem_seg.data
    assert tuple(seg.shape) == (1, 96, 96) and int(seg.min()) >= 0 and int(seg.max()) < 4
