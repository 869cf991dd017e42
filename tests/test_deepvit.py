"""DeepViT: re-attention against its definition, the published sizes, the official checkpoint layout
(zhoudaquan/dvit_repo), the pyramid contract and the detection / segmentation configs.

No PyPI package has DeepViT (timm and transformers have none), so the references are written in this
file from the definitions in the official ``models/layers.py`` / ``models/deep_vision_transformer.py``."""
import pytest
import torch
import torch.nn.functional as F

import vit_backbones
from helpers import randomize
from vit_backbones.checkpoint import CheckpointMismatchError
from vit_backbones.layers import Attention, ReAttention

# a tiny DeepViT-S: conv stem, re-attention in the last 2 of 4 blocks, transform_scale, scale_adjustment 0.5
TINY_S = dict(base='s', embed_dims=24, depth=4, num_heads=3, reattn_blocks=2)
TINY_B = dict(base='16b', embed_dims=24, depth=3, num_heads=3, reattn_blocks=3)  # every block, ViT stem


def _tc():
    """tests/test_configs.py (its helpers _load, _build_model, _set_size, _tiny_run, _plain_on_demo)."""
    import test_configs  # tests/ is on sys.path under pytest, as for helpers.py
    return test_configs


def _tiny(arch=TINY_S, **kw):
    return vit_backbones.build_backbone('DeepViT', arch, **kw)


# ----------------------------------------------------------------------------- published numbers
@pytest.mark.parametrize('arch,params_m', [('16b', 24.5), ('24b', 36.3), ('32b', 48.1), ('s', 27.0)])
def test_param_count_matches_published_with_head(arch, params_m):
    """README (16/24/32 blocks) and paper (DeepViT-S) counts include the 1000-way head."""
    with torch.device('meta'):
        m = vit_backbones.build_backbone('DeepViT', arch)
    assert m.paper_table[arch]['params'] == params_m
    assert abs(m.paper_param_count() / 1e6 - params_m) / params_m < 0.02, m.paper_param_count()


def _official_count(c, depth, n_re, cnn, heads=12, mlp=3):
    """Parameters of the official DeepVisionTransformer, written out from its definition."""
    h = int(c * mlp)
    block = 4 * c + (3 * c * c + 3 * c) + (c * c + c) + (c * h + h) + (h * c + c)
    reatt = heads * heads + heads + 2 * heads  # 1x1 conv over heads + BatchNorm affine
    stem = (3 * 64 * 49 + 128 + 64 * 64 * 9 + 128 + 64 * c * 64 + c) if cnn else (3 * c * 256 + c)
    return stem + c + 197 * c + depth * block + n_re * reatt + 2 * c + c * 1000 + 1000


def test_deepvit_l_follows_the_official_definition_not_the_papers_55m():
    """The official deepvit_L (420 wide, 32 blocks, conv stem) has 58.9M parameters; the paper lists
    DeepViT-L at 55M. We build the official definition (its checkpoints load) and record the gap."""
    with torch.device('meta'):
        m = vit_backbones.build_backbone('DeepViT', 'l')
        s = vit_backbones.build_backbone('DeepViT', 's')
    assert m.paper_param_count() == _official_count(420, 32, 12, True)
    assert s.paper_param_count() == _official_count(396, 16, 5, True)
    assert abs(m.paper_param_count() / 1e6 - 58.88) < 0.01
    assert m.paper_table['l']['params'] == 55.0 and m.paper_param_count() / 55e6 - 1 > 0.02


