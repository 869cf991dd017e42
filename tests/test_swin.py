"""Swin Transformer: parity with HF transformers and mmdet, the paper's sizes, and the backbone contract."""
import os
import pickle

import pytest
import torch

import vit_backbones
from vit_backbones.checkpoint import CheckpointMismatchError

SMALL = dict(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def _randomize(module, seed=0):
    """Random values everywhere (LN weights, biases and bias tables too), so no mapping hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def _hf_config(**kw):
    from transformers import SwinConfig
    return SwinConfig(image_size=224, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=7, **kw)


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- paper numbers
@pytest.mark.parametrize('arch,paper_m', [('tiny', 28.3), ('small', 50), ('base', 88), ('large', 197)])
def test_param_count_matches_paper_with_head(arch, paper_m):
    """Paper/official README table counts the classifier: ours minus norm0..2 plus final-norm->head."""
    with torch.device('meta'):
        m = vit_backbones.build_backbone('Swin', arch)
    n = sum(p.numel() for p in m.parameters())
    n -= sum(p.numel() for i in range(3) for p in getattr(m, f'norm{i}').parameters())
    c = m.feature_info[-1]['num_chs']
    n += c * 1000 + 1000  # ImageNet-1k head (norm3 plays the final norm)
    assert abs(n / 1e6 - paper_m) / paper_m < 0.01, n


# ----------------------------------------------------------------------------- shapes
# ----------------------------------------------------------------------------- parity: HF transformers
@pytest.mark.parametrize('hw', [(224, 224), (97, 203)])
def test_parity_hf_swin_backbone(hw):
    from transformers import SwinBackbone
    hf = _randomize(SwinBackbone(_hf_config(out_features=['stage1', 'stage2', 'stage3', 'stage4']))).eval()
    ours = vit_backbones.build_backbone('Swin', SMALL, drop_path_rate=0.).eval()
    report = ours.load_checkpoint(hf.state_dict())
    assert report.source_format == 'hf' and not report.missing
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        diff = _max_diff(hf(x).feature_maps, ours(x))
    assert diff < 1e-4, diff


@pytest.mark.parametrize('hw', [(224, 224), (229, 300)])
def test_parity_hf_swin_model_every_stage(hw):
    """SwinModel (the classifier trunk) clamps the window on maps no larger than it: clamp_window=True."""
    from transformers import SwinModel
    hf = _randomize(SwinModel(_hf_config(), add_pooling_layer=False)).eval()
    ours = vit_backbones.build_backbone('Swin', SMALL, drop_path_rate=0., clamp_window=True).eval()
    sd = hf.state_dict()
    report = ours.load_checkpoint(sd)
    assert 'layernorm.weight' in report.dropped
    with torch.no_grad():  # the classifier's final norm is our last level's norm
        ours.norm3.weight.copy_(sd['layernorm.weight'])
        ours.norm3.bias.copy_(sd['layernorm.bias'])
    merged = []
    hooks = [s.downsample.register_forward_hook(lambda m, i, o: merged.append(o)) for s in ours.stages[:3]]
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        out = ours(x)
    for h in hooks:
        h.remove()
    # after each patch merging (HF reshaped_hidden_states 1..3 are post-merging maps)
    for i in range(3):
        tokens, (h, w) = merged[i]  # (B, h*w, C) raster tokens after merging
        as_map = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        assert _max_diff([ref.reshaped_hidden_states[i + 1]], [as_map]) < 1e-4
    b, c, h, w = out[3].shape
    last = ref.last_hidden_state.transpose(1, 2).reshape(b, c, h, w)
    assert _max_diff([last], [out[3]]) < 1e-4


def test_hf_classification_checkpoint_drops_head():
    from transformers import SwinForImageClassification
    hf = SwinForImageClassification(_hf_config(num_labels=10))
    ours = vit_backbones.build_backbone('Swin', SMALL)
    report = ours.load_checkpoint(hf.state_dict())
    assert report.dropped['classifier.weight'] == 'classification head'
    assert set(report.missing) == {f'norm{i}.{p}' for i in range(4) for p in ('weight', 'bias')}


# ----------------------------------------------------------------------------- parity: mmdet
def _mmdet_swin(window=7):
    from mmdet.models.backbones import SwinTransformer
    m = SwinTransformer(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=window,
                        drop_path_rate=0., out_indices=(0, 1, 2, 3))
    m.eval()  # mmdet's train() override returns None, so eval() cannot be chained
    return m


@pytest.mark.parametrize('hw', [(224, 224), (112, 137), (40, 57)])
def test_parity_mmdet_swin(hw):
    mm = _randomize(_mmdet_swin())
    ours = vit_backbones.build_backbone('Swin', SMALL, drop_path_rate=0.).eval()
    sd = {'backbone.' + k: v for k, v in mm.state_dict().items()}  # as in a detector checkpoint
    sd['neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
    report = ours.load_checkpoint({'state_dict': sd, 'meta': {}})
    assert report.source_format == 'mmdet' and not report.missing
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        diff = _max_diff(mm(x), ours(x))
    assert diff < 1e-4, diff


def test_official_layout_matches_mmdet_converter():
    """An official-layout state dict, converted by mmdet's own swin_converter, gives the same outputs
    in mmdet's SwinTransformer as our loader gives in ours (two independent conversions)."""
    from mmdet.models.backbones.swin import swin_converter
    ours_src = _randomize(vit_backbones.build_backbone('Swin', SMALL, drop_path_rate=0.), seed=3)
    official = {}
    for k, v in ours_src.state_dict().items():  # rename to the official names
        k = k.replace('stages.', 'layers.').replace('attn.rel_pos.', 'attn.')
        official[k] = v
    official['head.weight'] = torch.zeros(10, 256)
    mm = _mmdet_swin()
    mm.load_state_dict({k[len('backbone.'):]: v for k, v in swin_converter(official).items() if k.startswith('backbone.')},
                       strict=False)
    ours = vit_backbones.build_backbone('Swin', SMALL, drop_path_rate=0.).eval()
    report = ours.load_checkpoint({'model': official})
    assert report.source_format == 'official'
    x = torch.randn(1, 3, 96, 131)
    with torch.no_grad():
        assert _max_diff(mm(x), ours(x)) < 1e-4


def test_timm_layout_moves_patch_merging():
    src = _randomize(vit_backbones.build_backbone('Swin', SMALL, drop_path_rate=0.), seed=4).eval()
    timm_sd = {}
    for k, v in src.state_dict().items():
        k = k.replace('attn.rel_pos.', 'attn.')
        if '.downsample.' in k:  # timm: merging at the start of the next stage
            i = int(k.split('.')[1])
            k = k.replace(f'stages.{i}.downsample', f'layers.{i + 1}.downsample')
        timm_sd[k.replace('stages.', 'layers.')] = v
    ours = vit_backbones.build_backbone('Swin', SMALL, drop_path_rate=0.).eval()
    assert ours.load_checkpoint(timm_sd).source_format == 'timm'
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(src(x), ours(x)) == 0


def test_window_change_resizes_bias_tables_bicubic():
    import torch.nn.functional as F
    src = _randomize(vit_backbones.build_backbone('Swin', SMALL), seed=5)
    dst = vit_backbones.build_backbone('Swin', SMALL, window_size=12)
    report = dst.load_checkpoint(src.state_dict())
    key = 'stages.1.blocks.0.attn.rel_pos.relative_position_bias_table'
    assert report.resized[key] == ((13 * 13, 2), (23 * 23, 2))
    assert len(report.resized) == 8
    t = src.state_dict()[key]
    ref = F.interpolate(t.t().reshape(1, 2, 13, 13), size=(23, 23), mode='bicubic', align_corners=False)
    assert torch.allclose(dst.state_dict()[key], ref.reshape(2, -1).t(), atol=1e-6)
    assert all(torch.isfinite(o).all() for o in dst.eval()(torch.randn(1, 3, 100, 90)))


# ----------------------------------------------------------------------------- training behaviour
def test_frozen_stages():
    m = vit_backbones.build_backbone('Swin', SMALL, frozen_stages=2)
    m.train()
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(('patch_embed.', 'stages.0.', 'stages.1.', 'norm0.', 'norm1.')) for n in frozen)
    assert all(not p.requires_grad for p in m.stages[1].parameters())
    assert all(p.requires_grad for p in m.stages[2].parameters()) and m.norm2.weight.requires_grad
    assert not m.patch_embed.training and not m.stages[1].training and m.stages[2].training
    sum(o.mean() for o in m(torch.randn(1, 3, 64, 64))).backward()
    assert m.stages[0].blocks[0].attn.qkv.weight.grad is None
    assert m.stages[2].blocks[0].attn.qkv.weight.grad is not None
    all_frozen = vit_backbones.build_backbone('Swin', SMALL, frozen_stages=4)
    assert not any(p.requires_grad for p in all_frozen.parameters())


