"""The backbone contract (../shared/docs/contract.md), checked for every registered backbone.

Each test runs over ``list_backbones()`` with a small variant of each model (``SMALL``), so a new backbone
is covered by adding one entry. What is specific to a model (parity with its reference, checkpoint
conversion, configs) stays in its own test file.
"""
import inspect
import itertools
import math
import os
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS
from torch import nn

import vit_backbones
from vit_backbones.models.base import drop_path_rates
from vit_backbones.models.plain import PlainBackbone

from helpers import randomize

#: a small variant of every backbone (arch overrides of a real variant) and arguments that keep it small
SMALL = {
    'Swin': dict(arch=dict(base='tiny', embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))),
    'ShuffleTransformer': dict(arch=dict(base='tiny', embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
                               stem_channels=8),
    'PVT': dict(arch=dict(base='tiny', embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))),
    'PVTv2': dict(arch=dict(base='b0', embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))),
    'CvT': dict(arch=dict(base='13', embed_dims=(16, 32, 48), depths=(1, 1, 1), num_heads=(1, 2, 3))),
    'LeViT': dict(arch=dict(base='256', embed_dims=(32, 48, 64), key_dim=16, num_heads=(2, 3, 4), depths=(1, 1, 1))),
    'ViT': dict(arch=dict(base='tiny', embed_dims=32, depth=4, num_heads=2)),
    'DeiT': dict(arch=dict(base='tiny-distilled', embed_dims=32, depth=4, num_heads=2)),
    'CaiT': dict(arch=dict(base='xxs24', embed_dims=32, depth=4, num_heads=4)),
    'DeepViT': dict(arch=dict(base='s', embed_dims=24, depth=4, num_heads=3, reattn_blocks=2)),
    'CPVT': dict(arch=dict(base='tiny', embed_dims=32, depth=4, num_heads=2)),
    'CeiT': dict(arch=dict(base='tiny', embed_dims=32, depth=4, num_heads=2)),
}
NAMES = vit_backbones.list_backbones()
MMDET_CONFIGS = osp.join(osp.dirname(__import__('mmdet').__file__), '.mim', 'configs')


def build(name, **kw):
    """The small variant of ``name`` with random weights (no drop path, so training is deterministic)."""
    args = dict(SMALL[name], drop_path_rate=0.)
    args.update(kw)
    return vit_backbones.build_backbone(name, **args)


def image(model, hw=None, batch=2, seed=0, **kw):
    hw = hw or (model.min_input_size, ) * 2
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, model.in_chans) + tuple(hw), generator=g, **kw)


def expected_shapes(model, hw, batch):
    return [(batch, c, math.ceil(hw[0] / s), math.ceil(hw[1] / s)) for c, s in zip(model.out_channels, model.out_strides)]


def num_levels(model):
    return len(model.feature_info)


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_every_backbone_has_a_small_variant():
    assert sorted(SMALL) == NAMES


# ------------------------------------------------------------------------------------------ building
@pytest.mark.parametrize('name', NAMES)
def test_default_arch_is_the_constructor_default(name):
    cls = vit_backbones.get_backbone_class(name)
    default = inspect.signature(cls.__init__).parameters['arch'].default
    assert cls.default_arch == default
    with torch.device('meta'):
        model = vit_backbones.build_backbone(name)
    assert model.arch_name == default


@pytest.mark.parametrize('name', NAMES)
def test_unknown_arguments_and_arch_are_refused(name):
    with pytest.raises(TypeError, match='does not use the argument'):
        build(name, frozen_stage=1)
    with pytest.raises(ValueError, match='unknown arch'):
        vit_backbones.build_backbone(name, 'no-such-variant')


@pytest.mark.parametrize('name', NAMES)
def test_construction_ends_in_one_place_and_forward_checks_once(name, monkeypatch):
    """Every model's ``__init__`` only builds modules: BaseBackbone then initialises once and freezes once,
    in that order; and its forward wrapper is the one place that checks the input."""
    cls = vit_backbones.get_backbone_class(name)
    calls = []
    for method, tag in (('_default_init', 'init'), ('_freeze_stages', 'freeze'), ('check_input', 'check')):
        original = getattr(cls, method)
        monkeypatch.setattr(cls, method, lambda self, *a, _f=original, _t=tag: (calls.append(_t), _f(self, *a))[1])
    model = build(name, frozen_stages=0)
    assert calls == ['init', 'freeze']
    calls.clear()
    model.eval()(image(model, batch=1))
    assert calls.count('check') == 1


