"""PVT v2 and PVT v1: parity with HF transformers and mmdet, the official parameter counts, checkpoint
layouts (official, timm, HF, mmdet, ours) and the backbone contract."""
import functools
import re

import pytest
import torch

import vit_backbones
from helpers import randomize
from vit_backbones.checkpoint import CheckpointMismatchError

# tiny custom variants: every code path, a few thousand parameters
V2 = dict(embed_dims=(16, 32, 64, 128), depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8), mlp_ratios=(2, 2, 2, 2),
          sr_ratios=(8, 4, 2, 1), linear=False)
V2_LI = dict(V2, linear=True)
V1 = dict(embed_dims=(16, 32, 64, 128), depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8), mlp_ratios=(2, 2, 2, 2),
          sr_ratios=(8, 4, 2, 1))


def _max_diff(a, b):
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _v2(arch=V2, **kw):
    return vit_backbones.build_backbone('PVTv2', arch, drop_path_rate=0., **kw)


def _v1(arch=V1, **kw):
    return vit_backbones.build_backbone('PVT', arch, drop_path_rate=0., **kw)


# ----------------------------------------------------------------------------- official parameter counts
# whai362/PVT README (v2) and the PVT paper / classification README (v1): classifiers, head included.
@pytest.mark.parametrize('arch,table_m', [('b0', 3.7), ('b1', 14.0), ('b2', 25.4), ('b2_li', 22.6), ('b3', 45.2),
                                          ('b4', 62.6), ('b5', 82.0)])
def test_pvt_v2_param_count_matches_readme_with_head(arch, table_m):
    with torch.device('meta'):
        m = vit_backbones.build_backbone('PVTv2', arch)
    c = m.embed_dims[-1]
    n = sum(p.numel() for p in m.parameters()) + c * 1000 + 1000  # + ImageNet-1k head (norm4 is the final norm)
    assert abs(n / 1e6 - table_m) / table_m < 0.02, n


@pytest.mark.parametrize('arch,table_m', [('tiny', 13.2), ('small', 24.5), ('medium', 44.2), ('large', 61.4)])
def test_pvt_v1_param_count_matches_paper_with_head(arch, table_m):
    with torch.device('meta'):
        m = vit_backbones.build_backbone('PVT', arch, use_cls_token=True)  # class token + its position slot
    c = m.embed_dims[-1]
    n = sum(p.numel() for p in m.parameters()) + 2 * c + c * 1000 + 1000  # + final norm + head
    assert abs(n / 1e6 - table_m) / table_m < 0.02, n


# ----------------------------------------------------------------------------- shapes
@functools.lru_cache(maxsize=None)
def _eval_model(name, arch):
    arch = dict(base='b0', linear=True) if arch == 'b0_li' else arch  # b0 widths with linear SRA (b2_li is slow)
    return vit_backbones.build_backbone(name, arch).eval()


