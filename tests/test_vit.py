"""ViT and DeiT: parity with HF transformers and mmseg, the papers' sizes, the pyramid, ViTDet windows and
the backbone contract."""
import math

import pytest
import torch
import torch.nn.functional as F

import vit_backbones
from helpers import randomize
from vit_backbones.checkpoint import CheckpointMismatchError
from vit_backbones.layers import resample_abs_pos_embed

SMALL = dict(base='tiny', embed_dims=32, depth=4, num_heads=2)
SMALL_D = dict(base='tiny-distilled', embed_dims=32, depth=4, num_heads=2)


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _hf_kwargs(**kw):
    return dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, image_size=224,
                patch_size=16, layer_norm_eps=1e-6, qkv_bias=True, **kw)


# ----------------------------------------------------------------------------- paper numbers
@pytest.mark.parametrize('name,arch,paper_m', [
    ('ViT', 'tiny', 5.72), ('ViT', 'small', 22.05), ('ViT', 'base', 86.57), ('ViT', 'large', 304.33),
    ('DeiT', 'tiny', 5.7), ('DeiT', 'small', 22.0), ('DeiT', 'base', 86.0),
    ('DeiT', 'tiny-distilled', 5.9), ('DeiT', 'small-distilled', 22.4), ('DeiT', 'base-distilled', 87.0)])
def test_param_count_matches_table_with_head(name, arch, paper_m):
    """The tables (timm for ViT, the DeiT README) count the classifier(s): backbone without the pyramid
    neck, plus a 1000-way head (and the distillation head for distilled models)."""
    with torch.device('meta'):
        m = vit_backbones.build_backbone(name, arch)
    n = sum(p.numel() for k, p in m.named_parameters() if not k.startswith('pyramid.'))
    n += (m.embed_dims * 1000 + 1000) * m.num_prefix_tokens  # head (+ head_dist)
    assert abs(n / 1e6 - paper_m) / paper_m < 0.02, n


def test_arch_aliases_and_feature_info():
    with torch.device('meta'):
        assert vit_backbones.build_backbone('ViT', 'b').arch_name == 'base'
        assert vit_backbones.build_backbone('DeiT', 's-d').prefix_token_names == ('cls_token', 'dist_token')
        m = vit_backbones.build_backbone('ViT', 'base', pyramid='simple')
    assert m.out_channels == [192, 384, 768, 768] and m.out_strides == [4, 8, 16, 32]
    assert m.block_indices == (11, )
    with torch.device('meta'):
        m = vit_backbones.build_backbone('ViT', 'large')
    assert m.block_indices == (5, 11, 17, 23) and m.out_channels == [1024] * 4


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize('hw', [(224, 224), (511, 511), (112, 137), (32, 47)])
@pytest.mark.parametrize('kw', [dict(pyramid='simple', final_norm=False),
                                dict(pyramid='simple', window_size=4, global_attn_indexes=(1, 3), rel_pos=True)],
                         ids=['simple', 'windows'])
