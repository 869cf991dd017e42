"""CPVT: the paper's sizes, the PEG against its definition at any size (no table to resample), the official
layout (DeiT keys + Twins' ``pos_block.0.proj.0``), refusal of other models' checkpoints, the backbone
contract and the detection / segmentation configs.

No PyPI package has CPVT (timm's ``twins_*`` are the pyramid Twins models, HF transformers has none), so
the reference is a naive forward written here from the definition (F.conv2d / F.layer_norm / explicit
softmax attention), fed with a state dict in the official key names."""
import os

import pytest
import torch
import torch.nn.functional as F

import vit_backbones
from helpers import randomize
from vit_backbones.checkpoint import CheckpointMismatchError
from vit_backbones.layers import PositionalEncodingGenerator

TINY = dict(base='tiny', embed_dims=32, depth=4, num_heads=2)
TINY_GAP = dict(base='tiny-gap', embed_dims=32, depth=4, num_heads=2)


def _official_sd(model):
    """Our state dict in the official layout: DeiT names, the PEG as Twins' ``pos_block.0.proj.0``, plus a head."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith('pyramid.'):
            continue
        sd[k.replace('pos_block.proj.', 'pos_block.0.proj.0.')] = v.clone()
    c = model.embed_dims
    sd['head.weight'], sd['head.bias'] = torch.randn(1000, c), torch.randn(1000)
    return sd


def _naive_cpvt(sd, x, heads, depth, cls):
    """Patch embedding, [cls] + tokens, pre-norm blocks, PEG (x + depthwise conv) on the grid after block 0,
    final norm: all from the definition, weights by official key name."""
    c = sd['patch_embed.proj.weight'].shape[0]
    h_img, w_img = x.shape[-2:]
    x = F.pad(x, (0, -w_img % 16, 0, -h_img % 16))
    t = F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=16)
    b, _, h, w = t.shape
    t = t.flatten(2).transpose(1, 2)
    if cls:
        t = torch.cat([sd['cls_token'].expand(b, -1, -1), t], 1)
    n, hd = t.shape[1], c // heads
    for i in range(depth):
        p = f'blocks.{i}.'
        y = F.layer_norm(t, (c, ), sd[p + 'norm1.weight'], sd[p + 'norm1.bias'], 1e-6)
        qkv = F.linear(y, sd[p + 'attn.qkv.weight'], sd[p + 'attn.qkv.bias']).reshape(b, n, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, -1)
        y = (a @ v).transpose(1, 2).reshape(b, n, c)
        t = t + F.linear(y, sd[p + 'attn.proj.weight'], sd[p + 'attn.proj.bias'])
        y = F.layer_norm(t, (c, ), sd[p + 'norm2.weight'], sd[p + 'norm2.bias'], 1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + 'mlp.fc1.weight'], sd[p + 'mlp.fc1.bias'])), sd[p + 'mlp.fc2.weight'],
                     sd[p + 'mlp.fc2.bias'])
        t = t + y
        if i == 0:
            s = 1 if cls else 0
            grid = t[:, s:].transpose(1, 2).reshape(b, c, h, w)
            grid = grid + F.conv2d(grid, sd['pos_block.0.proj.0.weight'], sd['pos_block.0.proj.0.bias'], padding=1,
                                   groups=c)
            t = torch.cat([t[:, :s], grid.flatten(2).transpose(1, 2)], 1)
    return F.layer_norm(t, (c, ), sd['norm.weight'], sd['norm.bias'], 1e-6)


# ----------------------------------------------------------------------------- paper numbers
@pytest.mark.parametrize('arch', ['tiny', 'small', 'base', 'tiny-gap', 'small-gap', 'base-gap'])
def test_param_count_matches_paper_with_head(arch):
    """CPVT-Ti/S/B 5.7/22/86M (GAP variants the same size), head included: trunk without the pyramid
    plus the 1000-way head (paper_param_count)."""
    with torch.device('meta'):
        m = vit_backbones.build_backbone('CPVT', arch)
    paper = {'tiny': 5.7, 'small': 22.0, 'base': 86.0}[arch.replace('-gap', '')]
    assert m.paper_table[arch]['params'] == paper
    n = m.paper_param_count()
    assert abs(n / 1e6 - paper) / paper < 0.02, n
    c = m.embed_dims
    trunk = sum(p.numel() for k, p in m.named_parameters() if not k.startswith('pyramid.'))
    assert n == trunk + c * 1000 + 1000
    # DeiT of the same size minus its position embedding plus one depthwise 3x3 conv (with bias)
    with torch.device('meta'):
        deit = vit_backbones.build_backbone('DeiT', arch.replace('-gap', ''))
    deit_trunk = sum(p.numel() for k, p in deit.named_parameters() if not k.startswith('pyramid.'))
    assert trunk == deit_trunk - 197 * c + 10 * c - (c if arch.endswith('-gap') else 0)


def test_no_position_embedding_and_variants():
    m = vit_backbones.build_backbone('CPVT', 'ti')
    assert m.pos_embed is None and not any('pos_embed' in k for k in m.state_dict())
    assert m.arch_name == 'tiny' and m.prefix_token_names == ('cls_token', ) and m.cls_token.shape == (1, 1, 192)
    assert tuple(m.pos_block.proj.weight.shape) == (192, 1, 3, 3) and m.pos_block.proj.groups == 192
    g = vit_backbones.build_backbone('CPVT', 's-gap')
    assert g.arch_name == 'small-gap' and g.prefix_token_names == () and not hasattr(g, 'cls_token')
    assert [f['reduction'] for f in g.feature_info] == [4, 8, 16, 32]


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize('hw', [(224, 224), (511, 511), (112, 137), (32, 32)])
@pytest.mark.parametrize('kw', [dict(arch=TINY_GAP),
                                dict(arch=TINY, pyramid='simple', final_norm=False, window_size=4,
                                     global_attn_indexes=(1, 3), rel_pos=True)], ids=['gap', 'vitdet'])
def test_output_shapes_any_size(hw, kw):
    m = vit_backbones.build_backbone('CPVT', **kw).eval()
    with torch.no_grad():
        outs = m(torch.randn(1, 3, *hw))
    assert [tuple(o.shape[1:]) for o in outs] == [(ch, -(-hw[0] // s), -(-hw[1] // s))
                                                  for ch, s in zip(m.out_channels, (4, 8, 16, 32))]


# ----------------------------------------------------------------------------- definition
@pytest.mark.parametrize('arch,cls', [(TINY, True), (TINY_GAP, False)], ids=['cls', 'gap'])
def test_matches_the_definition_at_any_size_without_resampling(arch, cls):
    """The same weights give the definition's tokens at 224x224, at a larger size and at a non-square,
    non-divisible size: the PEG needs no resampling (there is nothing size-dependent to resample)."""
    m = randomize(vit_backbones.build_backbone('CPVT', arch, drop_path_rate=0.), seed=1).eval()
    sd = _official_sd(m)
    for hw in [(224, 224), (288, 352), (112, 137)]:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            ours = m.forward_features(x, taps=[3])[0][0]
            ref = _naive_cpvt(sd, x, heads=2, depth=4, cls=cls)
        assert ours.shape == ref.shape == (2, int(cls) + -(-hw[0] // 16) * -(-hw[1] // 16), 32)
        assert float((ours - ref).abs().max()) < 1e-5, hw


def test_peg_is_residual_depthwise_conv_and_skips_the_class_token():
    """PEG(x) = x + sum over the 3x3 zero-padded neighbourhood (explicit shifts), class token unchanged."""
    torch.manual_seed(0)
    peg = PositionalEncodingGenerator(5)
    x = torch.randn(2, 1 + 4 * 7, 5)
    out = peg(x, (4, 7))
    assert torch.equal(out[:, :1], x[:, :1])
    grid = x[:, 1:].reshape(2, 4, 7, 5)
    pad = F.pad(grid, (0, 0, 1, 1, 1, 1))
    wgt = peg.proj.weight[:, 0]  # (C, 3, 3)
    ref = grid + peg.proj.bias
    for dy in range(3):
        for dx in range(3):
            ref = ref + pad[:, dy:dy + 4, dx:dx + 7] * wgt[:, dy, dx]
    assert float((out[:, 1:] - ref.reshape(2, 28, 5)).abs().max()) < 1e-6
    assert torch.equal(peg(x[:, 1:], (4, 7)), out[:, 1:])  # no prefix: the same grid result
    with pytest.raises(ValueError, match='grid tokens'):
        peg(x, (5, 7))


def test_peg_runs_after_the_chosen_block_only():
    m = vit_backbones.build_backbone('CPVT', TINY, peg_index=2)
    calls = []
    m.pos_block.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
    m(torch.randn(1, 3, 64, 48))
    assert len(calls) == 1 and m.peg_index == 2
    with pytest.raises(ValueError, match='peg_index'):
        vit_backbones.build_backbone('CPVT', TINY, peg_index=4)


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize('arch', [TINY, TINY_GAP], ids=['cls', 'gap'])
def test_official_layout_roundtrip(arch):
    src = randomize(vit_backbones.build_backbone('CPVT', arch), seed=3).eval()
    official = _official_sd(src)
    assert 'pos_block.0.proj.0.weight' in official and 'pos_embed' not in official
    dst = vit_backbones.build_backbone('CPVT', arch).eval()
    report = dst.load_checkpoint({'model': official})
    assert report.source_format == 'official'
    assert set(report.dropped) == {'head.weight', 'head.bias'}
    mine = dst.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith('pyramid.'):
            assert torch.equal(mine[k], v), k
    dst.pyramid.load_state_dict(src.pyramid.state_dict())
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(src(x), dst(x)))
    # a single PosCNN saved without the list (pos_block.proj.0.*) loads too; our own layout round-trips
    single = {k.replace('pos_block.0.proj.0.', 'pos_block.proj.0.'): v for k, v in official.items()}
    one = vit_backbones.build_backbone('CPVT', arch)
    assert one.load_checkpoint(single).source_format == 'official'
    assert torch.equal(one.pos_block.proj.weight, src.pos_block.proj.weight)
    again = vit_backbones.build_backbone('CPVT', arch)
    assert again.load_checkpoint(src.state_dict()).source_format == 'vit_backbones'
    assert torch.equal(again.pos_block.proj.bias, src.pos_block.proj.bias)


def test_other_models_checkpoints_are_refused():
    m = vit_backbones.build_backbone('CPVT', TINY)
    deit = vit_backbones.build_backbone('DeiT', TINY).state_dict()
    with pytest.raises(CheckpointMismatchError, match='ViT/DeiT checkpoint'):
        m.load_checkpoint(deit)
    twins = {'patch_embeds.0.proj.weight': torch.zeros(64, 3, 4, 4), 'blocks.0.0.attn.q.weight': torch.zeros(64, 64),
             'pos_block.0.proj.0.weight': torch.zeros(64, 1, 3, 3)}
    with pytest.raises(CheckpointMismatchError, match='Twins'):
        m.load_checkpoint(twins)
    ceit = {'i2t.backbone.conv.weight': torch.zeros(64, 3, 7, 7), 'blocks.0.leff.conv1.weight': torch.zeros(8, 4, 1, 1)}
    with pytest.raises(CheckpointMismatchError, match='CeiT'):
        m.load_checkpoint(ceit)
    gap_sd = _official_sd(vit_backbones.build_backbone('CPVT', TINY_GAP))
    with pytest.raises(CheckpointMismatchError, match='GAP arch'):
        m.load_checkpoint(gap_sd)
    with pytest.raises(CheckpointMismatchError, match='class-token arch'):
        vit_backbones.build_backbone('CPVT', TINY_GAP).load_checkpoint(_official_sd(m))
    with torch.device('meta'):
        tiny_sd = _official_sd(vit_backbones.build_backbone('CPVT', 'tiny'))
        small = vit_backbones.build_backbone('CPVT', 'small')
    with pytest.raises(CheckpointMismatchError, match='another variant'):
        small.load_checkpoint(tiny_sd)


def test_windowed_model_drops_the_class_token_on_load(tmp_path):
    src = randomize(vit_backbones.build_backbone('CPVT', TINY), seed=5)
    path = tmp_path / 'cpvt.pth'
    torch.save({'model': _official_sd(src)}, path)
    m = vit_backbones.build_backbone('CPVT', TINY, pyramid='simple', window_size=4, global_attn_indexes=(3, ),
                                     init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    m.init_weights()
    assert 'cls_token' in m.load_report.dropped and torch.equal(m.pos_block.proj.weight, src.pos_block.proj.weight)


# ----------------------------------------------------------------------------- contract
@pytest.mark.parametrize('kw', [dict(arch=TINY_GAP, pyramid='simple', window_size=4,
                                                      global_attn_indexes=(1, ), rel_pos=True)],
                         ids=['gap-windows'])
def test_every_parameter_gets_a_gradient(kw):
    m = vit_backbones.build_backbone('CPVT', drop_path_rate=0., **kw).train()  # no branch dropped
    sum(o.mean() for o in m(torch.randn(2, 3, 64, 80))).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_frozen_stages():
    m = vit_backbones.build_backbone('CPVT', TINY, frozen_stages=2).train()
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert {'cls_token', 'patch_embed.proj.weight', 'pos_block.proj.weight', 'pos_block.proj.bias'} <= frozen
    assert all(n.startswith(('cls_token', 'patch_embed.', 'pos_block.', 'blocks.0.', 'blocks.1.')) for n in frozen)
    assert all(p.requires_grad for p in m.blocks[2].parameters())
    assert not m.blocks[1].training and m.blocks[2].training and not m.pos_block.training
    sum(o.mean() for o in m(torch.randn(1, 3, 64, 64))).backward()
    assert m.pos_block.proj.weight.grad is None and m.blocks[2].attn.qkv.weight.grad is not None
    m0 = vit_backbones.build_backbone('CPVT', TINY, frozen_stages=0)
    assert not m0.pos_block.proj.weight.requires_grad and m0.blocks[0].attn.qkv.weight.requires_grad
    assert all(p.requires_grad for p in vit_backbones.build_backbone('CPVT', TINY).parameters())


def test_bad_arguments_have_clear_errors():
    with pytest.raises(ValueError, match="unknown arch 'huge'"):
        vit_backbones.build_backbone('CPVT', 'huge')
    with pytest.raises(ValueError, match='GAP variant'):
        vit_backbones.build_backbone('CPVT', TINY_GAP, output_cls_token=True)


# ----------------------------------------------------------------------------- configs
def _config_helpers(*names):
    """The helpers of tests/test_configs.py."""
    import test_configs as tc  # tests/ is on sys.path under pytest, as for helpers.py
    return tuple(getattr(tc, n) for n in names)


CPVT_CONFIGS = {  # config -> arch
    'mask_rcnn_cpvt_s_fpn.py': 'small',
    'upernet_cpvt_s_ade20k.py': 'small',
}


@pytest.mark.parametrize('name', sorted(CPVT_CONFIGS))
def test_config_builds_model(name):
    _build_model, _load = _config_helpers('_build_model', '_load')
    cfg = _load(name)
    assert cfg.custom_imports == dict(imports=['vit_backbones'], allow_failed_imports=False)
    assert cfg.model.backbone.type == 'CPVT' and cfg.model.backbone.arch == CPVT_CONFIGS[name]
    assert cfg.model.backbone.init_cfg.type == 'Pretrained'
    keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
    assert keys['pos_block'] == dict(decay_mult=0.0) and {'cls_token', 'norm'} <= set(keys)
    model = _build_model(cfg)
    bb = model.backbone
    assert isinstance(bb, vit_backbones.get_backbone_class('CPVT'))
    n = sum(p.numel() for k, p in bb.named_parameters() if not k.startswith('pyramid.'))
    assert bb.pos_embed is None and n == pytest.approx(21.594e6, rel=0.003)  # DeiT-S trunk - pos_embed + PEG
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.rand(1, 3, 96, 128))
    if cfg.default_scope == 'mmdet':
        assert bb.window_size == 14 and cfg.model.neck.in_channels == bb.out_channels == [96, 192, 384, 384]
        assert [tuple(f.shape) for f in feats] == [(1, 256, 24, 32), (1, 256, 12, 16), (1, 256, 6, 8),
                                                    (1, 256, 3, 4), (1, 256, 2, 2)]
    else:
        assert cfg.model.decode_head.in_channels == bb.out_channels == [384] * 4
        assert [tuple(f.shape) for f in feats] == [(1, 384, 24, 32), (1, 384, 12, 16), (1, 384, 6, 8),
                                                    (1, 384, 3, 4)]


def test_mask_rcnn_tiny_trains_and_predicts(tmp_path):
    from mmengine.dataset import pseudo_collate
    _plain_on_demo, _set_size, _tiny_run = _config_helpers('_plain_on_demo', '_set_size', '_tiny_run')
    from vit_backbones.data import make_coco_instances
    root = str(tmp_path / 'coco') + os.sep
    paths = make_coco_instances(root, num_train=2, num_val=1, image_size=(96, 96), seed=0)
    cfg = _plain_on_demo('demo/mask_rcnn_swin_t_synthetic.py', 'mask_rcnn_cpvt_s_fpn.py')
    assert cfg.model.backbone.type == 'CPVT'
    _set_size(cfg, (96, 96))
    runner, changed = _tiny_run(cfg, tmp_path / 'work', root, paths['val_ann'])
    assert 'backbone.pos_block.proj.weight' in changed and any(k.startswith('backbone.pyramid.') for k in changed)
    assert any(k.startswith('roi_head.mask_head') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    pred = sample.pred_instances
    assert pred.bboxes.shape[1] == 4 and tuple(pred.masks.shape[1:]) == (96, 96)


def test_upernet_tiny_trains_and_predicts(tmp_path):
    from mmengine.dataset import pseudo_collate
    _plain_on_demo, _set_size, _tiny_run = _config_helpers('_plain_on_demo', '_set_size', '_tiny_run')
    from vit_backbones.data import make_ade_like
    root = str(tmp_path / 'ade') + os.sep
    make_ade_like(root, num_train=2, num_val=1, image_size=(96, 96), seed=0)
    cfg = _plain_on_demo('demo/upernet_swin_t_synthetic.py', 'upernet_cpvt_s_ade20k.py')
    assert cfg.model.backbone.type == 'CPVT'
    cfg.model.data_preprocessor.size = (96, 96)
    _set_size(cfg, (96, 96))
    runner, changed = _tiny_run(cfg, tmp_path / 'work', root)
    assert 'backbone.pos_block.proj.weight' in changed and any(k.startswith('decode_head.') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    seg = sample.pred_sem_seg.data
    assert tuple(seg.shape) == (1, 96, 96) and int(seg.min()) >= 0 and int(seg.max()) < 4