def test_deepvit_refuses_layer_scale_it_would_ignore():
    with pytest.raises(TypeError, match="'layer_scale'"):
        build('DeepViT', layer_scale=1e-5)
    assert build('ViT', layer_scale=1e-5).blocks[0].ls1 is not None


@pytest.mark.parametrize('name', NAMES)
def test_pretrained_and_init_cfg_checked_at_construction(name):
    for bad in (True, 123):
        with pytest.raises(TypeError, match='pretrained must be a checkpoint path'):
            build(name, pretrained=bad)
    with pytest.raises(TypeError, match="needs checkpoint=PATH"):
        build(name, init_cfg=dict(type='Pretrained', checkpoint=True))
    with pytest.raises(ValueError, match='neither'):
        build(name, init_cfg=dict(type='NoSuchInit'))
    with pytest.raises(ValueError, match='not both'):
        build(name, pretrained='a.pth', init_cfg=dict(type='Pretrained', checkpoint='b.pth'))
    assert build(name, pretrained='a.pth').init_cfg == dict(type='Pretrained', checkpoint='a.pth')
    # mmdet's PVT configs leave out the type
    assert build(name, init_cfg=dict(checkpoint='a.pth')).init_cfg == dict(type='Pretrained', checkpoint='a.pth')


# ------------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('hw', ['min', (112, 137), (511, 511)], ids=['min', '112x137', '511x511'])
def test_output_shapes_at_any_size(name, hw):
    model = build(name).eval()
    hw = (model.min_input_size, ) * 2 if hw == 'min' else hw
    with torch.no_grad():
        outs = model(image(model, hw, batch=1))
    assert isinstance(outs, tuple)
    assert [tuple(o.shape) for o in outs] == expected_shapes(model, hw, 1)
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('name', NAMES)
def test_feature_info_describes_the_outputs(name):
    model = build(name)
    info = model.feature_info
    assert len(list(info)) == num_levels(model) and isinstance(info[0], dict)
    assert info.channels() == model.out_channels == [info[i]['num_chs'] for i in model.out_indices]
    assert info.reduction() == model.out_strides == [info[i]['reduction'] for i in model.out_indices]
    assert info.module_name() == [info[i]['module'] for i in model.out_indices]
    assert info.channels(0) == info[0]['num_chs'] and info.reduction([0, 1]) == [info[0]['reduction'],
                                                                                  info[1]['reduction']]
    strides = [lv['reduction'] for lv in info]
    assert strides == sorted(strides) and strides[0] == 4 and 32 in strides


@pytest.mark.parametrize('name', NAMES)
def test_out_indices_subsets_give_the_same_maps(name):
    full = build(name).eval()
    n = num_levels(full)
    x = image(full, (64, 96), batch=1)
    with torch.no_grad():
        ref = full(x)
    sd = full.state_dict()
    # each level alone, each left out, all, and negative indices (every subset: 15 or 31 builds, too slow)
    subsets = list(itertools.combinations(range(n), 1)) + list(itertools.combinations(range(n), n - 1))
    for subset in subsets + [tuple(range(n)), (-1, ), (0, -2)]:
        model = build(name, out_indices=subset).eval()
        unexpected = set(model.state_dict()) - set(sd)
        assert not unexpected, (subset, unexpected)
        model.load_state_dict({k: v for k, v in sd.items() if k in model.state_dict()})
        with torch.no_grad():
            outs = model(x)
        levels = [i % n for i in subset]
        assert model.out_indices == tuple(levels)
        assert len(outs) == len(levels)
        for level, out in zip(levels, outs):
            torch.testing.assert_close(out, ref[level], msg=f'out_indices={subset}, level {level}')
    for bad in ((n, ), (0, 0), (-n - 1, )):
        with pytest.raises(ValueError, match='out_indices'):
            build(name, out_indices=bad)


# ------------------------------------------------------------------------------------------ forward_intermediates
def intermediate_shapes(model, hw, batch, indices):
    """(B, C, ceil(H/s), ceil(W/s)) per index: s from feature_info (hierarchical) or the patch size (plain)."""
    if isinstance(model, PlainBackbone):
        return [(batch, model.embed_dims, math.ceil(hw[0] / model.patch_size), math.ceil(hw[1] / model.patch_size))
                for _ in indices]
    info = model.feature_info
    return [(batch, info[i]['num_chs'], math.ceil(hw[0] / info[i]['reduction']),
             math.ceil(hw[1] / info[i]['reduction'])) for i in indices]