@pytest.mark.parametrize('name,arch', [('PVTv2', 'b0_li')])  # linear SRA (the contract suite covers the rest)
@pytest.mark.parametrize('hw', [(224, 224), (511, 511), (112, 137), (32, 32)])
def test_output_shapes_any_size(name, arch, hw):
    m = _eval_model(name, arch)
    with torch.no_grad():
        outs = m(torch.randn(1, 3, *hw))
    assert len(outs) == 4
    for i, o in enumerate(outs):
        s = 4 * 2**i
        assert o.shape == (1, m.embed_dims[i], -(-hw[0] // s), -(-hw[1] // s))
        assert torch.isfinite(o).all()
    assert m.out_strides == [4, 8, 16, 32] and m.out_channels == list(m.embed_dims)


def test_arch_names_and_aliases():
    with torch.device('meta'):
        assert vit_backbones.build_backbone('PVTv2', 'b2-li').arch_name == 'b2_li'
        assert vit_backbones.build_backbone('PVTv2', 'pvt_v2_b0').arch_name == 'b0'
        assert vit_backbones.build_backbone('PVT', 'pvt_tiny').arch_name == 'tiny'
        m = vit_backbones.build_backbone('PVTv2', dict(base='b0', depths=(1, 1, 1, 1)))
        assert m.depths == (1, 1, 1, 1) and m.embed_dims == (32, 64, 160, 256)
        li = vit_backbones.build_backbone('PVTv2', 'b2_li')
        assert li.stages[3].blocks[0].attn.pool is not None and li.stages[3].blocks[0].attn.sr.kernel_size == (1, 1)
        assert isinstance(li.stages[0].blocks[0].mlp.fc1, torch.nn.Linear) and li.linear
        assert vit_backbones.build_backbone('PVTv2', 'b5').mlp_ratios == (4, 4, 4, 4)


# ----------------------------------------------------------------------------- parity: HF transformers
def _hf_v2(linear=False, **kw):
    from transformers import PvtV2Config, PvtV2Model
    cfg = PvtV2Config(hidden_sizes=[16, 32, 64, 128], depths=[1, 2, 1, 1], num_attention_heads=[1, 2, 4, 8],
                      mlp_ratios=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1], linear_attention=linear, **kw)
    return randomize(PvtV2Model(cfg)).eval()


@pytest.mark.parametrize('linear', [False, True], ids=['sra', 'linear_sra'])
@pytest.mark.parametrize('hw', [(224, 224), (97, 203)])
def test_parity_hf_pvt_v2(hw, linear):
    hf = _hf_v2(linear)
    ours = _v2(V2_LI if linear else V2, layer_norm_eps=1e-6).eval()  # HF uses eps 1e-6 in every LayerNorm
    report = ours.load_checkpoint(hf.state_dict())
    assert report.source_format == 'hf' and not report.missing
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True).hidden_states
        diff = _max_diff(ref, ours(x))
    assert diff < 1e-4, diff


def test_hf_v2_classification_checkpoint_drops_head():
    from transformers import PvtV2Config, PvtV2ForImageClassification
    hf = PvtV2ForImageClassification(PvtV2Config(hidden_sizes=[16, 32, 64, 128], depths=[1, 2, 1, 1],
                                                 num_attention_heads=[1, 2, 4, 8], mlp_ratios=[2, 2, 2, 2],
                                                 num_labels=10))
    report = _v2().load_checkpoint(hf.state_dict())
    assert report.dropped['head.weight'] == 'classification head' and not report.missing


def test_parity_hf_pvt_v2_backbone_odd_size():
    from transformers import PvtV2Backbone, PvtV2Config
    cfg = PvtV2Config(hidden_sizes=[16, 32, 64, 128], depths=[1, 2, 1, 1], num_attention_heads=[1, 2, 4, 8],
                      mlp_ratios=[2, 2, 2, 2], out_features=['stage2', 'stage4'])
    hf = randomize(PvtV2Backbone(cfg)).eval()
    ours = _v2(layer_norm_eps=1e-6, out_indices=(1, 3)).eval()
    assert ours.load_checkpoint(hf.state_dict()).source_format == 'hf'
    x = torch.randn(1, 3, 75, 141)
    with torch.no_grad():
        assert _max_diff(hf(x).feature_maps, ours(x)) < 1e-4


def test_hf_v1_classification_checkpoint():
    from transformers import PvtConfig, PvtForImageClassification
    hf = PvtForImageClassification(PvtConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 2, 1, 1],
                                             num_attention_heads=[1, 2, 4, 8], mlp_ratios=[2, 2, 2, 2], num_labels=5))
    report = _v1().load_checkpoint(hf.state_dict())
    assert report.source_format == 'hf' and not report.missing
    assert {'head.weight', 'cls_token', 'norm.weight', 'pos_embed4[:, :1]'} <= set(report.dropped)
    report = _v1(use_cls_token=True, out_norm=True).load_checkpoint(hf.state_dict())
    assert {'stages.3.cls_token', 'norm3.weight'} <= set(report.loaded)
    assert set(report.missing) == {f'norm{i}.{p}' for i in range(3) for p in ('weight', 'bias')}


