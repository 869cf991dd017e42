"""CeiT: the README's sizes, the image-to-tokens stem and LeFF against their definitions (LeFF on non-square
grids, where the official code assumes a square), the official checkpoint layout (``i2t.*``,
``blocks.N.leff.*``, LCA keys dropped), refusal of other models' checkpoints, the backbone contract
(BatchNorm under norm_eval / frozen_stages) and the detection / segmentation configs.

No PyPI package has CeiT (not timm, not HF transformers), so the reference is a naive forward written here
step by step (F.conv2d / F.batch_norm / F.max_pool2d / F.linear / explicit softmax attention), fed with a
state dict in the official key names of coeusguo/ceit ``ceit_model.py``."""
import os

import pytest
import torch
import torch.nn.functional as F

import vit_backbones
from helpers import randomize
from vit_backbones.checkpoint import CheckpointMismatchError
from vit_backbones.layers import LocallyEnhancedFeedForward

TINY = dict(base='tiny', embed_dims=32, depth=4, num_heads=2)
_TO_OFFICIAL = [('patch_embed.conv.layers.0.', 'i2t.backbone.conv.'), ('patch_embed.conv.layers.1.', 'i2t.backbone.bn.'),
                ('patch_embed.proj.proj.', 'i2t.proj.'), ('.mlp.', '.leff.')]