def num_intermediates(model):
    return model.depth if isinstance(model, PlainBackbone) else num_levels(model)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('hw', ['min', (97, 131)], ids=['min', '97x131'])
def test_forward_intermediates_shapes_and_forward_maps(name, hw):
    model = build(name).eval()
    hw = (model.min_input_size, ) * 2 if hw == 'min' else hw
    x = image(model, hw)
    n = num_intermediates(model)
    with torch.no_grad():
        maps = model.forward_intermediates(x)
        tokens = model.forward_intermediates(x, output_fmt='NLC')
        outs = model(x)
    assert isinstance(maps, list) and [tuple(m.shape) for m in maps] == intermediate_shapes(model, hw, 2, range(n))
    for m, t in zip(maps, tokens):
        assert t.shape == (2, m.shape[2] * m.shape[3], m.shape[1])
        torch.testing.assert_close(t, m.flatten(2).transpose(1, 2), rtol=0, atol=0)
    assert all(torch.isfinite(m).all() and not m.requires_grad for m in maps)
    if isinstance(model, PlainBackbone):  # no pyramid: every block at the patch stride, blocks differ
        assert n == len(model.blocks) and not any(torch.equal(maps[i], maps[i + 1]) for i in range(n - 1))
        with torch.no_grad():  # as the calls above (eval without autograd may run fused kernels: other roundings)
            pairs = model.forward_intermediates(x, output_fmt='NLC', return_prefix_tokens=True)
        p = model.runtime_prefix_tokens
        assert p == len(model.prefix_token_names)
        assert [tuple(pre.shape) for _, pre in pairs] == [(2, p, model.embed_dims)] * n
        torch.testing.assert_close([t for t, _ in pairs], tokens, rtol=0, atol=0)
        last, hw_grid = model.forward_features(x, taps=[-1])
        if model.norm is not None:  # norm=True: the final norm, as forward's tap of the last block has it
            normed = model.forward_intermediates(x, [-1], norm=True, output_fmt='NLC')[0]
            torch.testing.assert_close(normed, last[0][:, p:])
        else:
            with pytest.raises(ValueError, match='no final norm'):
                model.forward_intermediates(x, norm=True)
            torch.testing.assert_close(tokens[-1], last[0][:, p:])
        assert tuple(maps[-1].shape[-2:]) == hw_grid
    else:  # the stage maps are what forward returns (built with all levels)
        assert model.out_indices == tuple(range(n)) and len(outs) == n
        for i in range(n):
            torch.testing.assert_close(maps[i], outs[i], rtol=0, atol=0, msg=f'level {i}')
        with pytest.raises(ValueError, match='plain models'):
            model.forward_intermediates(x, norm=True)
        with pytest.raises(ValueError, match='plain models'):
            model.forward_intermediates(x, return_prefix_tokens=True)


@pytest.mark.parametrize('name', NAMES)
def test_forward_intermediates_indices(name):
    model = build(name).eval()
    x = image(model, (64, 80), batch=1)
    n, every = num_intermediates(model), model.forward_intermediates(x)
    for got, want in ((model.forward_intermediates(x, 2), every[-2:]), (model.forward_intermediates(x, n), every),
                      (model.forward_intermediates(x, [-1, 0]), [every[-1], every[0]]),
                      (model.forward_intermediates(x, (1, -2)), [every[1], every[-2]])):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    for bad in (0, n + 1, -1):
        with pytest.raises(ValueError, match=rf'indices={bad} .* give 1\.\.{n}\b'):
            model.forward_intermediates(x, bad)
    for bad in ([n], [-n - 1], [0, n + 3]):
        with pytest.raises(ValueError, match=rf'out of range for {n} (blocks|levels) \(valid: {-n}\.\.{n - 1}\)'):
            model.forward_intermediates(x, bad)
    with pytest.raises(ValueError, match='repeats'):
        model.forward_intermediates(x, [0, -n])
    with pytest.raises(ValueError, match='empty'):
        model.forward_intermediates(x, [])
    for bad in ('all', 1.0, [0.5], [True]):
        with pytest.raises(TypeError, match='indices'):
            model.forward_intermediates(x, bad)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC'"):
        model.forward_intermediates(x, output_fmt='NHWC')
    with pytest.raises(ValueError, match='expects 3 input channels, got 4'):  # forward's input checks
        model.forward_intermediates(torch.randn(1, 4, 64, 80))