def _hf_v1(image_size=224):
    from transformers import PvtConfig, PvtModel
    cfg = PvtConfig(image_size=image_size, hidden_sizes=[16, 32, 64, 128], depths=[1, 2, 1, 1],
                    num_attention_heads=[1, 2, 4, 8], mlp_ratios=[2, 2, 2, 2], sequence_reduction_ratios=[8, 4, 2, 1])
    return randomize(PvtModel(cfg)).eval()


@pytest.mark.parametrize('size', [224, 160])
def test_parity_hf_pvt_v1(size):
    """HF PvtModel is the classifier trunk: class token in stage 4, final norm on stage 4.

    HF can only run at its configured image_size (it reshapes the stored position table to the runtime
    grid without resampling), so each size gets a model built for it; ours resamples at any size.
    """
    hf = _hf_v1(size)
    ours = _v1(use_cls_token=True, layer_norm_eps=1e-6, pretrain_img_size=size).eval()
    report = ours.load_checkpoint(hf.state_dict())
    assert report.source_format == 'hf' and not report.missing
    assert 'norm.weight' in report.dropped
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        outs = ours(x)
    ends = [0, 2, 3, 4]  # index of each stage's last block in hidden_states (depths 1, 2, 1, 1)
    for i, o in enumerate(outs):
        t = ref.hidden_states[ends[i]]
        t = t[:, 1:] if i == 3 else t
        assert _max_diff([t.transpose(1, 2).reshape(o.shape)], [o]) < 1e-4
    # out_norm=True puts the classifier's final norm on the last level
    normed = _v1(use_cls_token=True, layer_norm_eps=1e-6, pretrain_img_size=size, out_norm=True,
                 out_indices=(3, )).eval()
    report = normed.load_checkpoint(hf.state_dict())
    assert 'norm3.weight' in report.loaded
    with torch.no_grad():
        o = normed(x)[0]
    last = ref.last_hidden_state[:, 1:].transpose(1, 2).reshape(o.shape)
    assert _max_diff([last], [o]) < 1e-4


# ----------------------------------------------------------------------------- parity: mmdet
def _mmdet(v2=True, **kw):
    from mmdet.models.backbones import PyramidVisionTransformer, PyramidVisionTransformerV2
    cls = PyramidVisionTransformerV2 if v2 else PyramidVisionTransformer
    m = cls(embed_dims=16, num_layers=[1, 2, 1, 1], num_heads=[1, 2, 4, 8], mlp_ratios=[2, 2, 2, 2],
            drop_path_rate=0., **kw)
    randomize(m)
    m.eval()
    return m