def test_output_shapes_any_size(hw, kw):
    m = vit_backbones.build_backbone('ViT', SMALL, **kw).eval()
    with torch.no_grad():
        outs = m(torch.randn(1, 3, *hw))
    assert len(outs) == 4
    for o, c, s in zip(outs, m.out_channels, (4, 8, 16, 32)):
        assert o.shape == (1, c, -(-hw[0] // s), -(-hw[1] // s))
        assert torch.isfinite(o).all()


def test_base_shapes_at_224():
    m = vit_backbones.build_backbone('DeiT', 'small-distilled').eval()
    with torch.no_grad():
        outs = m(torch.randn(1, 3, 224, 224))
    assert [tuple(o.shape) for o in outs] == [(1, 384, 56, 56), (1, 384, 28, 28), (1, 384, 14, 14), (1, 384, 7, 7)]


def test_out_indices_subset_and_cls_token():
    m = vit_backbones.build_backbone('DeiT', SMALL_D, out_indices=(1, -1), output_cls_token=True).eval()
    assert isinstance(m.pyramid.branches[0], torch.nn.Identity)  # level 0 not built
    outs = m(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 8, 12), (2, 32, 2, 3), (2, 2, 32)]
    with pytest.raises(ValueError, match='out of range'):
        vit_backbones.build_backbone('ViT', SMALL, out_indices=(4, ))
    with pytest.raises(ValueError, match='output_cls_token'):
        vit_backbones.build_backbone('ViT', SMALL, window_size=4, output_cls_token=True)


def test_pyramid_levels_are_the_recipes():
    """deconv: level i comes from block_indices[i]; x1 is the block map itself, x0.5 its max-pool."""
    m = vit_backbones.build_backbone('ViT', SMALL, block_indices=(0, 1, 2, 3)).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        outs = m(x)
        feats, hw = m.forward_features(x, taps=(2, 3))
    as_map = lambda t: t[:, 1:].transpose(1, 2).reshape(1, 32, *hw)  # noqa: E731
    assert torch.equal(outs[2], as_map(feats[0]))
    assert torch.equal(outs[3], F.max_pool2d(as_map(feats[1]), 2, ceil_mode=True))


# ----------------------------------------------------------------------------- parity: HF transformers
def _hf_hidden(hf, x, interpolate):
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True, interpolate_pos_encoding=interpolate)
    return list(ref.hidden_states[1:-1]) + [ref.last_hidden_state]


@pytest.mark.parametrize('hw', [(224, 224), (288, 320)])
def test_parity_hf_vit_model(hw):
    """Every block output (the last after the final norm) vs ViTModel's hidden states. At 288x320 both
    resample the 14x14 position grid to 18x20 (bicubic, align_corners=False, no antialias)."""
    from transformers import ViTConfig, ViTModel
    hf = randomize(ViTModel(ViTConfig(**_hf_kwargs()), add_pooling_layer=False)).eval()
    ours = vit_backbones.build_backbone('ViT', SMALL, drop_path_rate=0.).eval()
    report = ours.load_checkpoint(hf.state_dict())
    assert report.source_format == 'hf' and not [k for k in report.missing if not k.startswith('pyramid.')]
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        feats, _ = ours.forward_features(x, taps=range(4))
    diff = _max_diff(_hf_hidden(hf, x, hw != (224, 224)), feats)
    assert diff < 1e-4, diff


def test_hf_floors_partial_patches_we_pad():
    """The one convention that differs: HF drops the partial patches of a size that is no multiple of 16
    (its conv has no padding, its grid is floor(H/16)); we zero-pad (grid ceil(H/16)). Ours on x equals
    HF on x zero-padded to a multiple of 16, exactly as computed above."""
    from transformers import ViTConfig, ViTModel
    hf = randomize(ViTModel(ViTConfig(**_hf_kwargs()), add_pooling_layer=False), seed=1).eval()
    ours = vit_backbones.build_backbone('ViT', SMALL, drop_path_rate=0.).eval()
    ours.load_checkpoint(hf.state_dict())
    x = torch.randn(1, 3, 112, 137)
    with torch.no_grad():
        feats, hw = ours.forward_features(x, taps=range(4))
        floor = hf(x, interpolate_pos_encoding=True).last_hidden_state
    assert hw == (7, 9) and floor.shape[1] == 1 + 7 * 8
    diff = _max_diff(_hf_hidden(hf, F.pad(x, (0, 7)), True), feats)
    assert diff < 1e-4, diff


@pytest.mark.parametrize('hw', [(224, 224), (256, 192)])
def test_parity_hf_deit_model_distilled(hw):
    from transformers import DeiTConfig, DeiTModel
    hf = randomize(DeiTModel(DeiTConfig(**_hf_kwargs()), add_pooling_layer=False), seed=2).eval()
    ours = vit_backbones.build_backbone('DeiT', SMALL_D, drop_path_rate=0.).eval()
    report = ours.load_checkpoint(hf.state_dict())
    assert report.source_format == 'hf' and 'dist_token' in report.loaded
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        feats, _ = ours.forward_features(x, taps=range(4))
    diff = _max_diff(_hf_hidden(hf, x, hw != (224, 224)), feats)
    assert diff < 1e-4, diff


