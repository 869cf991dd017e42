"""CvT: parity with HF transformers' CvtModel, the paper's parameter counts, checkpoint layouts (official
microsoft/CvT, HF transformers, ours), the backbone contract, and the two configs."""
import functools
import os
import re

import pytest
import torch
import torch.nn.functional as F

import vit_backbones
from helpers import randomize
from vit_backbones.checkpoint import CheckpointMismatchError

# tiny custom variant: three stages, class token in the last, a few ten thousand parameters
TINY = dict(embed_dims=(16, 32, 48), depths=(1, 2, 3), num_heads=(1, 2, 3), mlp_ratio=4.)


def _max_diff(a, b):
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _tc():
    """tests/test_configs.py (its config helpers), however pytest put tests/ on the path."""
    import test_configs  # tests/ is on sys.path under pytest, as for helpers.py
    return test_configs


def _cvt(arch=TINY, **kw):
    kw.setdefault('drop_path_rate', 0.)
    return vit_backbones.build_backbone('CvT', arch, **kw)


def _hf_config(dims=(16, 32, 48), depths=(1, 2, 3), heads=(1, 2, 3)):
    from transformers import CvtConfig
    # HF indexes each stage's drop-path list by the stage number, so stage i needs depth > i
    return CvtConfig(embed_dim=list(dims), depth=list(depths), num_heads=list(heads), drop_path_rate=[0., 0., 0.])


@functools.lru_cache(maxsize=None)
def _hf_tiny():
    from transformers import CvtModel
    return randomize(CvtModel(_hf_config())).eval()


def _ceil_pad(x):
    """Bottom/right zero padding that makes the 7x7/4 (padding 2) convolution give ceil(H/4) rows."""
    extra = {0: 0, 1: 2, 2: 1, 3: 0}
    return F.pad(x, (0, extra[x.shape[-1] % 4], 0, extra[x.shape[-2] % 4]))


# ----------------------------------------------------------------------------- paper parameter counts
# CvT paper Table 2 / official README: 20M, 32M, 277M, counted with the ImageNet classifier (the final
# LayerNorm on the class token and the Linear head to 1000 classes), which paper_param_count adds.
@pytest.mark.parametrize('arch,table_m', [('13', 20.), ('21', 32.), ('w24', 277.)])
def test_param_count_matches_paper_with_head(arch, table_m):
    with torch.device('meta'):
        m = vit_backbones.build_backbone('CvT', arch)
    assert m.paper_table[arch]['params'] == table_m
    n = m.paper_param_count()
    c = m.embed_dims[-1]
    trunk = sum(p.numel() for k, p in m.named_parameters() if not re.match(r'norm\d\.', k))
    assert n == trunk + 2 * c + 1000 * c + 1000
    assert abs(n / 1e6 - table_m) / table_m < 0.02, n


def test_arch_names_and_errors():
    with torch.device('meta'):
        assert vit_backbones.build_backbone('CvT', 'cvt-13').arch_name == '13'
        assert vit_backbones.build_backbone('CvT', 'W24').arch_name == 'w24'
        m = vit_backbones.build_backbone('CvT', dict(base='13', depths=(1, 1, 2)))
        assert m.depths == (1, 1, 2) and m.embed_dims == (64, 192, 384)
        w = vit_backbones.build_backbone('CvT', 'w24')
        assert (w.embed_dims, w.depths, w.num_heads) == ((192, 768, 1024), (2, 2, 20), (3, 12, 16))
    with pytest.raises(ValueError, match='unknown arch'):
        _cvt('cvt-99')
    with pytest.raises(ValueError, match='quick_gelu'):
        _cvt(act='relu')
    with pytest.raises(ValueError, match='three entries'):
        _cvt(dict(TINY, depths=(1, 1, 1, 1)))
    m = _cvt()
    with pytest.raises(ValueError, match='input channels'):
        m(torch.randn(1, 1, 64, 64))
    with pytest.raises(TypeError, match='floating-point'):
        m(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match='at least 32x32'):
        m(torch.randn(1, 3, 31, 64))