def test_arch_layout():
    with torch.device('meta'):
        s = vit_backbones.build_backbone('DeepViT', 'deepvit-s')
        b = vit_backbones.build_backbone('DeepViT', 're_attn_24b')
        l_ = vit_backbones.build_backbone('DeepViT', 'l')
    assert s.reattn_indices == (11, 12, 13, 14, 15) and l_.reattn_indices == tuple(range(20, 32))
    assert [type(blk.attn).__name__ for blk in s.blocks] == ['Attention'] * 11 + ['ReAttention'] * 5
    assert s.blocks[15].attn.reatten_scale == pytest.approx(33**-0.5) and l_.blocks[31].attn.reatten_scale == 1.0
    assert all(blk.scale_adjustment == 0.5 for blk in s.blocks) and all(blk.scale_adjustment == 1.0 for blk in b.blocks)
    assert type(s.patch_embed).__name__ == 'DeepViTConvStem' and b.patch_embed.proj.kernel_size == (16, 16)
    assert s.patch_embed.proj.kernel_size == (8, 8) and s.patch_embed.conv1.stride == (2, 2)
    assert b.arch_name == '24b' and len(b.blocks) == 24 and s.pos_embed.shape == (1, 197, 396)
    assert s.out_channels == [396] * 4 and s.blocks[0].mlp.fc1.out_features == 1188
    m = vit_backbones.build_backbone('DeepViT', 's', drop_path_rate=0.15)
    assert [blk.drop_path.drop_prob for blk in m.blocks] == pytest.approx([0.15 * i / 15 for i in range(16)])


# ----------------------------------------------------------------------------- re-attention vs definitions
def test_reattention_with_identity_theta_is_ordinary_attention():
    re = randomize(ReAttention(24, 3), seed=1).eval()
    ref = Attention(24, 3).eval()
    with torch.no_grad():
        re.reatten_matrix.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        re.reatten_matrix.bias.zero_()
        re.var_norm.weight.fill_(1.)
        re.var_norm.bias.zero_()
        re.var_norm.running_mean.zero_()
        re.var_norm.running_var.fill_(1. - re.var_norm.eps)  # so that BN(x) = x exactly
        ref.qkv.load_state_dict(re.qkv.state_dict())
        ref.proj.load_state_dict(re.proj.state_dict())
        x = torch.randn(2, 17, 24)
        assert float((re(x) - ref(x)).abs().max()) < 1e-5
        bias = torch.randn(1, 3, 17, 17)
        assert float((re(x, bias) - ref(x, bias)).abs().max()) < 1e-5


def _naive_reattention(x, sd, heads, transform_scale, training=False, prefix=''):
    """softmax(q k^T / sqrt(d)) -> conv1x1 over heads -> BatchNorm over heads -> (x scale) -> @ v -> proj,
    with einsums; the BatchNorm uses batch statistics (biased variance) when ``training``."""
    b, n, c = x.shape
    d = c // heads
    qkv = x @ sd[prefix + 'qkv.weight'].T + sd[prefix + 'qkv.bias']
    q, k, v = qkv.reshape(b, n, 3, heads, d).unbind(2)
    attn = torch.einsum('bnhd,bmhd->bhnm', q, k).mul(d**-0.5).softmax(-1)
    if prefix + 'reatten_matrix.weight' in sd:
        w = sd[prefix + 'reatten_matrix.weight'][:, :, 0, 0]
        attn = torch.einsum('gh,bhnm->bgnm', w, attn) + sd[prefix + 'reatten_matrix.bias'][:, None, None]
        if training:
            mean, var = attn.mean((0, 2, 3)), attn.var((0, 2, 3), unbiased=False)
        else:
            mean, var = sd[prefix + 'var_norm.running_mean'], sd[prefix + 'var_norm.running_var']
        attn = (attn - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5)
        attn = attn * sd[prefix + 'var_norm.weight'][:, None, None] + sd[prefix + 'var_norm.bias'][:, None, None]
        if transform_scale:
            attn = attn * d**-0.5
    out = torch.einsum('bhnm,bmhd->bnhd', attn, v).reshape(b, n, c)
    return out @ sd[prefix + 'proj.weight'].T + sd[prefix + 'proj.bias']


@pytest.mark.parametrize('transform_scale', [False, True])
def test_reattention_matches_naive_einsum_eval_and_train(transform_scale):
    re = randomize(ReAttention(24, 3, transform_scale=transform_scale), seed=2)
    sd = {k: v.clone() for k, v in re.state_dict().items()}
    x = torch.randn(2, 13, 24)
    with torch.no_grad():
        assert float((re.eval()(x) - _naive_reattention(x, sd, 3, transform_scale)).abs().max()) < 1e-5
        out = re.train()(x)
    assert float((out - _naive_reattention(x, sd, 3, transform_scale, training=True)).abs().max()) < 1e-5
    assert not torch.equal(re.var_norm.running_mean, sd['var_norm.running_mean'])  # stats were updated


