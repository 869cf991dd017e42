"""CaiT: talking-heads attention against its definition, the paper's sizes, the official / timm checkpoint
layout, the pyramid contract and the detection / segmentation configs.

No PyPI package has CaiT here (timm cannot be imported, transformers has none), so the references are
written in this file from the definitions in facebookresearch/deit ``cait_models.py`` with einsums."""
import pytest
import torch
import torch.nn.functional as F

import vit_backbones
from helpers import randomize
from vit_backbones.checkpoint import CheckpointMismatchError
from vit_backbones.layers import Attention, TalkingHeadAttention, ViTBlock

TINY = dict(base='xxs24', embed_dims=32, depth=4, num_heads=4)


def _tc():
    """tests/test_configs.py (its helpers _load, _build_model, _set_size, _tiny_run, _plain_on_demo)."""
    import test_configs  # tests/ is on sys.path under pytest, as for helpers.py
    return test_configs


def _tiny(**kw):
    return vit_backbones.build_backbone('CaiT', TINY, **kw)


# ----------------------------------------------------------------------------- paper numbers
@pytest.mark.parametrize('arch,params_m,depth,init', [('xxs24', 12.0, 24, 1e-5), ('xxs36', 17.3, 36, 1e-5),
                                                      ('xs24', 26.6, 24, 1e-5), ('s24', 46.9, 24, 1e-5),
                                                      ('s36', 68.2, 36, 1e-6)])
def test_param_count_matches_paper_with_head_and_class_attention(arch, params_m, depth, init):
    """The paper counts the classifier: our self-attention stage (no pyramid) + class token + two
    class-attention layers + final norm + 1000-way head (classifier_param_delta)."""
    with torch.device('meta'):
        m = vit_backbones.build_backbone('CaiT', arch)
        m_nonorm = vit_backbones.build_backbone('CaiT', arch, final_norm=False)
    assert m.paper_table[arch]['params'] == params_m
    assert abs(m.paper_param_count() / 1e6 - params_m) / params_m < 0.02, m.paper_param_count()
    assert m_nonorm.paper_param_count() == m.paper_param_count()
    c = m.embed_dims
    ca_layer = 4 * (c * c + c) + 4 * c + (c * 4 * c + 4 * c) + (4 * c * c + c) + 2 * c  # written out per layer
    trunk = sum(p.numel() for k, p in m.named_parameters() if not k.startswith('pyramid.'))
    assert m.paper_param_count() == trunk + 2 * ca_layer + c + c * 1000 + 1000
    assert len(m.blocks) == depth and m.init_values == init and m.blocks[0].ls1.gamma.shape == (c, )
    assert not hasattr(m, 'cls_token') and m.pos_embed.shape == (1, 196, c)


def test_constant_drop_path_and_arch_names():
    m = vit_backbones.build_backbone('CaiT', 'cait_xxs24_224', drop_path_rate=0.05)
    assert m.arch_name == 'xxs24'
    assert [b.drop_path.drop_prob for b in m.blocks] == [0.05] * 24
    assert all(torch.equal(b.ls1.gamma, torch.full((192, ), 1e-5)) for b in m.blocks)  # official init
    custom = vit_backbones.build_backbone('CaiT', dict(embed_dims=32, depth=12, num_heads=4, init_values=None))
    assert custom.blocks[0].ls1.gamma[0].item() == pytest.approx(0.1)  # paper rule: depth <= 18 -> 0.1
    with pytest.raises(ValueError, match='no class token'):
        _tiny(output_cls_token=True)
    with pytest.raises(ValueError, match="unknown arch 'm99'"):
        vit_backbones.build_backbone('CaiT', 'm99')


# ----------------------------------------------------------------------------- talking heads vs definitions
def test_talking_heads_with_identity_mixing_is_ordinary_attention():
    th = randomize(TalkingHeadAttention(32, 4), seed=1).eval()
    ref = Attention(32, 4).eval()
    with torch.no_grad():
        for lin in (th.proj_l, th.proj_w):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
        ref.qkv.load_state_dict(th.qkv.state_dict())
        ref.proj.load_state_dict(th.proj.state_dict())
        x = torch.randn(2, 23, 32)
        bias = torch.randn(1, 4, 23, 23)
        assert float((th(x) - ref(x)).abs().max()) < 1e-5
        assert float((th(x, bias) - ref(x, bias)).abs().max()) < 1e-5
        # and a whole CaiT block equals a LayerScale ViT block on the same weights
        cait = _tiny(drop_path_rate=0.)
        randomize(cait, seed=2)
        blk = cait.blocks[1].eval()
        blk.attn.load_state_dict(th.state_dict())
        vit_blk = ViTBlock(32, 4, layer_scale=1.).eval()
        vit_blk.load_state_dict({k: v for k, v in blk.state_dict().items() if 'proj_l' not in k and 'proj_w' not in k})
        assert float((blk(x) - vit_blk(x)).abs().max()) < 1e-5