def test_hf_task_models_hub_names_and_heads():
    """Hub checkpoints (pre-transformers-5 names: encoder.layer.N.attention.attention.query ...) inside
    task models (vit. / deit. prefixes) load; classifiers are dropped with a reason."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, ViTConfig, ViTModel
    hf = randomize(ViTModel(ViTConfig(**_hf_kwargs()), add_pooling_layer=True), seed=3).eval()
    hub = {}
    for k, v in hf.state_dict().items():  # the names the hub files use
        k = k.replace('layers.', 'encoder.layer.').replace('attention.q_proj', 'attention.attention.query')
        k = k.replace('attention.k_proj', 'attention.attention.key').replace('attention.v_proj', 'attention.attention.value')
        k = k.replace('attention.o_proj', 'attention.output.dense').replace('mlp.fc1', 'intermediate.dense')
        k = k.replace('mlp.fc2', 'output.dense')
        hub['vit.' + k] = v
    hub['classifier.weight'] = torch.zeros(10, 32)
    ours = vit_backbones.build_backbone('ViT', SMALL, drop_path_rate=0.).eval()
    report = ours.load_checkpoint(hub)
    assert report.dropped['classifier.weight'] == 'classification head'
    assert report.dropped['pooler.dense.weight'] == 'classification head'
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert _max_diff([hf(x).last_hidden_state], ours.forward_features(x)[0][-1:]) < 1e-4
    teacher = DeiTForImageClassificationWithTeacher(DeiTConfig(**_hf_kwargs(num_labels=5)))
    report = vit_backbones.build_backbone('DeiT', SMALL_D).load_checkpoint(teacher.state_dict())
    assert report.dropped['distillation_classifier.weight'] == 'classification head'


# ----------------------------------------------------------------------------- parity: mmseg
def _mmseg_vit(**kw):
    from mmseg.models.backbones import VisionTransformer
    m = VisionTransformer(img_size=224, patch_size=16, embed_dims=32, num_layers=4, num_heads=2, mlp_ratio=4,
                          out_indices=(0, 1, 2, 3), qkv_bias=True, drop_path_rate=0., norm_cfg=dict(type='LN', eps=1e-6),
                          final_norm=True, interpolate_mode='bicubic', output_cls_token=True, **kw)
    randomize(m, seed=4)
    m.eval()  # mmseg's train() override returns None, so eval() cannot be chained
    return m


@pytest.mark.parametrize('hw,patch_bias', [((224, 224), True), ((112, 137), True), ((320, 256), False)])
def test_parity_mmseg_vision_transformer(hw, patch_bias):
    """mmseg's defaults (patch_bias=False) and the timm-faithful patch_bias=True both load."""
    mm = _mmseg_vit(patch_bias=patch_bias)
    sd = {'backbone.' + k: v for k, v in mm.state_dict().items()}  # as in a segmentor checkpoint
    sd['decode_head.conv_seg.weight'] = torch.zeros(1)
    ours = vit_backbones.build_backbone('ViT', SMALL, drop_path_rate=0.).eval()
    report = ours.load_checkpoint({'state_dict': sd, 'meta': {}})
    assert report.source_format == 'mmseg' and 'norm.weight' in report.loaded
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ref = mm(x)
        feats, grid = ours.forward_features(x, taps=range(4))
    ours_maps = [f[:, 1:].transpose(1, 2).reshape(2, 32, *grid) for f in feats]
    diff = max(_max_diff([r[0] for r in ref], ours_maps), _max_diff([r[1] for r in ref], [f[:, 0] for f in feats]))
    assert diff < 1e-4, diff