def _naive_official_deepvit(sd, x, heads, depth, a, transform_scale):
    """The official DeepVisionTransformer (eval) up to the final norm, from an official state dict: conv
    stem (or linear patch conv), class token + position embedding, blocks with scale_adjustment ``a``."""
    c = sd['pos_embed'].shape[-1]

    def bn(t, p):
        return F.batch_norm(t, sd[p + 'running_mean'], sd[p + 'running_var'], sd[p + 'weight'], sd[p + 'bias'],
                            False, 0., 1e-5)

    if 'patch_embed.conv1.weight' in sd:
        t = F.relu(bn(F.conv2d(x, sd['patch_embed.conv1.weight'], stride=2, padding=3), 'patch_embed.bn1.'))
        t = F.relu(bn(F.conv2d(t, sd['patch_embed.conv2.weight'], padding=1), 'patch_embed.bn2.'))
        t = F.conv2d(t, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=8)
    else:
        t = F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=16)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd['cls_token'].expand(t.shape[0], -1, -1), t], 1) + sd['pos_embed']
    for i in range(depth):
        p = f'blocks.{i}.'
        y = F.layer_norm(t * a, (c, ), sd[p + 'norm1.weight'], sd[p + 'norm1.bias'], 1e-6)
        t = t + _naive_reattention(y, sd, heads, transform_scale, prefix=p + 'attn.') / a
        y = F.layer_norm(t * a, (c, ), sd[p + 'norm2.weight'], sd[p + 'norm2.bias'], 1e-6)
        y = F.gelu(y @ sd[p + 'mlp.fc1.weight'].T + sd[p + 'mlp.fc1.bias']) @ sd[p + 'mlp.fc2.weight'].T
        t = t + (y + sd[p + 'mlp.fc2.bias']) / a
    return F.layer_norm(t, (c, ), sd['norm.weight'], sd['norm.bias'], 1e-6)