def _naive_talking_heads(x, sd, heads, prefix=''):
    """Talking-heads attention of (B, N, C) tokens from the official definition, with einsums."""
    b, n, c = x.shape
    d = c // heads
    qkv = x @ sd[prefix + 'qkv.weight'].T + sd[prefix + 'qkv.bias']
    q, k, v = qkv.reshape(b, n, 3, heads, d).unbind(2)  # (B, N, H, d)
    logits = torch.einsum('bnhd,bmhd->bhnm', q * d**-0.5, k)
    logits = torch.einsum('gh,bhnm->bgnm', sd[prefix + 'proj_l.weight'], logits) + sd[prefix + 'proj_l.bias'][:, None, None]
    probs = logits.softmax(-1)
    probs = torch.einsum('gh,bhnm->bgnm', sd[prefix + 'proj_w.weight'], probs) + sd[prefix + 'proj_w.bias'][:, None, None]
    out = torch.einsum('bhnm,bmhd->bnhd', probs, v).reshape(b, n, c)
    return out @ sd[prefix + 'proj.weight'].T + sd[prefix + 'proj.bias']


def _naive_official_cait(sd, x, heads, depth):
    """The official CaiT self-attention stage + final norm (on the patch tokens), from an official-layout
    state dict: patch conv, + position embedding (no class slot), LayerScale blocks with talking heads."""
    c = sd['pos_embed'].shape[-1]
    t = F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=16).flatten(2).transpose(1, 2)
    t = t + sd['pos_embed']
    for i in range(depth):
        p = f'blocks.{i}.'
        y = F.layer_norm(t, (c, ), sd[p + 'norm1.weight'], sd[p + 'norm1.bias'], 1e-6)
        t = t + sd[p + 'gamma_1'] * _naive_talking_heads(y, sd, heads, p + 'attn.')
        y = F.layer_norm(t, (c, ), sd[p + 'norm2.weight'], sd[p + 'norm2.bias'], 1e-6)
        y = F.gelu(y @ sd[p + 'mlp.fc1.weight'].T + sd[p + 'mlp.fc1.bias']) @ sd[p + 'mlp.fc2.weight'].T
        t = t + sd[p + 'gamma_2'] * (y + sd[p + 'mlp.fc2.bias'])
    return F.layer_norm(t, (c, ), sd['norm.weight'], sd['norm.bias'], 1e-6)


def test_talking_heads_matches_naive_einsum():
    th = randomize(TalkingHeadAttention(48, 6), seed=3).eval()
    x = torch.randn(2, 19, 48)
    with torch.no_grad():
        ref = _naive_talking_heads(x, th.state_dict(), 6)
        assert float((th(x) - ref).abs().max()) < 1e-5
    # the gradient path (explicit matmuls) gives the same values
    assert float((th(x.clone().requires_grad_()).detach() - ref).abs().max()) < 1e-5