@pytest.mark.parametrize('name', NAMES)
def test_forward_intermediates_whatever_out_indices_the_model_was_built_with(name):
    extra = dict(out_norm=True) if name == 'PVT' else {}  # PVT's per-level norms are optional
    full = build(name, **extra).eval()
    model = build(name, out_indices=(1, 2), **extra).eval()
    missing, _ = model.load_state_dict(full.state_dict(), strict=False)
    assert missing == []
    x = image(full, (64, 96), batch=1)
    unavailable = model._unavailable_intermediates()
    n = num_intermediates(model)
    available = [i for i in range(n) if i not in unavailable]
    assert {1, 2} <= set(available)
    with torch.no_grad():
        got = model.forward_intermediates(x, available)
        want = full.forward_intermediates(x, available)
        assert model.out_indices == (1, 2) and len(model(x)) == 2  # the call left the model as built
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    for i in unavailable:  # levels whose modules out_indices left out (Swin/PVT/CvT norms, LeViT stages)
        with pytest.raises(ValueError, match=rf'cannot return levels \[{i}\] .* returns {re.escape(str(available))}'):
            model.forward_intermediates(x, [i])
    assert bool(unavailable) == (name in ('Swin', 'PVT', 'CvT', 'LeViT'))


@pytest.mark.parametrize('name', NAMES)
def test_forward_intermediates_train_gradients_and_empty_batch(name):
    model = build(name).train()
    hw = (97, 131)
    x = image(model, hw).requires_grad_()
    maps = model.forward_intermediates(x, [0, -1])
    assert all(m.requires_grad for m in maps)
    sum(m.square().mean() for m in maps).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    stem = model._stem_and_stages()[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.parameters())
    for mode in (True, False):
        model.train(mode)
        empty = model.forward_intermediates(image(model, hw, batch=0))
        assert [tuple(m.shape) for m in empty] == intermediate_shapes(model, hw, 0, range(num_intermediates(model)))
        nlc = model.forward_intermediates(image(model, hw, batch=0), [-1], output_fmt='NLC')[0]
        assert nlc.shape == (0, empty[-1].shape[2] * empty[-1].shape[3], empty[-1].shape[1])
        if isinstance(model, PlainBackbone):
            (_, pre), = model.forward_intermediates(image(model, hw, batch=0), [0], return_prefix_tokens=True)
            assert pre.shape == (0, model.runtime_prefix_tokens, model.embed_dims)