def _official_sd(model, depth=4):
    """Our state dict renamed to the official layout, plus the classification-only parts (LCA block,
    per-layer embedding, final norm, head) with the official shapes."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith('pyramid.'):
            continue
        for a, b in _TO_OFFICIAL:
            k = k.replace(a, b)
        sd[k] = v.clone()
    c = model.embed_dims
    hid = 4 * c
    extra = {'lca.norm1.weight': (c, ), 'lca.norm1.bias': (c, ), 'lca.attn.qkv.weight': (3 * c, c),
             'lca.attn.qkv.bias': (3 * c, ), 'lca.attn.proj.weight': (c, c), 'lca.attn.proj.bias': (c, ),
             'lca.norm2.weight': (c, ), 'lca.norm2.bias': (c, ), 'lca.feedforward.fc1.weight': (hid, c),
             'lca.feedforward.fc1.bias': (hid, ), 'lca.feedforward.fc2.weight': (c, hid),
             'lca.feedforward.fc2.bias': (c, ), 'pos_layer_embed': (1, depth, c), 'norm.weight': (c, ),
             'norm.bias': (c, ), 'head.weight': (1000, c), 'head.bias': (1000, )}
    sd.update({k: torch.randn(s) for k, s in extra.items()})
    return sd


def _bn(x, sd, p, training=False):
    return F.batch_norm(x, sd[p + 'running_mean'].clone(), sd[p + 'running_var'].clone(), sd[p + 'weight'],
                        sd[p + 'bias'], training, 0.1, 1e-5)


def _naive_leff(y, hw, sd, p, training=False):
    """LeFF from the definition on (B, 1 + h*w, C): the class token is returned as it came in; the grid goes
    through linear (C -> 4C) + BN + GELU, depthwise 3x3 conv + BN + GELU, linear (4C -> C) + BN."""
    b, _, c = y.shape
    h, w = hw
    cls, g = y[:, :1], y[:, 1:]
    g = F.linear(g, sd[p + 'conv1.weight'][:, :, 0, 0], sd[p + 'conv1.bias'])  # (B, hw, 4C)
    g = F.gelu(_bn(g.transpose(1, 2), sd, p + 'bn1.', training))  # BatchNorm over channels of (B, 4C, hw)
    grid = g.reshape(b, -1, h, w)
    grid = F.conv2d(grid, sd[p + 'conv2.weight'], sd[p + 'conv2.bias'], padding=1, groups=grid.shape[1])
    g = F.gelu(_bn(grid, sd, p + 'bn2.', training)).flatten(2).transpose(1, 2)
    g = F.linear(g, sd[p + 'conv3.weight'][:, :, 0, 0], sd[p + 'conv3.bias'])
    g = _bn(g.transpose(1, 2), sd, p + 'bn3.', training).transpose(1, 2)
    return torch.cat([cls, g], 1)


def _naive_ceit(sd, x, heads, depth):
    """Official-layout weights, eval mode: I2T stem, [cls] + tokens + position embedding (already at the
    runtime grid), pre-norm blocks with LeFF. Tokens after the last block (no final norm)."""
    h_img, w_img = x.shape[-2:]
    x = F.pad(x, (0, -w_img % 16, 0, -h_img % 16))
    y = F.conv2d(x, sd['i2t.backbone.conv.weight'], None, stride=2, padding=3)
    y = F.max_pool2d(_bn(y, sd, 'i2t.backbone.bn.'), 3, 2, 1)
    t = F.conv2d(y, sd['i2t.proj.weight'], sd['i2t.proj.bias'], stride=4)
    b, c, h, w = t.shape
    t = torch.cat([sd['cls_token'].expand(b, -1, -1), t.flatten(2).transpose(1, 2)], 1) + sd['pos_embed']
    n, hd = t.shape[1], c // heads
    for i in range(depth):
        p = f'blocks.{i}.'
        y = F.layer_norm(t, (c, ), sd[p + 'norm1.weight'], sd[p + 'norm1.bias'], 1e-6)
        q, k, v = F.linear(y, sd[p + 'attn.qkv.weight'], sd[p + 'attn.qkv.bias']).reshape(b, n, 3, heads, hd).permute(
            2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, -1)
        t = t + F.linear((a @ v).transpose(1, 2).reshape(b, n, c), sd[p + 'attn.proj.weight'], sd[p + 'attn.proj.bias'])
        y = F.layer_norm(t, (c, ), sd[p + 'norm2.weight'], sd[p + 'norm2.bias'], 1e-6)
        t = t + _naive_leff(y, (h, w), sd, p + 'leff.')
    return t


# ----------------------------------------------------------------------------- paper numbers
@pytest.mark.parametrize('arch,paper_m', [('tiny', 6.4), ('small', 24.2), ('base', 94.4)])
def test_param_count_matches_readme_with_lca_and_head(arch, paper_m):
    """README: CeiT-T/S/B 6.4/24.2/94.4M, whole classifier: our trunk (without the pyramid) plus the LCA
    block, its per-layer embedding, the final norm and the 1000-way head (classifier_param_delta)."""
    with torch.device('meta'):
        m = vit_backbones.build_backbone('CeiT', arch)
    assert m.paper_table[arch]['params'] == paper_m
    n = m.paper_param_count()
    assert abs(n / 1e6 - paper_m) / paper_m < 0.02, n
    c = m.embed_dims
    lca = 4 * c + (3 * c * c + 3 * c) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c)
    assert m.classifier_param_delta() == lca + 12 * c + 2 * c + 1000 * c + 1000
    assert m.norm is None and not any(k.startswith('lca') for k, _ in m.named_parameters())


def test_structure():
    m = vit_backbones.build_backbone('CeiT', 'ceit-t')
    assert m.arch_name == 'tiny' and m.pos_embed.shape == (1, 197, 192) and m.cls_token.shape == (1, 1, 192)
    stem = m.patch_embed
    conv, bn, pool = stem.conv.layers
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((7, 7), (2, 2), (3, 3), None)
    assert isinstance(bn, torch.nn.BatchNorm2d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    assert tuple(stem.proj.proj.weight.shape) == (192, 64, 4, 4) and stem.proj.proj.stride == (4, 4)
    leff = m.blocks[0].mlp
    assert isinstance(leff, LocallyEnhancedFeedForward) and leff.conv2.groups == 768
    assert [f['reduction'] for f in m.feature_info] == [4, 8, 16, 32]
    with pytest.raises(ValueError, match='stride 16'):
        vit_backbones.build_backbone('CeiT', TINY, patch_size=8)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize('hw', [(224, 224), (511, 511), (112, 137), (32, 32)])
@pytest.mark.parametrize('kw', [dict(pyramid='simple', window_size=4, global_attn_indexes=(1, 3), rel_pos=True)],
                         ids=['vitdet'])
def test_output_shapes_any_size(hw, kw):
    m = vit_backbones.build_backbone('CeiT', TINY, **kw).eval()
    with torch.no_grad():
        outs = m(torch.randn(1, 3, *hw))
    assert [tuple(o.shape[1:]) for o in outs] == [(ch, -(-hw[0] // s), -(-hw[1] // s))
                                                  for ch, s in zip(m.out_channels, (4, 8, 16, 32))]


# ----------------------------------------------------------------------------- definition
@pytest.mark.parametrize('hw,img_size', [((224, 224), 224), ((112, 144), (112, 144)), ((100, 137), (112, 144))])
def test_matches_the_definition(hw, img_size):
    """At 224 x 224 this is the official computation; at 112 x 144 (grid 7 x 9) the LeFF works on the real
    non-square grid; at 100 x 137 the image is zero-padded to 112 x 144 first. The position embedding is
    built for the runtime grid, so no resampling is involved (that is tested for ViT)."""
    m = randomize(vit_backbones.build_backbone('CeiT', TINY, img_size=img_size, drop_path_rate=0.), seed=1).eval()
    sd = _official_sd(m)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ours = m.forward_features(x, taps=[3])[0][0]
        ref = _naive_ceit(sd, x, heads=2, depth=4)
    assert ours.shape == ref.shape == (2, 1 + -(-hw[0] // 16) * -(-hw[1] // 16), 32)
    assert float((ours - ref).abs().max()) < 1e-4


@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
def test_leff_step_by_step_on_a_non_square_grid(training):
    torch.manual_seed(0)
    leff = randomize(LocallyEnhancedFeedForward(6, 24), seed=2).train(training)
    sd = {k: v.clone() for k, v in leff.state_dict().items()}
    x = torch.randn(3, 1 + 5 * 8, 6)
    out = leff(x, (5, 8))
    ref = _naive_leff(x, (5, 8), sd, '', training)
    assert torch.equal(out[:, 0], x[:, 0])  # the class token bypasses LeFF
    assert float((out - ref).abs().max()) < 1e-5
    assert float((leff(x[:, 1:], (5, 8)) - ref[:, 1:]).abs().max()) < 1e-5  # no prefix token (windowed models)
    with pytest.raises(ValueError, match='grid'):
        leff(x[:, :20], (5, 8))


# ----------------------------------------------------------------------------- checkpoints
def test_official_layout_roundtrip():
    src = randomize(vit_backbones.build_backbone('CeiT', TINY), seed=3).eval()
    official = _official_sd(src)
    assert {'i2t.backbone.conv.weight', 'i2t.backbone.bn.running_var', 'i2t.proj.weight',
            'blocks.3.leff.conv2.weight', 'blocks.0.leff.bn3.running_mean'} <= set(official)
    dst = vit_backbones.build_backbone('CeiT', TINY).eval()
    report = dst.load_checkpoint({'model': official})
    assert report.source_format == 'official'
    assert set(report.dropped) == {k for k in official if k.startswith(('lca.', 'head.', 'norm.'))} | {'pos_layer_embed'}
    mine = dst.state_dict()
    for k, v in src.state_dict().items():  # parameters and BatchNorm statistics
        if not k.startswith('pyramid.'):
            assert torch.equal(mine[k], v), k
    dst.pyramid.load_state_dict(src.pyramid.state_dict())
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(src(x), dst(x)))
    again = vit_backbones.build_backbone('CeiT', TINY)
    assert again.load_checkpoint(src.state_dict()).source_format == 'vit_backbones'
    assert torch.equal(again.blocks[2].mlp.bn2.running_var, src.blocks[2].mlp.bn2.running_var)


def test_384_checkpoint_position_embedding_is_resampled():
    src = randomize(vit_backbones.build_backbone('CeiT', TINY, img_size=384), seed=4)
    m = vit_backbones.build_backbone('CeiT', TINY)
    report = m.load_checkpoint(_official_sd(src))
    assert report.resized['pos_embed'] == ((1, 1 + 24 * 24, 32), (1, 1 + 14 * 14, 32))
    assert torch.equal(m.pos_embed[:, :1], src.pos_embed[:, :1])


def test_other_models_checkpoints_are_refused():
    m = vit_backbones.build_backbone('CeiT', TINY)
    with pytest.raises(CheckpointMismatchError, match='ViT/DeiT'):
        m.load_checkpoint(vit_backbones.build_backbone('DeiT', TINY).state_dict())
    with pytest.raises(CheckpointMismatchError, match='CPVT'):
        m.load_checkpoint(vit_backbones.build_backbone('CPVT', TINY).state_dict())
    with torch.device('meta'):
        tiny_sd = _official_sd(vit_backbones.build_backbone('CeiT', 'tiny'), depth=12)
        small = vit_backbones.build_backbone('CeiT', 'small')
    with pytest.raises(CheckpointMismatchError, match='another variant'):
        small.load_checkpoint(tiny_sd)


# ----------------------------------------------------------------------------- contract
@pytest.mark.parametrize('kw', [dict(pyramid='simple', window_size=4, global_attn_indexes=(1, ), rel_pos=True)],
                         ids=['windows'])
def test_every_parameter_gets_a_gradient(kw):
    m = vit_backbones.build_backbone('CeiT', TINY, drop_path_rate=0., **kw).train()  # no branch dropped
    sum(o.mean() for o in m(torch.randn(2, 3, 64, 80))).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_frozen_stages():
    m = vit_backbones.build_backbone('CeiT', TINY, frozen_stages=1).train()
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert {'cls_token', 'pos_embed', 'patch_embed.conv.layers.0.weight', 'patch_embed.conv.layers.1.weight',
            'patch_embed.proj.proj.weight', 'blocks.0.mlp.bn1.weight'} <= frozen
    assert all(n.startswith(('cls_token', 'pos_embed', 'patch_embed.', 'blocks.0.')) for n in frozen)
    assert not m.patch_embed.training and not m.blocks[0].mlp.bn2.training and m.blocks[1].mlp.bn2.training
    before = m.blocks[0].mlp.bn1.running_mean.clone(), m.patch_embed.conv.layers[1].running_var.clone()
    sum(o.mean() for o in m(torch.randn(2, 3, 64, 64))).backward()
    assert torch.equal(before[0], m.blocks[0].mlp.bn1.running_mean)
    assert torch.equal(before[1], m.patch_embed.conv.layers[1].running_var)
    assert m.blocks[0].attn.qkv.weight.grad is None and m.blocks[1].mlp.conv1.weight.grad is not None


def test_unknown_arch_names_the_choices():
    with pytest.raises(ValueError, match="unknown arch 'large'"):
        vit_backbones.build_backbone('CeiT', 'large')


# ----------------------------------------------------------------------------- configs
def _config_helpers(*names):
    """The helpers of tests/test_configs.py."""
    import test_configs as tc  # tests/ is on sys.path under pytest, as for helpers.py
    return tuple(getattr(tc, n) for n in names)


CEIT_CONFIGS = ['mask_rcnn_ceit_s_fpn.py', 'upernet_ceit_s_ade20k.py']


@pytest.mark.parametrize('name', CEIT_CONFIGS)
def test_config_builds_model(name):
    _build_model, _load = _config_helpers('_build_model', '_load')
    cfg = _load(name)
    assert cfg.custom_imports == dict(imports=['vit_backbones'], allow_failed_imports=False)
    assert cfg.model.backbone.type == 'CeiT' and cfg.model.backbone.arch == 'small'
    assert cfg.model.backbone.init_cfg.checkpoint.endswith('ceit_small_patch16_224.pth')
    model = _build_model(cfg)
    bb = model.backbone
    assert isinstance(bb, vit_backbones.get_backbone_class('CeiT'))
    # CeiT-S: 24.2M (README) with the classification-only parts our backbone does not build
    # (the UperNet recipe stores a 32x32 position embedding for 512 inputs instead of 14x14)
    assert bb.paper_param_count() - (bb.pos_embed.numel() - 197 * 384) == pytest.approx(24.2e6, rel=0.01)
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.rand(1, 3, 96, 128))
    if cfg.default_scope == 'mmdet':
        assert bb.window_size == 14 and cfg.model.neck.in_channels == bb.out_channels == [96, 192, 384, 384]
        assert [tuple(f.shape) for f in feats] == [(1, 256, 24, 32), (1, 256, 12, 16), (1, 256, 6, 8),
                                                    (1, 256, 3, 4), (1, 256, 2, 2)]
    else:
        assert bb.pos_grid == (32, 32) and cfg.model.decode_head.in_channels == bb.out_channels == [384] * 4
        assert [tuple(f.shape) for f in feats] == [(1, 384, 24, 32), (1, 384, 12, 16), (1, 384, 6, 8),
                                                    (1, 384, 3, 4)]


def test_mask_rcnn_tiny_trains_and_predicts(tmp_path):
    from mmengine.dataset import pseudo_collate
    from vit_backbones.data import make_coco_instances
    _plain_on_demo, _set_size, _tiny_run = _config_helpers('_plain_on_demo', '_set_size', '_tiny_run')
    root = str(tmp_path / 'coco') + os.sep
    paths = make_coco_instances(root, num_train=2, num_val=1, image_size=(96, 96), seed=0)
    cfg = _plain_on_demo('demo/mask_rcnn_swin_t_synthetic.py', 'mask_rcnn_ceit_s_fpn.py')
    assert cfg.model.backbone.type == 'CeiT'
    _set_size(cfg, (96, 96))
    runner, changed = _tiny_run(cfg, tmp_path / 'work', root, paths['val_ann'])
    assert 'backbone.blocks.0.mlp.conv2.weight' in changed and 'backbone.patch_embed.conv.layers.0.weight' in changed
    assert any(k.startswith('roi_head.mask_head') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    pred = sample.pred_instances
    assert pred.bboxes.shape[1] == 4 and tuple(pred.masks.shape[1:]) == (96, 96)


def test_upernet_tiny_trains_and_predicts(tmp_path):
    from mmengine.dataset import pseudo_collate
    from vit_backbones.data import make_ade_like
    _plain_on_demo, _set_size, _tiny_run = _config_helpers('_plain_on_demo', '_set_size', '_tiny_run')
    root = str(tmp_path / 'ade') + os.sep
    make_ade_like(root, num_train=2, num_val=1, image_size=(96, 96), seed=0)
    cfg = _plain_on_demo('demo/upernet_swin_t_synthetic.py', 'upernet_ceit_s_ade20k.py')
    assert cfg.model.backbone.type == 'CeiT'
    cfg.model.data_preprocessor.size = (96, 96)
    _set_size(cfg, (96, 96))
    runner, changed = _tiny_run(cfg, tmp_path / 'work', root)
    assert 'backbone.blocks.0.mlp.conv2.weight' in changed and any(k.startswith('decode_head.') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    seg = sample.pred_sem_seg.data
    assert tuple(seg.shape) == (1, 96, 96) and int(seg.min()) >= 0 and int(seg.max()) < 4