@pytest.mark.parametrize('hw', [(224, 224), (97, 203)])
def test_parity_mmdet_pvt_v2(hw):
    mm = _mmdet(v2=True)
    sd = {'backbone.' + k: v for k, v in mm.state_dict().items()}  # as in a detector checkpoint
    sd['neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
    ours = _v2(layer_norm_eps=1e-6).eval()
    report = ours.load_checkpoint({'state_dict': sd, 'meta': {}})
    assert report.source_format == 'mmdet' and not report.missing
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        diff = _max_diff(mm(x), ours(x))
    assert diff < 1e-4, diff


@pytest.mark.parametrize('hw', [(224, 224), (96, 160)])
def test_parity_mmdet_pvt_v1(hw):
    """mmdet (like the official code) floors the grid on sides that are not multiples of 32; we pad to
    ceil, so parity is checked where the two agree (any multiple of 32, square or not)."""
    mm = _mmdet(v2=False)
    ours = _v1(layer_norm_eps=1e-6).eval()
    report = ours.load_checkpoint(mm.state_dict())
    assert report.source_format == 'mmdet' and not report.missing
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        diff = _max_diff(mm(x), ours(x))
    assert diff < 1e-4, diff


def _official_names(model):
    """Our state dict -> whai362/PVT classification names (the inverse of the loader's mapping)."""
    out = {}
    for k, v in model.state_dict().items():
        m = re.match(r'stages\.(\d+)\.(patch_embed|blocks|norm|pos_embed|cls_token)(.*)$', k)
        i, part, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
        if part == 'patch_embed':
            out[f'patch_embed{i}{rest}'] = v
        elif part == 'blocks':
            out[f'block{i}{rest}'.replace('.mlp.dwconv.', '.mlp.dwconv.dwconv.')] = v
        elif part == 'norm':
            out[f'norm{i}{rest}'] = v
        elif part == 'pos_embed':
            out[f'pos_embed{i}'] = v
        else:
            out['cls_token'] = v
    return out


@pytest.mark.parametrize('v2', [True, False], ids=['v2', 'v1'])
def test_official_layout_matches_mmdet_converter(v2):
    """An official-layout classification checkpoint (with head, and for v1 the class token, its position
    slot and the final norm), converted by mmdet's own pvt_convert, gives the same outputs in mmdet's model
    as our loader gives in ours: two independent conversions."""
    from mmdet.models.backbones.pvt import pvt_convert
    src = randomize(_v2() if v2 else _v1(use_cls_token=True), seed=3)
    official = _official_names(src)
    official['head.weight'], official['head.bias'] = torch.zeros(10, 128), torch.zeros(10)
    if not v2:
        official['norm.weight'], official['norm.bias'] = torch.ones(128), torch.zeros(128)
        assert official['pos_embed4'].shape == (1, 50, 128)
    mm = _mmdet(v2=v2, norm_cfg=dict(type='LN', eps=1e-6))
    mm.load_state_dict(pvt_convert(official), strict=True) if v2 else mm.load_state_dict(pvt_convert(official))
    ours = (_v2 if v2 else _v1)(layer_norm_eps=1e-6).eval()
    report = ours.load_checkpoint({'model': official})
    assert report.source_format == 'official' and not report.missing
    assert report.dropped['head.weight'] == 'classification head'
    if not v2:
        assert 'cls_token' in report.dropped and 'pos_embed4[:, :1]' in report.dropped
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        assert _max_diff(mm(x), ours(x)) < 1e-4


def test_timm_layout_loads():
    src = randomize(_v2(V2_LI), seed=4).eval()
    timm_sd = {}
    for k, v in _official_names(src).items():  # official -> timm names, as timm's checkpoint filter does
        k = k.replace('patch_embed1.', 'patch_embed.')
        k = re.sub(r'^patch_embed(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.downsample.', k)
        k = re.sub(r'^block(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.blocks.', k)
        k = re.sub(r'^norm(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.norm.', k)
        timm_sd[k.replace('.dwconv.dwconv.', '.dwconv.')] = v
    timm_sd['head.weight'] = torch.zeros(10, 128)
    ours = _v2(V2_LI).eval()
    report = ours.load_checkpoint(timm_sd)
    assert report.source_format == 'timm' and not report.missing
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert _max_diff(src(x), ours(x)) == 0


def test_v1_position_embeddings_resampled_on_load_and_every_forward():
    import torch.nn.functional as F
    src = randomize(_v1(pretrain_img_size=384), seed=5)
    dst = _v1()
    report = dst.load_checkpoint(src.state_dict())
    assert report.resized['stages.0.pos_embed'] == ((1, 96 * 96, 16), (1, 56 * 56, 16))
    ref = F.interpolate(src.stages[1].pos_embed.reshape(1, 48, 48, 32).permute(0, 3, 1, 2), size=(28, 28),
                        mode='bilinear', align_corners=False)
    assert torch.allclose(dst.stages[1].pos_embed, ref.flatten(2).transpose(1, 2), atol=1e-6)
    seen = []
    import vit_backbones.models.pvt as pvt_mod
    orig = pvt_mod.resample_abs_pos_embed

    def spy(pos, new_hw, *a, **k):
        seen.append(tuple(new_hw))
        return orig(pos, new_hw, *a, **k)

    pvt_mod.resample_abs_pos_embed = spy
    try:
        with torch.no_grad():
            dst.eval()(torch.randn(1, 3, 100, 70))
    finally:
        pvt_mod.resample_abs_pos_embed = orig
    assert seen == [(25, 18), (13, 9), (7, 5), (4, 3)]


# ----------------------------------------------------------------------------- training behaviour
@pytest.mark.parametrize('name,arch,kw', [('PVTv2', V2_LI, {}), ('PVT', V1, dict(use_cls_token=True, out_norm=True))])
def test_every_parameter_gets_a_gradient(name, arch, kw):
    m = vit_backbones.build_backbone(name, arch, drop_path_rate=0., **kw).train()  # no branch dropped
    sum(o.pow(2).mean() for o in m(torch.randn(2, 3, 64, 80))).backward()  # (a LayerNorm'd map's mean is constant)
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


@pytest.mark.parametrize('name,arch', [('PVTv2', V2), ('PVT', V1)])
def test_frozen_stages(name, arch):
    m = vit_backbones.build_backbone(name, arch, frozen_stages=2)
    m.train()
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in m.named_parameters() if n.startswith(('stages.0.', 'stages.1.'))}
    assert not m.stages[0].training and not m.stages[1].blocks[0].training and m.stages[2].training
    sum(o.mean() for o in m(torch.randn(1, 3, 64, 64))).backward()
    assert m.stages[1].blocks[0].attn.q.weight.grad is None
    assert m.stages[2].blocks[0].attn.q.weight.grad is not None
    stem_only = vit_backbones.build_backbone(name, arch, frozen_stages=0)
    frozen = {n for n, p in stem_only.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in stem_only.named_parameters()
                      if n.startswith('stages.0.patch_embed.') or n == 'stages.0.pos_embed'}
    all_frozen = vit_backbones.build_backbone(name, arch, frozen_stages=4)
    assert not any(p.requires_grad for p in all_frozen.parameters())