@pytest.mark.parametrize('name', ['ViT', 'DeiT', 'CPVT'])
def test_plain_intermediates_are_the_blocks_run_by_hand(name):
    """Tokens of a plain model computed here from its parts (stem, position embedding, prefix tokens,
    blocks; CPVT's PEG after block 0): forward_intermediates gives each block's grid tokens and its prefix
    tokens, before the final norm, without the pyramid."""
    model = randomize(build(name)).eval()
    x = image(model, (97, 131))
    with torch.no_grad():
        t = model.patch_embed(x)
        b, h, w, c = t.shape
        assert (h, w) == (7, 9)
        t = t.reshape(b, h * w, c)
        prefix = [getattr(model, k).expand(b, -1, -1) for k in model.prefix_token_names]
        if model.pos_embed is not None:
            pos = model.runtime_pos_embed((h, w))
            prefix = [tok + pos[:, i:i + 1] for i, tok in enumerate(prefix)]
            t = t + pos[:, len(prefix):]
        seq = torch.cat(prefix + [t], 1)
        p = len(prefix)
        by_hand = []
        for i, blk in enumerate(model.blocks):
            seq = blk(seq, (h, w))
            if name == 'CPVT' and i == 0:  # the PEG: grid + depthwise conv of the grid, prefix unchanged
                grid = seq[:, p:].transpose(1, 2).reshape(b, c, h, w)
                seq = torch.cat([seq[:, :p], (grid + model.pos_block.proj(grid)).flatten(2).transpose(1, 2)], 1)
            by_hand.append(seq)
        pairs = model.forward_intermediates(x, output_fmt='NLC', return_prefix_tokens=True)
        maps = model.forward_intermediates(x, [1, -1])
        normed = model.forward_intermediates(x, [-1], norm=True)[0]
    assert p == {'ViT': 1, 'DeiT': 2, 'CPVT': 1}[name]
    for (tokens, pre), ref in zip(pairs, by_hand):
        torch.testing.assert_close(tokens, ref[:, p:])
        torch.testing.assert_close(pre, ref[:, :p])
    for m, ref in zip(maps, (by_hand[1], by_hand[-1])):
        torch.testing.assert_close(m, ref[:, p:].transpose(1, 2).reshape(b, c, h, w))
    torch.testing.assert_close(normed, model.norm(by_hand[-1])[:, p:].transpose(1, 2).reshape(b, c, h, w))


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize('name', NAMES)
def test_frozen_stages_for_every_k(name):
    units = len(build(name)._stem_and_stages())
    previous = set()
    for k in range(-1, units):
        model = build(name, frozen_stages=k).train()
        parts = model._stem_and_stages()
        names = {id(p): n for n, p in model.named_parameters()}
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        for unit in parts[:k + 1]:
            assert not any(m.training for m in unit.modules() if not isinstance(m, nn.ModuleList)), k
            assert not any(p.requires_grad for p in unit.parameters()), k
        later = {names[id(p)] for unit in parts[k + 1:] for p in unit.parameters()}
        assert not later & frozen, (k, sorted(later & frozen)[:3])  # later stages train
        assert previous <= frozen, k  # each k freezes what k - 1 froze, and more
        assert bool(frozen) == (k >= 0)
        previous = frozen
    for bad in (units, -2):
        with pytest.raises(ValueError, match='frozen_stages'):
            build(name, frozen_stages=bad)


@pytest.mark.parametrize('name', NAMES)
def test_norm_eval_keeps_batchnorm_statistics(name):
    model = build(name, norm_eval=True).train()
    bns = batchnorms(model)
    assert not any(bn.training for bn in bns)
    before = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k or 'num_batches' in k}
    model(image(model, (64, 64)))
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    if bns:  # without norm_eval the statistics move
        model = build(name).train()
        model(image(model, (64, 64)))
        assert any(bn.num_batches_tracked.item() == 1 for bn in batchnorms(model))