def _official_state_dict(ours, depth_token_only=2, seed=5):
    """Our state dict renamed to the official / timm CaiT names (cait_models.py: ``blocks.N.gamma_1/2``,
    ``attn.proj_l/proj_w``), plus the classification-only parts: cls_token, class-attention layers
    (``blocks_token_only.N``: norm1, attn.q/k/v/proj, norm2, mlp.fc1/fc2, gamma_1/2) and head."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in ours.items():
        if k.startswith('pyramid.'):
            continue
        sd[k.replace('.ls1.gamma', '.gamma_1').replace('.ls2.gamma', '.gamma_2')] = v.clone()
    c = ours['pos_embed'].shape[-1]
    sd['cls_token'] = torch.randn(1, 1, c, generator=g)
    for i in range(depth_token_only):
        p = f'blocks_token_only.{i}.'
        shapes = {'norm1.weight': (c, ), 'norm1.bias': (c, ), 'norm2.weight': (c, ), 'norm2.bias': (c, ),
                  'mlp.fc1.weight': (4 * c, c), 'mlp.fc1.bias': (4 * c, ), 'mlp.fc2.weight': (c, 4 * c),
                  'mlp.fc2.bias': (c, ), 'gamma_1': (c, ), 'gamma_2': (c, ), 'attn.proj.weight': (c, c),
                  'attn.proj.bias': (c, )}
        shapes.update({f'attn.{n}.{w}': ((c, c) if w == 'weight' else (c, )) for n in 'qkv' for w in ('weight', 'bias')})
        sd.update({p + k: torch.randn(s, generator=g) for k, s in shapes.items()})
    sd['head.weight'], sd['head.bias'] = torch.randn(1000, c, generator=g), torch.randn(1000, generator=g)
    return sd


def test_official_layout_loads_every_tensor_and_matches_the_naive_model():
    src = randomize(vit_backbones.build_backbone('CaiT', TINY, img_size=64), seed=4).eval()
    official = _official_state_dict(src.state_dict())
    assert {'blocks.0.gamma_1', 'blocks.3.attn.proj_l.weight', 'blocks_token_only.1.attn.q.weight'} <= set(official)
    ckpt = {'model': {'module.' + k: v for k, v in official.items()}}  # how the official files are saved
    m = vit_backbones.build_backbone('CaiT', TINY, img_size=64).eval()
    report = m.load_checkpoint(ckpt)
    assert report.source_format == 'official/timm'
    for k, v in m.state_dict().items():
        if not k.startswith('pyramid.'):
            ok = k.replace('.ls1.gamma', '.gamma_1').replace('.ls2.gamma', '.gamma_2')
            assert torch.equal(v, official[ok]), k
    assert report.dropped['blocks_token_only.0.attn.q.weight'].startswith('class-attention layer')
    assert report.dropped['cls_token'].startswith('class token') and report.dropped['head.weight'] == 'classification head'
    assert [k for k in report.missing if not k.startswith('pyramid.')] == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, hw = m.forward_features(x, taps=[3])
        ref = _naive_official_cait(official, x, 4, 4)
    assert hw == (4, 4) and float((feats[0] - ref).abs().max()) < 1e-5
    m.pyramid.load_state_dict(src.pyramid.state_dict())  # not in classification checkpoints
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(m(x), src(x)))


def test_384_checkpoint_position_embedding_is_resampled():
    src = randomize(vit_backbones.build_backbone('CaiT', TINY, img_size=384), seed=6)
    official = _official_state_dict(src.state_dict())
    m = _tiny()
    report = m.load_checkpoint(official)
    assert report.resized['pos_embed'] == ((1, 576, 32), (1, 196, 32))
    grid = official['pos_embed'].reshape(1, 24, 24, 32).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(14, 14), mode='bicubic', align_corners=False).flatten(2).transpose(1, 2)
    assert float((m.pos_embed.detach() - ref).abs().max()) < 1e-6


def test_other_checkpoints_are_refused():
    with torch.device('meta'):
        deit_sd = vit_backbones.build_backbone('DeiT', 'small').state_dict()
        deepvit_sd = vit_backbones.build_backbone('DeepViT', '16b').state_dict()
        xxs36 = vit_backbones.build_backbone('CaiT', 'xxs36')
        xxs24_sd = vit_backbones.build_backbone('CaiT', 'xxs24').state_dict()
        s24 = vit_backbones.build_backbone('CaiT', 's24')
    with pytest.raises(CheckpointMismatchError, match='ViT / DeiT checkpoint'):
        s24.load_checkpoint(deit_sd)
    with pytest.raises(CheckpointMismatchError, match='DeepViT checkpoint'):
        s24.load_checkpoint(deepvit_sd)
    with pytest.raises(CheckpointMismatchError, match='another variant'):
        xxs36.load_checkpoint(xxs24_sd)
    with pytest.raises(CheckpointMismatchError, match='another variant'):
        s24.load_checkpoint(xxs24_sd)


# ----------------------------------------------------------------------------- shapes and training
@pytest.mark.parametrize('hw', [(224, 224), (511, 511), (112, 137), (32, 32)])
@pytest.mark.parametrize('kw', [dict(pyramid='simple', window_size=4, global_attn_indexes=(1, 3), rel_pos=True)],
                         ids=['windows'])
def test_output_shapes_any_size(hw, kw):
    m = _tiny(**kw).eval()
    with torch.no_grad():
        outs = m(torch.randn(1, 3, *hw))
    assert len(outs) == 4 and m.out_strides == [4, 8, 16, 32]
    for o, ch, s in zip(outs, m.out_channels, (4, 8, 16, 32)):
        assert o.shape == (1, ch, -(-hw[0] // s), -(-hw[1] // s))
        assert torch.isfinite(o).all()
    with pytest.raises(ValueError, match='at least 32x32'):
        m(torch.randn(1, 3, 31, 64))


@pytest.mark.parametrize('kw', [dict(pyramid='simple', window_size=4, global_attn_indexes=(1, ), rel_pos=True)],
                         ids=['windows'])
def test_every_parameter_gets_a_gradient(kw):
    m = _tiny(drop_path_rate=0., **kw).train()  # no branch dropped
    sum(o.mean() for o in m(torch.randn(2, 3, 64, 80))).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert any('proj_l' in n for n, _ in m.named_parameters())


def test_frozen_stages_and_norm_eval():
    m = _tiny(frozen_stages=2).train()
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert {'pos_embed', 'patch_embed.proj.weight', 'blocks.1.ls2.gamma', 'blocks.0.attn.proj_l.weight'} <= frozen
    assert all(n.startswith(('pos_embed', 'patch_embed.', 'blocks.0.', 'blocks.1.')) for n in frozen)
    assert not m.blocks[1].training and m.blocks[2].training and m.pyramid.training
    sum(o.mean() for o in m(torch.randn(1, 3, 64, 64))).backward()
    assert m.blocks[0].attn.proj_w.weight.grad is None and m.blocks[2].attn.proj_w.weight.grad is not None
    n = _tiny(norm_eval=True).train()
    bns = [mod for mod in n.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    before = [bn.running_mean.clone() for bn in bns]
    n(torch.randn(2, 3, 64, 64))
    assert bns and not any(bn.training for bn in bns) and all(torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))


# ----------------------------------------------------------------------------- configs
CONFIGS = ['mask_rcnn_cait_s24_fpn.py', 'upernet_cait_s24_ade20k.py']


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_cait_s24(name):
    tc = _tc()
    cfg = tc._load(name)
    assert cfg.custom_imports == dict(imports=['vit_backbones'], allow_failed_imports=False)
    assert (cfg.model.backbone.type, cfg.model.backbone.arch) == ('CaiT', 's24')
    assert cfg.model.backbone.init_cfg.checkpoint == 'checkpoints/S24_224.pth'
    model = tc._build_model(cfg)
    bb = model.backbone
    assert isinstance(bb, vit_backbones.get_backbone_class('CaiT')) and bb.depth == 24
    # paper count, less the dense-only parts the config adds (window bias tables, larger position grid)
    extra = sum(p.numel() for k, p in bb.named_parameters() if 'rel_pos' in k) + bb.pos_embed.numel() - 196 * 384
    assert abs((bb.paper_param_count() - extra) / 1e6 - 46.9) / 46.9 < 0.02
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.rand(1, 3, 96, 128))
    if cfg.default_scope == 'mmdet':
        assert [b.window_size for b in bb.blocks].count(0) == 4 and bb.global_attn_indexes == (5, 11, 17, 23)
        assert cfg.model.neck.in_channels == bb.out_channels == [96, 192, 384, 384]
        assert [tuple(f.shape) for f in feats] == [(1, 256, 24, 32), (1, 256, 12, 16), (1, 256, 6, 8),
                                                    (1, 256, 3, 4), (1, 256, 2, 2)]
    else:
        assert bb.block_indices == (5, 11, 17, 23) and cfg.model.decode_head.in_channels == bb.out_channels == [384] * 4
        assert [tuple(f.shape) for f in feats] == [(1, 384, 24, 32), (1, 384, 12, 16), (1, 384, 6, 8), (1, 384, 3, 4)]


@pytest.mark.parametrize('name', CONFIGS)
def test_config_tiny_trains_and_predicts(tmp_path, monkeypatch, name):
    import os

    from mmengine.dataset import pseudo_collate

    from vit_backbones.data import make_ade_like, make_coco_instances
    tc = _tc()
    monkeypatch.setattr(tc, 'PLAIN_TINY', dict(TINY))  # the helper's tiny arch, as a CaiT arch
    det = name.startswith('mask_rcnn')
    root = str(tmp_path / 'data') + os.sep
    if det:
        ann = make_coco_instances(root, num_train=2, num_val=1, image_size=(64, 64), seed=0)['val_ann']
        cfg = tc._plain_on_demo('demo/mask_rcnn_swin_t_synthetic.py', name)
    else:
        ann = None
        make_ade_like(root, num_train=2, num_val=1, image_size=(64, 64), seed=0)
        cfg = tc._plain_on_demo('demo/upernet_swin_t_synthetic.py', name)
        cfg.model.data_preprocessor.size = (64, 64)
    assert cfg.model.backbone.type == 'CaiT'
    tc._set_size(cfg, (64, 64))
    runner, changed = tc._tiny_run(cfg, tmp_path / 'work', root, ann)
    assert any('.attn.proj_l.' in k for k in changed) and any(k.startswith('backbone.pyramid.') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    if det:
        assert sample.pred_instances.bboxes.shape[1] == 4 and tuple(sample.pred_instances.masks.shape[1:]) == (64, 64)
    else:
        seg = sample.pred_sem_seg.data
        assert tuple(seg.shape) == (1, 64, 64) and int(seg.min()) >= 0 and int(seg.max()) < 4