def test_drop_path_schedule_linear_over_blocks():
    m = vit_backbones.build_backbone('Swin', 'tiny', drop_path_rate=0.2)
    rates = [blk.drop_path.drop_prob for s in m.stages for blk in s.blocks]
    assert len(rates) == 12 and rates[0] == 0 and rates[-1] == pytest.approx(0.2)
    assert rates == pytest.approx([0.2 * i / 11 for i in range(12)])


# ----------------------------------------------------------------------------- bad input
def test_checkpoint_of_another_model_or_variant_is_refused(tmp_path):
    from transformers import ViTConfig, ViTModel
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    m = vit_backbones.build_backbone('Swin', SMALL)
    with pytest.raises(CheckpointMismatchError, match='not a Swin checkpoint'):
        m.load_checkpoint(vit.state_dict())
    with torch.device('meta'):
        tiny_sd = vit_backbones.build_backbone('Swin', 'tiny').state_dict()
        small = vit_backbones.build_backbone('Swin', 'small')
    with pytest.raises(CheckpointMismatchError, match='another variant'):
        small.load_checkpoint(tiny_sd)


class _Evil:
    def __reduce__(self):
        return (os.system, ('echo pwned > /dev/null', ))


def test_loading_never_runs_code(tmp_path):
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': {'x': _Evil()}}, f)
    with pytest.raises(pickle.UnpicklingError, match='never does') as err:
        vit_backbones.build_backbone('Swin', SMALL, checkpoint=str(path))
    assert 'posix.system' in str(err.value) and 'weights_only=False' not in str(err.value)