# ----------------------------------------------------------------------------- shapes
def test_out_indices_subset_and_derived_level():
    m = randomize(_cvt(out_indices=(3, 1), out_norm=False)).eval()
    assert m.out_channels == [48, 32] and m.out_strides == [32, 8]
    full = _cvt(out_norm=False).eval()
    full.load_state_dict(m.state_dict())
    x = torch.randn(1, 3, 70, 45)
    with torch.no_grad():
        a, b = m(x), full(x)
    assert torch.equal(a[1], b[1])
    # level 3 is the 2x2 / stride-2 ceil max-pool of level 2 (written out here: max over each window)
    l2 = F.pad(b[2], (0, b[2].shape[-1] % 2, 0, b[2].shape[-2] % 2), value=float('-inf'))
    ref = l2.unfold(2, 2, 2).unfold(3, 2, 2).amax(dim=(-1, -2))
    assert torch.equal(a[0], ref) and a[0].shape[-2:] == (3, 2)
    with pytest.raises(ValueError, match='out of range'):
        _cvt(out_indices=(4, ))
    # only the norms of returned (or pooled-from) levels are built
    m = _cvt(out_indices=(0, 3))
    assert hasattr(m, 'norm0') and hasattr(m, 'norm2') and not hasattr(m, 'norm1')


def test_quick_gelu_is_the_default_activation():
    from vit_backbones.layers.mlp import QuickGELU
    m = _cvt()
    assert isinstance(m.stages[0].blocks[0].mlp.act, QuickGELU)
    assert isinstance(_cvt(act='gelu').stages[0].blocks[0].mlp.act, torch.nn.GELU)
    x = torch.linspace(-4, 4, 101)
    assert torch.allclose(QuickGELU()(x), x / (1 + torch.exp(-1.702 * x)), atol=1e-6)
    attn = m.stages[2].blocks[0].attn
    assert attn.scale == pytest.approx(48**-0.5)  # full embedding width, not the head width 16
    assert attn.conv_proj_k.conv.stride == (2, 2) and attn.conv_proj_q.conv.stride == (1, 1)
    assert m.stages[2].cls_token is not None and m.stages[1].cls_token is None


# ----------------------------------------------------------------------------- parity: HF transformers
@pytest.mark.parametrize('hw', [(224, 224), (99, 203)])
def test_parity_hf_cvt(hw):
    """At sizes with H, W mod 4 in (0, 3) HF's floor grid equals our ceil grid: direct comparison."""
    hf = _hf_tiny()
    ours = _cvt(act='gelu', out_norm=False).eval()
    report = ours.load_checkpoint(hf.state_dict())
    assert report.source_format == 'hf' and not report.missing and not report.dropped
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True).hidden_states
        out = ours(x)
    diff = _max_diff(ref, out[:3])
    assert diff < 1e-4, diff
    assert _max_diff([F.max_pool2d(ref[2], 2, 2, ceil_mode=True)], out[3:]) < 1e-4