def test_drop_path_schedule_linear_over_blocks():
    m = vit_backbones.build_backbone('PVTv2', 'b2', drop_path_rate=0.3)
    rates = [blk.drop_path.drop_prob for s in m.stages for blk in s.blocks]
    assert len(rates) == 16 and rates == pytest.approx([0.3 * i / 15 for i in range(16)])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('name,arch', [('PVTv2', V2), ('PVT', V1)])
def test_bad_arch_has_clear_errors(name, arch):
    with pytest.raises(ValueError, match="unknown arch 'b9'"):
        vit_backbones.build_backbone(name, 'b9')
    with pytest.raises(ValueError, match='lacks'):
        vit_backbones.build_backbone(name, dict(depths=(1, 1, 1, 1)))


def test_checkpoint_of_another_model_or_variant_is_refused():
    swin_sd = vit_backbones.build_backbone('Swin', dict(embed_dims=16, depths=(1, 1, 1, 1),
                                                        num_heads=(1, 1, 1, 1))).state_dict()
    for name, arch in (('PVTv2', V2), ('PVT', V1)):
        with pytest.raises(CheckpointMismatchError, match='not a PVT checkpoint'):
            vit_backbones.build_backbone(name, arch).load_checkpoint(swin_sd)
    v1_official = _official_names(_v1())
    with pytest.raises(CheckpointMismatchError, match='PVT v1 checkpoint'):
        _v2().load_checkpoint(v1_official)
    with pytest.raises(CheckpointMismatchError, match='PVT v2 checkpoint'):
        _v1().load_checkpoint(_official_names(_v2()))
    with pytest.raises(CheckpointMismatchError, match='another variant'):  # b2-li weights into b2
        _v2(V2).load_checkpoint(_official_names(_v2(V2_LI)))
    with torch.device('meta'):
        b1_sd = vit_backbones.build_backbone('PVTv2', 'b1').state_dict()
        b2 = vit_backbones.build_backbone('PVTv2', 'b2')
    with pytest.raises(CheckpointMismatchError, match='another variant'):
        b2.load_checkpoint(b1_sd)