def test_timm_layout_roundtrip_and_distilled_mismatch():
    src = randomize(vit_backbones.build_backbone('DeiT', SMALL_D), seed=5).eval()
    timm_sd = {k: v for k, v in src.state_dict().items() if not k.startswith('pyramid.')}
    timm_sd['head.weight'], timm_sd['head_dist.weight'] = torch.zeros(10, 32), torch.zeros(10, 32)
    ours = vit_backbones.build_backbone('DeiT', SMALL_D).eval()
    ours.load_state_dict({k: v for k, v in src.state_dict().items() if k.startswith('pyramid.')}, strict=False)
    report = ours.load_checkpoint({'model': timm_sd})
    assert report.source_format == 'timm' and report.dropped['head_dist.weight'] == 'classification head'
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(src(x), ours(x)) == 0
    with pytest.raises(CheckpointMismatchError, match='distilled'):
        vit_backbones.build_backbone('DeiT', SMALL).load_checkpoint(timm_sd)
    with pytest.raises(CheckpointMismatchError, match='not a ViT checkpoint'):
        vit_backbones.build_backbone('ViT', SMALL).load_checkpoint(
            vit_backbones.build_backbone('Swin', dict(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))).state_dict())


def test_pos_embed_resized_on_load():
    """A 384-trained checkpoint (24x24 grid) into a 224 model (14x14): bicubic, prefix slots kept."""
    src = randomize(vit_backbones.build_backbone('DeiT', SMALL_D, img_size=384), seed=6)
    dst = vit_backbones.build_backbone('DeiT', SMALL_D)
    report = dst.load_checkpoint(src.state_dict())
    assert report.resized['pos_embed'] == ((1, 2 + 576, 32), (1, 2 + 196, 32))
    pe = src.pos_embed.detach()
    grid = F.interpolate(pe[:, 2:].reshape(1, 24, 24, 32).permute(0, 3, 1, 2), size=(14, 14), mode='bicubic',
                         align_corners=False).permute(0, 2, 3, 1).reshape(1, 196, 32)
    assert torch.allclose(dst.pos_embed, torch.cat([pe[:, :2], grid], 1), atol=1e-6)