def _train_step(model, x):
    model.zero_grad(set_to_none=True)
    outs = model(x)
    sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs).backward()
    return [o.detach() for o in outs], {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize('name', NAMES)
def test_with_cp_same_outputs_gradients_and_statistics(name):
    torch.manual_seed(0)
    plain = build(name).train()
    cp = build(name, with_cp=True).train()
    cp.load_state_dict(plain.state_dict())
    x = image(plain, (64, 64))
    outs, grads = _train_step(plain, x)
    outs_cp, grads_cp = _train_step(cp, x)
    for a, b in zip(outs, outs_cp):
        torch.testing.assert_close(a, b)
    for k, g in grads.items():
        torch.testing.assert_close(g, grads_cp[k], msg=k)
    sd, sd_cp = plain.state_dict(), cp.state_dict()
    for k, v in sd.items():
        torch.testing.assert_close(v, sd_cp[k], msg=k)
    assert cp.set_grad_checkpointing(False) is cp and not cp.with_cp
    assert cp.set_grad_checkpointing().with_cp


@pytest.mark.parametrize('name', NAMES)
def test_every_parameter_gets_a_gradient(name):
    model = build(name).train()
    _, grads = _train_step(model, image(model, (64, 64)))
    missing = [k for k, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert not missing


def test_drop_path_rules_of_the_papers():
    def rates(*args):
        return [[round(r, 6) for r in stage] for stage in drop_path_rates(*args)]

    assert rates(0.3, (2, 2)) == [[0., 0.1], [0.2, 0.3]]
    assert rates(0.1, (1, 2, 3), 'stage_linear') == [[0.], [0., 0.], [0., 0.05, 0.1]]
    assert rates([0.2, 0.2], (1, 3), 'stage_linear') == [[0.], [0., 0.1, 0.2]]
    assert rates(0.2, (2, 1), 'constant') == [[0.2, 0.2], [0.2]]
    assert rates(0.3, (1, 2, 1, 1), 'stage_constant') == [[0.], [0.1, 0.1], [0.2], [0.3]]
    with pytest.raises(ValueError, match='rule'):
        drop_path_rates(0.1, (2, ), 'cosine')


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize('name', NAMES)
def test_bad_inputs_name_the_problem(name):
    model = build(name).eval()
    s = model.min_input_size
    with pytest.raises(ValueError, match='input channels'):
        model(torch.randn(1, 4, s, s))
    with pytest.raises(ValueError, match='at least'):
        model(torch.randn(1, 3, s - 1, s + 8))
    with pytest.raises(TypeError, match='floating-point'):
        model(torch.zeros(1, 3, s, s, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'):
        model(torch.randn(3, s, s))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        with pytest.raises(TypeError, match=r'torch\.autocast.*model\.to'):
            model(torch.randn(1, 3, s, s, dtype=dtype))


@pytest.mark.parametrize('name', NAMES)
def test_empty_batch_gives_empty_maps(name):
    model = build(name)
    hw = (model.min_input_size + 7, model.min_input_size + 40)
    for mode in (False, True):
        model.train(mode)
        outs = model(image(model, hw, batch=0))
        assert [tuple(o.shape) for o in outs] == expected_shapes(model, hw, 0)


@pytest.mark.parametrize('name', NAMES)
def test_batchnorm_with_one_value_per_channel_says_what_to_do(name):
    model = build(name).train()
    try:
        model(image(model, batch=1))
    except ValueError as e:
        assert 'BatchNorm' in str(e) and ('norm_eval' in str(e) or 'batch of at least 2' in str(e)), str(e)


def test_cvt_batch_of_one_at_32_in_training_has_a_clear_error():
    model = vit_backbones.build_backbone('CvT', '13').train()
    with pytest.raises(ValueError, match='BatchNorm in training mode.*norm_eval=True'):
        model(torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        assert len(model.eval()(torch.randn(1, 3, 32, 32))) == 4


# ------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize('name', NAMES)
def test_state_dict_round_trip(name, tmp_path):
    torch.manual_seed(1)
    src = build(name).eval()
    torch.manual_seed(2)
    dst = build(name).eval()
    x = image(src, (64, 80), batch=1)
    path = str(tmp_path / 'weights.pth')
    torch.save(src.state_dict(), path)
    report = dst.load_checkpoint(path)
    assert not report.missing and not report.missing_buffers and not report.dropped, report
    with torch.no_grad():
        for a, b in zip(src(x), dst(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = build(name, init_cfg=dict(type='Pretrained', checkpoint=path)).eval()
    other.init_weights()
    with torch.no_grad():
        for a, b in zip(src(x), other(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize('name', NAMES)
def test_bf16_autocast(name):
    model = build(name).eval()
    x = image(model, (64, 96), batch=1)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(x)
        outs16 = model(x.bfloat16())
    assert [tuple(o.shape) for o in outs] == expected_shapes(model, (64, 96), 1)
    assert all(torch.isfinite(o.float()).all() for o in outs + outs16)


# ------------------------------------------------------------------------------------------ registry
def test_list_backbones_pattern_and_suggestions():
    assert vit_backbones.list_backbones('*swin*') == ['Swin']
    assert vit_backbones.list_backbones('PVT*') == ['PVT', 'PVTv2']
    assert vit_backbones.list_backbones('*vit') == ['DeepViT', 'LeViT', 'ViT']
    assert vit_backbones.list_backbones('nothing*') == []
    with pytest.raises(KeyError, match=r"did you mean 'Swin'\?.*custom_imports=dict\(imports=\['vit_backbones'\]"):
        vit_backbones.get_backbone_class('Swinn')
    with pytest.raises(KeyError, match="did you mean 'PVTv2'"):
        vit_backbones.build_backbone('pvt_v2')


_LIGHT_IMPORT = r"""
import sys
import torch
import vit_backbones
from mmengine.registry import HOOKS, MODELS, OPTIM_WRAPPERS
heavy = [m for m in ('mmengine.model', 'mmengine.optim', 'mmengine.hooks', 'vit_backbones.models',
                     'vit_backbones.runtime.amp', 'vit_backbones.runtime.checkpoint_hook', 'vit_backbones.features')
         if m in sys.modules]
assert not heavy, heavy
assert any('HistoryBuffer' in str(g) for g in torch.serialization.get_safe_globals()), 'mmengine types not allowed'
names = vit_backbones.list_backbones()
assert len(names) == 12 and all(n in MODELS.module_dict for n in names), names
assert 'SafeCheckpointHook' in HOOKS.module_dict and 'BF16AutocastOptimWrapper' in OPTIM_WRAPPERS.module_dict
model = MODELS.build(dict(type='Swin', arch=dict(base='tiny', embed_dims=16, depths=(1, 1, 1, 1),
                                                num_heads=(1, 2, 2, 4))))
assert type(model) is vit_backbones.get_backbone_class('Swin') is MODELS.get('Swin'), MODELS.get('Swin')
assert all(isinstance(MODELS.get(n), type) for n in names)  # the first build imported every backbone
hook = HOOKS.build(dict(type='SafeCheckpointHook', interval=1))
assert type(hook) is HOOKS.get('SafeCheckpointHook') and type(hook).__module__ == 'vit_backbones.runtime.checkpoint_hook'
vit_backbones.register_all()
assert isinstance(OPTIM_WRAPPERS.get('BF16AutocastOptimWrapper'), type)
from vit_backbones.registry import BACKBONE_MODULES, _BACKBONES
assert sorted(_BACKBONES) == sorted(BACKBONE_MODULES) == names
assert all(_BACKBONES[n].__module__ == BACKBONE_MODULES[n] for n in names)
print('ok')
"""


def test_import_is_light_and_config_names_resolve_on_first_build():
    """``import vit_backbones`` allow-lists mmengine's checkpoint types and registers every name a config
    uses without importing mmengine.model or a model module; the first build from mmengine's registry
    gives the real class (and puts the real classes in the registry); the table of modules is right."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, '-c', _LIGHT_IMPORT], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0 and proc.stdout.strip().endswith('ok'), proc.stderr[-3000:]


def _mmdet_backbones(folder, prefix):
    for fname in sorted(os.listdir(osp.join(MMDET_CONFIGS, folder))):
        if fname.startswith(prefix) and fname.endswith('.py'):
            cfg = Config.fromfile(osp.join(MMDET_CONFIGS, folder, fname))
            yield fname, cfg.model.backbone.to_dict(), list(cfg.model.neck.in_channels)


#: mmdet backbone type -> ours, and the variant each mmdet config file names
MMDET_TYPES = {'SwinTransformer': 'Swin', 'PyramidVisionTransformer': 'PVT', 'PyramidVisionTransformerV2': 'PVTv2'}
MMDET_VARIANTS = {'swin-t': 'tiny', 'swin-s': 'small', 'pvt-t': 'tiny', 'pvt-s': 'small', 'pvt-m': 'medium',
                  'pvt-l': 'large', 'pvtv2-b0': 'b0', 'pvtv2-b1': 'b1', 'pvtv2-b2': 'b2', 'pvtv2-b3': 'b3',
                  'pvtv2-b4': 'b4', 'pvtv2-b5': 'b5'}


@pytest.mark.parametrize('folder,prefix', [('swin', 'mask-rcnn_swin'), ('swin', 'retinanet_swin'), ('pvt', 'retinanet')])
def test_mmdet_backbone_dicts_build_ours_by_changing_type(folder, prefix):
    import vit_backbones  # noqa: F401  (registers ours with the root registry mmdet falls back to)
    seen = 0
    for fname, backbone, neck_channels in _mmdet_backbones(folder, prefix):
        backbone.pop('_delete_', None)
        backbone['type'] = MMDET_TYPES[backbone['type']]
        with torch.device('meta'):
            model = MODELS.build(backbone)
        variant = next(v for k, v in MMDET_VARIANTS.items() if f'_{k}' in fname)
        assert model.arch_name == variant, fname
        assert model.out_channels == neck_channels, fname
        seen += 1
    assert seen


def test_mmdet_keywords_that_we_do_not_implement_are_refused():
    with pytest.raises(ValueError, match='patch_norm'):
        build('Swin', patch_norm=False)
    with pytest.raises(ValueError, match='use_conv_ffn'):
        build('PVTv2', use_conv_ffn=False)
    with torch.device('meta'):
        swin = vit_backbones.build_backbone('Swin', embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                                            window_size=7, in_channels=3, convert_weights=True)
    assert swin.arch_name == 'tiny'
    pvt = build('PVT', norm_cfg=dict(type='LN', eps=1e-6))
    assert pvt.stages[0].blocks[0].norm1.eps == 1e-6