@pytest.mark.parametrize('hw', [(97, 201), (34, 65)])
def test_ceil_grid_equals_hf_on_padded_input(hw):
    """Where HF's floor((H+1)/4) grid is smaller than ceil(H/4), ours is HF's on the bottom/right
    zero-padded image, and has the ceil sizes."""
    hf = _hf_tiny()
    ours = _cvt(act='gelu', out_norm=False).eval()
    ours.load_checkpoint(hf.state_dict())
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        out = ours(x)
        ref = hf(_ceil_pad(x), output_hidden_states=True).hidden_states
        floor = hf(x).last_hidden_state
    assert [tuple(o.shape[-2:]) for o in out] == [(-(-hw[0] // s), -(-hw[1] // s)) for s in (4, 8, 16, 32)]
    assert floor.shape[-2:] != out[2].shape[-2:] or hw[0] % 4 in (0, 3)
    assert _max_diff(ref, out[:3]) < 1e-4


def test_parity_hf_cvt13_shaped():
    """The real CvT-13 widths and depths (HF's default init, randomised norms and BN statistics)."""
    from transformers import CvtModel
    torch.manual_seed(0)
    hf = CvtModel(_hf_config((64, 192, 384), (1, 2, 10), (1, 3, 6))).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if 'normalization' in n or 'layernorm' in n:
                p.add_(torch.randn_like(p) * 0.1)
        randomize(torch.nn.ModuleList([m for m in hf.modules() if isinstance(m, torch.nn.BatchNorm2d)]), 1, 0.1)
        for m in hf.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.add_(1.)
    ours = vit_backbones.build_backbone('CvT', '13', act='gelu', out_norm=False, out_indices=(0, 1, 2))
    ours.load_checkpoint(hf.state_dict())
    ours.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        diff = _max_diff(hf(x, output_hidden_states=True).hidden_states, ours(x))
    assert diff < 1e-4, diff


def test_hf_classification_checkpoint():
    from transformers import CvtForImageClassification
    cfg = _hf_config()
    cfg.num_labels = 10
    hf = randomize(CvtForImageClassification(cfg)).eval()
    ours = _cvt(act='gelu', out_norm=False).eval()
    report = ours.load_checkpoint(hf.state_dict())
    assert report.source_format == 'hf' and not report.missing
    assert report.dropped['head.weight'] == 'classification head'
    assert report.dropped['norm.weight'].startswith('final classification norm')
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = hf.cvt(x, output_hidden_states=True).hidden_states
        assert _max_diff(ref, ours(x)[:3]) < 1e-4


# ----------------------------------------------------------------------------- official / own layouts
def _official_from_ours(sd, c=48):
    """The microsoft/CvT layout (lib/models/cls_cvt.py: attributes stage0..stage2, each with patch_embed.proj /
    patch_embed.norm, blocks.N.{norm1, attn.conv_proj_q.conv / .bn, attn.proj_q, attn.proj, norm2, mlp.fc1},
    stage2.cls_token; classifier norm and head), built by renaming ours."""
    out = {re.sub(r'^stages\.(\d+)\.', r'stage\1.', k): v for k, v in sd.items() if not re.match(r'norm\d\.', k)}
    out.update({'norm.weight': torch.ones(c), 'norm.bias': torch.zeros(c), 'head.weight': torch.zeros(1000, c),
                'head.bias': torch.zeros(1000)})
    return out


def test_official_layout_loads_and_matches():
    src = randomize(_cvt(out_norm=False)).eval()
    official = _official_from_ours(src.state_dict())
    assert 'stage2.cls_token' in official and 'stage0.blocks.0.attn.conv_proj_q.bn.running_var' in official
    assert 'stage1.patch_embed.proj.weight' in official and 'stage2.blocks.2.attn.proj_v.bias' in official
    # the same names as HF's checkpoint converted to the official layout (an independent route)
    from vit_backbones.models.cvt import _hf_to_official
    hf_names = set(_hf_to_official(_hf_tiny().state_dict()))
    assert hf_names == set(official) - {'norm.weight', 'norm.bias', 'head.weight', 'head.bias'}
    for wrap in ('', 'module.'):
        dst = _cvt(out_norm=False).eval()
        report = dst.load_checkpoint({wrap + k: v for k, v in official.items()})
        assert report.source_format == 'official' and not report.missing
        assert report.dropped['head.weight'] == 'classification head'
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert _max_diff(src(x), dst(x)) == 0
    # with output norms: they are the only parameters a classification checkpoint lacks
    report = _cvt().load_checkpoint(official)
    assert sorted(report.missing) == ['norm0.bias', 'norm0.weight', 'norm1.bias', 'norm1.weight', 'norm2.bias',
                                      'norm2.weight']
    # without the class token, it is dropped with a reason
    report = _cvt(use_cls_token=False).load_checkpoint(official)
    assert 'class token' in report.dropped['stage2.cls_token']


def test_own_and_detector_layouts_roundtrip():
    src = randomize(_cvt()).eval()
    for prefix in ('', 'backbone.'):
        dst = _cvt().eval()
        report = dst.load_checkpoint({prefix + k: v for k, v in src.state_dict().items()})
        assert report.source_format == 'vit_backbones' and not report.missing
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_refuses_other_checkpoints():
    swin = vit_backbones.build_backbone('Swin', dict(base='tiny', embed_dims=16, depths=(1, 1, 1, 1),
                                                     num_heads=(1, 1, 1, 1)))
    with pytest.raises(CheckpointMismatchError, match='not a CvT checkpoint'):
        _cvt().load_checkpoint(swin.state_dict())
    deeper = _official_from_ours(_cvt(dict(TINY, depths=(1, 2, 4))).state_dict())  # another variant
    with pytest.raises(CheckpointMismatchError, match='does not match CvT'):
        _cvt().load_checkpoint(deeper)
    wider = _official_from_ours(_cvt(dict(TINY, embed_dims=(16, 32, 64), num_heads=(1, 2, 4))).state_dict(), 64)
    with pytest.raises(CheckpointMismatchError):
        _cvt().load_checkpoint(wider)


# ----------------------------------------------------------------------------- training behaviour
def test_frozen_stages():
    m = _cvt(frozen_stages=2).train()
    frozen = [k for k, p in m.named_parameters() if not p.requires_grad]
    assert all(k.startswith(('stages.0.', 'stages.1.', 'norm0.', 'norm1.')) for k in frozen)
    assert {k for k, _ in m.named_parameters() if k.startswith(('stages.0.', 'stages.1.', 'norm0.', 'norm1.'))} \
        == set(frozen)
    assert not m.stages[1].blocks[0].attn.conv_proj_k.bn.training and not m.stages[0].patch_embed.training
    assert m.stages[2].training and m.stages[2].cls_token.requires_grad
    m = _cvt(frozen_stages=3)
    assert not any(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match='frozen_stages'):
        _cvt(frozen_stages=4)


def test_drop_path_schedule_is_per_stage():
    m = _cvt(drop_path_rate=0.3)
    rates = [[b.drop_path.drop_prob for b in s.blocks] for s in m.stages]
    assert rates == [[0.], [0., 0.], pytest.approx([0., 0.15, 0.3])]
    m = _cvt(drop_path_rate=(0.1, 0.2, 0.4))
    rates = [[b.drop_path.drop_prob for b in s.blocks] for s in m.stages]
    assert rates == [[0.], [0., 0.2], pytest.approx([0, .2, .4])]


# ----------------------------------------------------------------------------- configs
CVT_CONFIGS = ['mask_rcnn_cvt_13_fpn_1x_coco.py', 'upernet_cvt_13_ade20k.py']


@pytest.mark.parametrize('name', CVT_CONFIGS)
def test_config_builds_model(name):
    cfg = _tc()._load(name)
    assert cfg.custom_imports == dict(imports=['vit_backbones'], allow_failed_imports=False)
    bb_cfg = cfg.model.backbone
    assert (bb_cfg.type, bb_cfg.arch, bb_cfg.drop_path_rate) == ('CvT', '13', 0.1)
    assert bb_cfg.init_cfg == dict(type='Pretrained', checkpoint='checkpoints/CvT-13-224x224-IN-1k.pth')
    keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
    assert set(keys) == {'cls_token', 'norm', '.bn.'} and all(v['decay_mult'] == 0 for v in keys.values())
    model = _tc()._build_model(cfg)
    bb = model.backbone
    assert isinstance(bb, vit_backbones.get_backbone_class('CvT'))
    # CvT-13 without its classifier (19.61M) + the three output LayerNorms
    assert sum(p.numel() for p in bb.parameters()) == pytest.approx(19.61e6 + 2 * (64 + 192 + 384), rel=0.005)
    assert bb.paper_param_count() == pytest.approx(20e6, rel=0.02)
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.rand(1, 3, 96, 128))
    if cfg.default_scope == 'mmdet':
        assert cfg.model.neck.in_channels == bb.out_channels == [64, 192, 384, 384]
        assert [tuple(f.shape) for f in feats] == [(1, 256, 24, 32), (1, 256, 12, 16), (1, 256, 6, 8),
                                                    (1, 256, 3, 4), (1, 256, 2, 2)]
        assert cfg.model.type == 'MaskRCNN' and cfg.train_cfg.max_epochs == 12
    else:
        assert cfg.model.decode_head.in_channels == bb.out_channels == [64, 192, 384, 384]
        assert cfg.model.auxiliary_head.in_channels == 384 and cfg.model.auxiliary_head.in_index == 2
        assert [tuple(f.shape) for f in feats] == [(1, 64, 24, 32), (1, 192, 12, 16), (1, 384, 6, 8),
                                                    (1, 384, 3, 4)]
        assert cfg.train_cfg.max_iters == 160000 and cfg.optim_wrapper.optimizer.lr == 6e-5


def _cvt_on_demo(demo_name, name):
    """The synthetic-data demo config with ``name``'s backbone shrunk to TINY (random init) and the
    neck / heads re-wired to its channels."""
    demo, full = _tc()._load(demo_name), _tc()._load(name)
    bb = full.model.backbone.copy()
    bb.update(arch=TINY, init_cfg=None)
    chans = vit_backbones.build_backbone('CvT', TINY).out_channels
    demo.model.backbone = bb
    if demo.default_scope == 'mmdet':
        demo.model.neck = full.model.neck.copy()
        demo.model.neck.in_channels = chans
    else:
        demo.model.decode_head.in_channels = chans
        demo.model.auxiliary_head.in_channels = chans[full.model.auxiliary_head.in_index]
        demo.model.auxiliary_head.in_index = full.model.auxiliary_head.in_index
    return demo


def test_mask_rcnn_cvt_trains_and_predicts(tmp_path):
    from mmengine.dataset import pseudo_collate
    _set_size, _tiny_run = _tc()._set_size, _tc()._tiny_run
    from vit_backbones.data import make_coco_instances
    root = str(tmp_path / 'coco') + os.sep
    paths = make_coco_instances(root, num_train=2, num_val=1, image_size=(96, 96), seed=0)
    cfg = _cvt_on_demo('demo/mask_rcnn_swin_t_synthetic.py', 'mask_rcnn_cvt_13_fpn_1x_coco.py')
    _set_size(cfg, (96, 96))
    runner, changed = _tiny_run(cfg, tmp_path / 'work', root, paths['val_ann'])
    assert any(k.startswith('backbone.stages.2.') for k in changed) and 'backbone.stages.2.cls_token' in changed
    assert any(k.startswith('roi_head.mask_head') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    pred = sample.pred_instances
    assert pred.bboxes.shape[1] == 4 and tuple(pred.masks.shape[1:]) == (96, 96)


def test_upernet_cvt_trains_and_predicts(tmp_path):
    from mmengine.dataset import pseudo_collate
    _set_size, _tiny_run = _tc()._set_size, _tc()._tiny_run
    from vit_backbones.data import make_ade_like
    root = str(tmp_path / 'ade') + os.sep
    make_ade_like(root, num_train=2, num_val=1, image_size=(96, 96), seed=0)
    cfg = _cvt_on_demo('demo/upernet_swin_t_synthetic.py', 'upernet_cvt_13_ade20k.py')
    cfg.model.data_preprocessor.size = (96, 96)
    _set_size(cfg, (96, 96))
    runner, changed = _tiny_run(cfg, tmp_path / 'work', root)
    assert any(k.startswith('backbone.stages.0.') for k in changed)
    assert any(k.startswith('decode_head.') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    seg = sample.pred_sem_seg.data
    assert tuple(seg.shape) == (1, 96, 96) and int(seg.min()) >= 0 and int(seg.max()) < 4