def _cubic_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) bicubic resampling matrix from the definition: Keys' cubic convolution kernel with
    a = -0.75, half-pixel centres (align_corners=False: src = (dst + 0.5) * n_in / n_out - 0.5), the
    four taps around floor(src) clamped to the border. No antialias."""
    a = -0.75

    def k(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.

    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for j in range(base - 1, base + 3):
            w[o, min(max(j, 0), n_in - 1)] += k(src - j)
    return w


@pytest.mark.parametrize('new_hw', [(18, 20), (7, 9), (14, 14), (30, 11)])
def test_pos_embed_resampling_matches_the_definition(new_hw):
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, 1 + 14 * 14, 8, generator=g)
    out = resample_abs_pos_embed(pe, new_hw, (14, 14), num_prefix_tokens=1)
    grid = pe[0, 1:].double().reshape(14, 14, 8)
    wh, ww = _cubic_weights(14, new_hw[0]), _cubic_weights(14, new_hw[1])
    ref = torch.einsum('ai,bj,ijc->abc', wh, ww, grid).reshape(1, -1, 8)
    assert torch.equal(out[:, :1], pe[:, :1])
    assert float((out[:, 1:].double() - ref).abs().max()) < 1e-5


def _antialias_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of the antialiased bicubic that timm's resample_abs_pos_embed asks for
    (F.interpolate(..., antialias=True)), from its definition: PIL's cubic kernel (a = -0.5), support
    widened by the scale when shrinking, and the taps inside the image renormalised to sum to 1 (no
    border clamping)."""
    a = -0.5

    def k(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.

    scale = n_in / n_out
    stretch = max(scale, 1.)
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        centre = (o + 0.5) * scale
        lo, hi = max(int(centre - 2 * stretch + 0.5), 0), min(int(centre + 2 * stretch + 0.5), n_in)
        taps = [k((j - centre + 0.5) / stretch) for j in range(lo, hi)]
        for j, v in zip(range(lo, hi), taps):
            w[o, j] = v / sum(taps)
    return w


@pytest.mark.parametrize('new_hw', [(18, 20), (7, 9)])
def test_timm_antialias_resampling_is_another_kernel(new_hw):
    """timm (antialias=True) and we (HF, mmseg, detectron2, ViT-Adapter: antialias=False) resample with
    different kernels, growing or shrinking: a = -0.5 renormalised vs a = -0.75 clamped. Each matches
    its own definition; they agree only when the grid is unchanged."""
    g = torch.Generator().manual_seed(1)
    pe = torch.randn(1, 1 + 14 * 14, 8, generator=g)
    grid = pe[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    timm_like = F.interpolate(grid, size=new_hw, mode='bicubic', align_corners=False, antialias=True)
    ref = torch.einsum('ai,bj,cij->cab', _antialias_weights(14, new_hw[0]), _antialias_weights(14, new_hw[1]),
                       grid[0].double())
    assert float((timm_like[0].double() - ref).abs().max()) < 1e-5
    ours = resample_abs_pos_embed(pe, new_hw, (14, 14), 1)[:, 1:].reshape(1, *new_hw, 8).permute(0, 3, 1, 2)
    assert float((ours - timm_like).abs().max()) > 0.1
    same = F.interpolate(grid, size=(14, 14), mode='bicubic', align_corners=False, antialias=True)
    assert torch.equal(same, grid) and torch.equal(resample_abs_pos_embed(pe, (14, 14), (14, 14), 1), pe)


# ----------------------------------------------------------------------------- ViTDet windows
def test_window_block_matches_a_direct_reference():
    """Windowed block = pad the normed map to a multiple of the window, attend per window (with the
    relative-position bias), crop; written here with reshapes, not the shared gather plan."""
    from vit_backbones.layers import ViTBlock
    blk = randomize(ViTBlock(32, 2, window_size=4, rel_pos=True), seed=7).eval()
    h, w = 6, 9
    x = torch.randn(2, h * w, 32)
    with torch.no_grad():
        out = blk(x, (h, w))
        y = blk.norm1(x).reshape(2, h, w, 32)
        y = F.pad(y, (0, 0, 0, 3, 0, 2))  # to 8 x 12
        win = y.reshape(2, 2, 4, 3, 4, 32).permute(0, 1, 3, 2, 4, 5).reshape(-1, 16, 32)
        qkv = blk.attn.qkv(win).reshape(-1, 16, 3, 2, 16).permute(2, 0, 3, 1, 4)
        scores = qkv[0] @ qkv[1].transpose(-1, -2) * 16**-0.5 + blk.attn.rel_pos((4, 4))[None]
        a = (scores.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(-1, 16, 32)
        a = blk.attn.proj(a).reshape(2, 2, 3, 4, 4, 32).permute(0, 1, 3, 2, 4, 5).reshape(2, 8, 12, 32)
        ref = x + a[:, :h, :w].reshape(2, h * w, 32)
        ref = ref + blk.mlp(blk.norm2(ref))
    assert float((out - ref).abs().max()) < 1e-5


def test_window_layout_and_checkpoint():
    with torch.device('meta'):
        m = vit_backbones.build_backbone('ViT', 'base', window_size=14, global_attn_indexes=(2, 5, 8, 11),
                                         rel_pos=True, pyramid='simple')
    assert [b.window_size for b in m.blocks] == [14, 14, 0, 14, 14, 0, 14, 14, 0, 14, 14, 0]
    assert not hasattr(m.blocks[2].attn, 'rel_pos') and m.blocks[0].attn.rel_pos.window == (14, 14)
    # a plain classification checkpoint loads; the bias tables keep their init and are reported missing
    src = randomize(vit_backbones.build_backbone('ViT', SMALL), seed=8)
    win = vit_backbones.build_backbone('ViT', SMALL, window_size=4, global_attn_indexes=(-1, ), rel_pos=True)
    report = win.load_checkpoint(src.state_dict())
    assert sorted(k for k in report.missing if not k.startswith('pyramid.')) == [
        f'blocks.{i}.attn.rel_pos.relative_position_bias_table' for i in range(3)]
    assert torch.equal(win.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)
    assert report.dropped['cls_token'].startswith('prefix token') and torch.equal(win.pos_embed, src.pos_embed)


def test_window_covering_the_grid_equals_global_attention_without_prefix():
    """With one window exactly covering the grid and no rel-pos, windowed = global attention on the
    grid tokens (the class token dropped after the position embedding)."""
    from vit_backbones.layers import ViTBlock
    blk = randomize(ViTBlock(32, 2, window_size=7), seed=9).eval()
    x = torch.randn(1, 49, 32)
    with torch.no_grad():
        a = blk(x, (7, 7))
        blk.window_size = 0
        b = blk(x, (7, 7))
    assert float((a - b).abs().max()) < 1e-5


# ----------------------------------------------------------------------------- training behaviour
@pytest.mark.parametrize('kw', [dict(pyramid='simple', window_size=4, global_attn_indexes=(1, ), rel_pos=True)],
                         ids=['windows'])
def test_every_parameter_gets_a_gradient(kw):
    m = vit_backbones.build_backbone('DeiT', SMALL_D, drop_path_rate=0., **kw).train()  # no branch dropped
    sum(o.mean() for o in m(torch.randn(2, 3, 64, 80))).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert hasattr(m, 'dist_token') != bool(kw)  # windowed models have no prefix-token parameters


def test_frozen_stages():
    m = vit_backbones.build_backbone('DeiT', SMALL_D, frozen_stages=2)
    m.train()
    frozen = sorted(n for n, p in m.named_parameters() if not p.requires_grad)
    assert {'cls_token', 'dist_token', 'pos_embed', 'patch_embed.proj.weight'} <= set(frozen)
    assert all(n.startswith(('cls_token', 'dist_token', 'pos_embed', 'patch_embed.', 'blocks.0.', 'blocks.1.'))
               for n in frozen)
    assert all(p.requires_grad for p in m.blocks[2].parameters())
    assert not m.blocks[1].training and m.blocks[2].training and m.pyramid.training
    sum(o.mean() for o in m(torch.randn(1, 3, 64, 64))).backward()
    assert m.blocks[0].attn.qkv.weight.grad is None and m.blocks[2].attn.qkv.weight.grad is not None
    m0 = vit_backbones.build_backbone('ViT', SMALL, frozen_stages=0)
    assert not m0.pos_embed.requires_grad and m0.blocks[0].attn.qkv.weight.requires_grad
    with pytest.raises(ValueError, match='frozen_stages=5 is out of range'):
        vit_backbones.build_backbone('ViT', SMALL, frozen_stages=5)


def test_drop_path_schedule_linear_over_blocks():
    m = vit_backbones.build_backbone('ViT', 'tiny', drop_path_rate=0.1)
    assert [b.drop_path.drop_prob for b in m.blocks] == pytest.approx([0.1 * i / 11 for i in range(12)])


# ----------------------------------------------------------------------------- bad input
def test_bad_arguments_have_clear_errors():
    with pytest.raises(ValueError, match="unknown arch 'huge'"):
        vit_backbones.build_backbone('ViT', 'huge')
    with pytest.raises(ValueError, match="unknown arch 'large'"):
        vit_backbones.build_backbone('DeiT', 'large')
    with pytest.raises(ValueError, match='block index'):
        vit_backbones.build_backbone('ViT', SMALL, block_indices=(1, 2))
    with pytest.raises(ValueError, match='rel_pos'):
        vit_backbones.build_backbone('ViT', SMALL, rel_pos=True)


def test_checkpoint_of_another_variant_is_refused():
    with torch.device('meta'):
        tiny_sd = vit_backbones.build_backbone('ViT', 'tiny').state_dict()
        small = vit_backbones.build_backbone('ViT', 'small')
    with pytest.raises(CheckpointMismatchError, match='another variant'):
        small.load_checkpoint(tiny_sd)