def _official_key_set(depth, re_blocks, cnn):
    """Parameter and buffer names of the official model, from models/layers.py and deep_vision_transformer.py."""
    keys = {'cls_token', 'pos_embed', 'norm.weight', 'norm.bias', 'head.weight', 'head.bias', 'patch_embed.proj.weight',
            'patch_embed.proj.bias'}
    if cnn:
        keys |= {'patch_embed.conv1.weight', 'patch_embed.conv2.weight'}
        keys |= {f'patch_embed.bn{j}.{n}' for j in (1, 2)
                 for n in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')}
    for i in range(depth):
        p = f'blocks.{i}.'
        keys |= {p + n for n in ('norm1.weight', 'norm1.bias', 'norm2.weight', 'norm2.bias', 'attn.qkv.weight',
                                 'attn.qkv.bias', 'attn.proj.weight', 'attn.proj.bias', 'mlp.fc1.weight',
                                 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias')}
        if i in re_blocks:
            keys |= {p + 'attn.reatten_matrix.weight', p + 'attn.reatten_matrix.bias'}
            keys |= {p + f'attn.var_norm.{n}' for n in ('weight', 'bias', 'running_mean', 'running_var',
                                                        'num_batches_tracked')}
    return keys


@pytest.mark.parametrize('arch,depth,re_blocks,cnn,a,ts', [(TINY_S, 4, (2, 3), True, 0.5, True),
                                                          (TINY_B, 3, (0, 1, 2), False, 1.0, False)],
                         ids=['s-like', 'Nb-like'])
def test_official_layout_loads_every_tensor_and_matches_the_naive_model(arch, depth, re_blocks, cnn, a, ts):
    src = randomize(_tiny(arch, img_size=64), seed=3).eval()
    g = torch.Generator().manual_seed(4)
    official = {k: v.clone() for k, v in src.state_dict().items() if not k.startswith('pyramid.')}
    official['head.weight'], official['head.bias'] = torch.randn(1000, 24, generator=g), torch.randn(1000, generator=g)
    assert set(official) == _official_key_set(depth, re_blocks, cnn)  # our names are the official ones
    m = _tiny(arch, img_size=64).eval()
    report = m.load_checkpoint({'state_dict_ema': {'module.' + k: v for k, v in official.items()}})
    assert report.source_format == 'official' and report.dropped['head.weight'] == 'classification head'
    for k, v in m.state_dict().items():
        if not k.startswith('pyramid.'):
            assert torch.equal(v, official[k]), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, hw = m.forward_features(x, taps=[depth - 1])
        ref = _naive_official_deepvit(official, x, 3, depth, a, ts)
    assert hw == (4, 4) and float((feats[0] - ref).abs().max()) < 1e-5


def test_other_checkpoints_are_refused():
    with torch.device('meta'):
        s = vit_backbones.build_backbone('DeepViT', 's')
        b16 = vit_backbones.build_backbone('DeepViT', '16b')
        s_sd = s.state_dict()
        b16_sd = b16.state_dict()
        cait_sd = vit_backbones.build_backbone('CaiT', 'xxs24').state_dict()
        deit_sd = vit_backbones.build_backbone('DeiT', 'small').state_dict()
    with pytest.raises(CheckpointMismatchError, match='CaiT checkpoint'):
        s.load_checkpoint(cait_sd)
    with pytest.raises(CheckpointMismatchError, match='no re-attention layers'):
        b16.load_checkpoint(deit_sd)
    with pytest.raises(CheckpointMismatchError, match='another variant'):
        s.load_checkpoint(b16_sd)
    with pytest.raises(CheckpointMismatchError, match='another variant'):
        b16.load_checkpoint(s_sd)
    sd = dict(s_sd)
    for k in [k for k in sd if k.startswith('patch_embed.')]:
        del sd[k]
    sd['patch_embed.proj.weight'] = torch.zeros(396, 3, 16, 16)
    with pytest.raises(CheckpointMismatchError, match='patch embedding'):
        s.load_checkpoint(sd)


# ----------------------------------------------------------------------------- shapes and training
@pytest.mark.parametrize('hw', [(224, 224), (511, 511), (112, 137), (32, 32)])
@pytest.mark.parametrize('kw', [dict(pyramid='simple', window_size=4, global_attn_indexes=(1, 3), rel_pos=True)],
                         ids=['windows'])
def test_output_shapes_any_size(hw, kw):
    m = _tiny(**kw).eval()
    with torch.no_grad():
        outs = m(torch.randn(1, 3, *hw))
    assert len(outs) == 4
    for o, ch, s in zip(outs, m.out_channels, (4, 8, 16, 32)):
        assert o.shape == (1, ch, -(-hw[0] // s), -(-hw[1] // s))
        assert torch.isfinite(o).all()


@pytest.mark.parametrize('kw', [dict(pyramid='simple', window_size=4, global_attn_indexes=(1, ), rel_pos=True)],
                         ids=['windows'])
def test_every_parameter_gets_a_gradient(kw):
    m = _tiny(drop_path_rate=0., **kw).train()  # no branch dropped
    sum(o.mean() for o in m(torch.randn(2, 3, 64, 80))).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert m.blocks[3].attn.reatten_matrix.weight.grad is not None


def test_frozen_stages_freezes_stem_batchnorm():
    m = _tiny(frozen_stages=3).train()
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert {'cls_token', 'pos_embed', 'patch_embed.conv1.weight', 'patch_embed.bn1.weight',
            'blocks.2.attn.reatten_matrix.weight', 'blocks.2.attn.var_norm.bias'} <= frozen
    assert all(n.startswith(('cls_token', 'pos_embed', 'patch_embed.', 'blocks.0.', 'blocks.1.', 'blocks.2.'))
               for n in frozen)
    assert not m.patch_embed.bn1.training and not m.blocks[2].attn.var_norm.training
    assert m.blocks[3].attn.var_norm.training and m.pyramid.training
    before = m.patch_embed.bn1.running_mean.clone(), m.blocks[2].attn.var_norm.running_mean.clone()
    sum(o.mean() for o in m(torch.randn(2, 3, 64, 64))).backward()
    assert torch.equal(before[0], m.patch_embed.bn1.running_mean)
    assert torch.equal(before[1], m.blocks[2].attn.var_norm.running_mean)
    assert m.blocks[3].attn.reatten_matrix.weight.grad is not None and m.blocks[2].attn.qkv.weight.grad is None


# ----------------------------------------------------------------------------- configs
CONFIGS = ['mask_rcnn_deepvit_s_fpn.py', 'upernet_deepvit_s_ade20k.py']


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_deepvit_s(name):
    tc = _tc()
    cfg = tc._load(name)
    assert cfg.custom_imports == dict(imports=['vit_backbones'], allow_failed_imports=False)
    assert (cfg.model.backbone.type, cfg.model.backbone.arch) == ('DeepViT', 's')
    assert cfg.model.backbone.init_cfg.checkpoint == 'checkpoints/deepvit_s_224.pth'
    assert cfg.model.data_preprocessor.mean == [127.5] * 3 and cfg.model.data_preprocessor.std == [127.5] * 3
    model = tc._build_model(cfg)
    bb = model.backbone
    assert isinstance(bb, vit_backbones.get_backbone_class('DeepViT')) and bb.reattn_indices == (11, 12, 13, 14, 15)
    extra = sum(p.numel() for k, p in bb.named_parameters() if 'rel_pos' in k) + bb.pos_embed.numel() - 197 * 396
    assert abs((bb.paper_param_count() - extra) / 1e6 - 27.0) / 27.0 < 0.02
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.rand(1, 3, 96, 128))
    if cfg.default_scope == 'mmdet':
        assert bb.global_attn_indexes == (3, 7, 11, 15) and [b.window_size for b in bb.blocks].count(0) == 4
        assert cfg.model.neck.in_channels == bb.out_channels == [99, 198, 396, 396]
        assert [tuple(f.shape) for f in feats] == [(1, 256, 24, 32), (1, 256, 12, 16), (1, 256, 6, 8),
                                                    (1, 256, 3, 4), (1, 256, 2, 2)]
    else:
        assert bb.block_indices == (3, 7, 11, 15) and cfg.model.decode_head.in_channels == bb.out_channels == [396] * 4
        assert [tuple(f.shape) for f in feats] == [(1, 396, 24, 32), (1, 396, 12, 16), (1, 396, 6, 8), (1, 396, 3, 4)]


@pytest.mark.parametrize('name', CONFIGS)
def test_config_tiny_trains_and_predicts(tmp_path, monkeypatch, name):
    import os

    from mmengine.dataset import pseudo_collate

    from vit_backbones.data import make_ade_like, make_coco_instances
    tc = _tc()
    monkeypatch.setattr(tc, 'PLAIN_TINY', dict(base='s', embed_dims=32, depth=4, num_heads=2, reattn_blocks=2))
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
    assert cfg.model.backbone.type == 'DeepViT'
    tc._set_size(cfg, (64, 64))
    runner, changed = tc._tiny_run(cfg, tmp_path / 'work', root, ann)
    assert any('.attn.reatten_matrix.' in k for k in changed) and any(k.startswith('backbone.pyramid.') for k in changed)
    assert any(k.startswith('backbone.patch_embed.conv1') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    if det:
        assert sample.pred_instances.bboxes.shape[1] == 4 and tuple(sample.pred_instances.masks.shape[1:]) == (64, 64)
    else:
        seg = sample.pred_sem_seg.data
        assert tuple(seg.shape) == (1, 64, 64) and int(seg.min()) >= 0 and int(seg.max()) < 4


def test_feature_extraction_uses_the_official_normalisation():
    """The official DeepViT models are trained on (x - 0.5) / 0.5, not the ImageNet mean/std."""
    from vit_backbones import data_config
    cfg = data_config('DeepViT')
    assert cfg['mean'] == (0.5, 0.5, 0.5) and cfg['std'] == (0.5, 0.5, 0.5)
    assert data_config('ViT')['mean'] == (0.485, 0.456, 0.406)
