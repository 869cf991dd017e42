"""Shared layers, checked against their definitions."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import vit_backbones
from vit_backbones.layers import (Attention, DropPath, PatchEmbed, RelativePositionBias, drop_path_schedule, nchw_to_nlc,
                                  nlc_to_nchw, pad_to_window, relative_position_index, resample_abs_pos_embed,
                                  resize_rel_pos_table, scaled_dot_product, shifted_window_mask, window_partition,
                                  window_reverse)


def _naive_attention(q, k, v, bias, scale):
    s = torch.einsum('bhnd,bhmd->bhnm', q, k) * scale
    if bias is not None:
        s = s + bias
    return torch.einsum('bhnm,bhmd->bhnd', s.softmax(-1), v)


@pytest.mark.parametrize('with_bias', [False, True])
def test_scaled_dot_product_matches_definition(with_bias):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 3, 10, 10, generator=g) if with_bias else None
    ref = _naive_attention(q, k, v, bias, 0.3)
    fused = scaled_dot_product(q, k, v, bias, scale=0.3)
    exact, attn = scaled_dot_product(q, k, v, bias, scale=0.3, return_attn=True)
    assert torch.allclose(fused, ref, atol=1e-5)
    assert torch.allclose(exact, ref, atol=1e-5)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 3, 10), atol=1e-6)


@pytest.mark.parametrize('bias_kind', ['none', 'constant', 'learned'])
def test_scaled_dot_product_gradients_match_definition(bias_kind):
    """Training path: fused kernel without a bias or with a constant mask, explicit path for a learned
    bias; gradients of q, k, v (and of the learned bias) equal the naive definition's."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g, requires_grad=True) for _ in range(3))
    bias = None if bias_kind == 'none' else torch.randn(1, 3, 10, 10, generator=g)
    if bias_kind == 'learned':
        bias.requires_grad_(True)
    w = torch.randn(2, 3, 10, 8, generator=g)
    leaves = [q, k, v] + ([bias] if bias_kind == 'learned' else [])
    ref_grads = torch.autograd.grad((_naive_attention(q, k, v, bias, 0.3) * w).sum(), leaves)
    out = scaled_dot_product(q, k, v, bias, scale=0.3)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    assert torch.allclose(out, _naive_attention(q, k, v, bias, 0.3), atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_attention_module_matches_manual_heads():
    torch.manual_seed(0)
    attn = Attention(16, 4).eval()
    x = torch.randn(2, 7, 16)
    qkv = attn.qkv(x).reshape(2, 7, 3, 4, 4)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    ref = _naive_attention(q, k, v, None, 4**-0.5).transpose(1, 2).reshape(2, 7, 16)
    assert torch.allclose(attn(x), attn.proj(ref), atol=1e-5)


def test_window_partition_roundtrip_and_order():
    x = torch.arange(2 * 6 * 9 * 3, dtype=torch.float32).reshape(2, 6, 9, 3)
    w = window_partition(x, (3, 3))
    assert w.shape == (2, 6, 9, 3)
    # window 1 of image 0 is rows 0..2, cols 3..5
    assert torch.equal(w[0, 1].reshape(3, 3, 3), x[0, 0:3, 3:6])
    assert torch.equal(window_reverse(w, (3, 3), (6, 9)), x)


def test_pad_to_window():
    x = torch.ones(1, 5, 8, 2)
    y, pad = pad_to_window(x, (7, 7))
    assert pad == (2, 6) and y.shape == (1, 7, 14, 2)
    assert y[:, 5:].abs().sum() == 0 and y[:, :, 8:].abs().sum() == 0 and y[:, :5, :8].sum() == 5 * 8 * 2


@pytest.mark.parametrize('hw,ws,shift', [((14, 14), 7, 3), ((14, 21), 7, 3), ((8, 12), 4, 2), ((7, 7), 7, 3)])
def test_shift_mask_matches_wraparound_definition(hw, ws, shift):
    """After a cyclic shift by -s, position p came from (p + s) mod H: it wrapped iff p >= H - s.
    Two tokens of a window may attend iff they agree on wrapping in both axes."""
    h, w = hw
    mask = shifted_window_mask(hw, (ws, ws), (shift, shift), torch.device('cpu'), torch.float32)
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    wrap = torch.stack([(rows >= h - shift), (cols >= w - shift)], -1).float()[None]
    wins = window_partition(wrap, (ws, ws))[0]  # nW, N, 2
    differ = (wins[:, :, None, :] != wins[:, None, :, :]).any(-1)
    assert torch.equal(mask == -100, differ)
    assert set(mask.unique().tolist()) <= {0., -100.}
    # cached: same object on a second call
    assert shifted_window_mask(hw, (ws, ws), (shift, shift), torch.device('cpu'), torch.float32) is mask


def test_relative_position_index_brute_force():
    for window, table in [((3, 4), None), ((2, 3), (4, 5))]:
        tw = table or window
        idx = relative_position_index(window, table)
        pos = list(itertools.product(range(window[0]), range(window[1])))
        for i, (a, b) in enumerate(pos):
            for j, (c, d) in enumerate(pos):
                assert idx[i, j] == (a - c + tw[0] - 1) * (2 * tw[1] - 1) + (b - d + tw[1] - 1)


def test_relative_position_bias_subwindow_uses_central_offsets():
    torch.manual_seed(0)
    rpb = RelativePositionBias(2, (7, 7))
    full = rpb()
    assert full.shape == (2, 49, 49)
    small = rpb((3, 3))
    # offset (0, 0) and (1, 1) have the same bias in both windows
    assert torch.equal(small[:, 0, 0], full[:, 0, 0])
    assert torch.equal(small[:, 0, 4], full[:, 0, 8])  # (0,0)->(1,1): index 4 in 3x3, 8 in 7x7


def test_resize_rel_pos_table():
    table = torch.full((13 * 13, 3), 0.25)
    out = resize_rel_pos_table(table, (7, 7), (12, 12))
    assert out.shape == (23 * 23, 3)
    assert torch.allclose(out, torch.full_like(out, 0.25), atol=1e-6)  # constants stay constant
    ramp = torch.linspace(-1, 1, 13).repeat_interleave(13)[:, None].repeat(1, 2)
    out = resize_rel_pos_table(ramp, (7, 7), (12, 12)).reshape(23, 23, 2)
    assert (out[1:, :, 0] >= out[:-1, :, 0] - 1e-6).all()  # monotone along the ramp axis
    with pytest.raises(ValueError, match='rows'):
        resize_rel_pos_table(torch.zeros(10, 3), (7, 7), (12, 12))


def test_resample_abs_pos_embed_keeps_prefix_and_dtype():
    torch.manual_seed(0)
    pos = torch.randn(1, 2 + 14 * 14, 8).to(torch.bfloat16)
    out = resample_abs_pos_embed(pos, (20, 17), num_prefix_tokens=2)
    assert out.shape == (1, 2 + 20 * 17, 8) and out.dtype == torch.bfloat16
    assert torch.equal(out[:, :2], pos[:, :2])
    ref = F.interpolate(pos[:, 2:].float().reshape(1, 14, 14, 8).permute(0, 3, 1, 2), size=(20, 17), mode='bicubic',
                        align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, 8)
    assert torch.allclose(out[:, 2:].float(), ref, atol=1e-2)
    assert resample_abs_pos_embed(pos, (14, 14), num_prefix_tokens=2) is pos
    with pytest.raises(ValueError, match='not square'):
        resample_abs_pos_embed(torch.zeros(1, 15, 4), (4, 4))


@pytest.mark.parametrize('kernel,stride,pad', [(4, 4, 0), (16, 16, 0), (7, 4, 3), (3, 2, 1)])
@pytest.mark.parametrize('hw', [(224, 224), (511, 511), (112, 137), (33, 45)])
def test_patch_embed_output_is_ceil(kernel, stride, pad, hw):
    pe = PatchEmbed(3, 8, kernel, stride, pad)
    out = pe(torch.randn(1, 3, *hw))
    assert out.shape == (1, -(-hw[0] // stride), -(-hw[1] // stride), 8)


@pytest.mark.parametrize('patch,hw', [(4, (17, 22)), (16, (32, 48)), ((2, 3), (5, 7))])
def test_non_overlapping_patch_embed_equals_its_conv_with_gradients(patch, hw):
    """The patch embedding (run channels-last, NHWC out) is the zero-padded NCHW conv (float64), with
    the same weight/bias gradients, and it calls its conv module (hooks on ``proj`` see every call)."""
    torch.manual_seed(0)
    pe = PatchEmbed(3, 8, patch).double()
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    calls = []
    pe.proj.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    out = pe(x)
    assert len(calls) == 1 and out.is_contiguous()
    padded = F.pad(x, (0, -hw[1] % pw, 0, -hw[0] % ph))
    ref = F.conv2d(padded, pe.proj.weight, pe.proj.bias, stride=(ph, pw)).permute(0, 2, 3, 1)
    assert out.shape == ref.shape and (out - ref).abs().max() < 1e-12
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), [pe.proj.weight, pe.proj.bias])
    want = torch.autograd.grad((ref * g).sum(), [pe.proj.weight, pe.proj.bias])
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(got, want))


def test_drop_path():
    torch.manual_seed(0)
    dp = DropPath(0.5)
    x = torch.ones(1000, 4)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    rows = set(y[:, 0].tolist())
    assert rows == {0.0, 2.0}
    assert (y == y[:, :1]).all()  # whole samples are dropped
    assert 0.4 < (y[:, 0] == 0).float().mean() < 0.6
    x2 = torch.randn(64, 3, 4)
    b = torch.randn(64, 3, 4)
    torch.manual_seed(1)
    fused = dp.add(x2, b)
    torch.manual_seed(1)
    assert torch.allclose(fused, x2 + dp(b), atol=1e-6)  # same draw, one pass
    sched = drop_path_schedule(0.3, (2, 2))
    assert [len(s) for s in sched] == [2, 2]
    assert sum(sched, []) == pytest.approx([0, .1, .2, .3])


def test_nlc_nchw_roundtrip():
    x = torch.randn(2, 5, 3, 4)
    t, hw = nchw_to_nlc(x)
    assert t.shape == (2, 12, 5) and hw == (3, 4)
    assert torch.equal(nlc_to_nchw(t, hw), x)
    with pytest.raises(ValueError, match='grid'):
        nlc_to_nchw(t, (3, 5))


@pytest.mark.parametrize('hw,ws,shift', [((10, 13), 4, 2), ((8, 8), 4, 0), ((7, 9), 7, 3), ((14, 14), 7, 3), ((3, 5), 7, 0)])
def test_window_gather_equals_pad_roll_partition_with_gradients(hw, ws, shift):
    from vit_backbones.layers import tokens_to_windows, window_plan, windows_to_tokens
    torch.manual_seed(0)
    x = torch.randn(2, hw[0] * hw[1], 5, requires_grad=True)
    plan = window_plan(hw, (ws, ws), (shift, shift), torch.device('cpu'))
    fast = tokens_to_windows(x, plan)
    ref, _ = pad_to_window(x.view(2, *hw, 5), (ws, ws))
    ref = window_partition(torch.roll(ref, (-shift, -shift), (1, 2)), (ws, ws)).reshape(-1, ws * ws, 5)
    assert torch.equal(fast, ref)
    g = torch.randn_like(fast)
    assert torch.equal(torch.autograd.grad((fast * g).sum(), x)[0], torch.autograd.grad((ref * g).sum(), x)[0])
    # and back: crop + unshift, with its gradient
    w = torch.randn_like(fast, requires_grad=True)
    back = windows_to_tokens(w, plan)
    ref_back = window_reverse(w.view(2, -1, ws * ws, 5), (ws, ws), plan.padded_hw)
    ref_back = torch.roll(ref_back, (shift, shift), (1, 2))[:, :hw[0], :hw[1]].reshape(2, -1, 5)
    assert torch.equal(back, ref_back)
    gb = torch.randn_like(back)
    assert torch.equal(torch.autograd.grad((back * gb).sum(), w)[0], torch.autograd.grad((ref_back * gb).sum(), w)[0])


def test_split_heads_gradient_matches_reference():
    from vit_backbones.layers import split_heads
    torch.manual_seed(0)
    qkv = torch.randn(4, 10, 3 * 12, requires_grad=True)
    q, k, v = split_heads(qkv, 3)
    ref = qkv.view(4, 10, 3, 3, 4).permute(2, 0, 3, 1, 4)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), ref))
    gs = [torch.randn_like(q) for _ in range(3)]
    got = torch.autograd.grad(sum((a * g).sum() for a, g in zip((q, k, v), gs)), qkv)[0]
    want = torch.autograd.grad(sum((a * g).sum() for a, g in zip(ref.unbind(0), gs)), qkv)[0]
    assert torch.equal(got, want)
    q2, _, _ = split_heads(qkv, 3)  # only q used: k, v gradients are zero
    got = torch.autograd.grad((q2 * gs[0]).sum(), qkv)[0]
    assert torch.equal(got.view(4, 10, 3, 12)[:, :, 1:], torch.zeros(4, 10, 2, 12))


@pytest.mark.parametrize('hw', [(224, 224), (111, 137), (33, 20)])
def test_conv_stem_strides_and_bn(hw):
    from vit_backbones.layers import ConvStem
    stem = ConvStem(3, (16, 32, 64, 128), (2, 2, 2, 2), act_layer=torch.nn.Hardswish, act_last=False)
    assert stem.stride == 16
    out = stem(torch.randn(2, 3, *hw))
    assert out.shape == (2, -(-hw[0] // 16), -(-hw[1] // 16), 128)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in stem.modules()) == 4
    assert sum(isinstance(m, torch.nn.Hardswish) for m in stem.modules()) == 3  # none after the last conv
    pooled = ConvStem(3, (32, ), (2, ), kernel_size=7, pool=(3, 2))  # CeiT-style image-to-tokens
    assert pooled.stride == 4 and pooled(torch.randn(1, 3, *hw)).shape == (1, -(-hw[0] // 4), -(-hw[1] // 4), 32)


def _window_attention_reference(x, attn, hw, ws, shift, key_pad_mask=None):
    """Window attention from its definition: zero-pad the (normalised) map at the bottom/right, roll by
    -shift, cut windows, project each zero-or-real token, attend with the relative bias (+ the -100
    shift mask from region labels, or a key-padding mask), undo everything, crop."""
    b, _, c = x.shape
    h, w = hw
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    m = F.pad(x.view(b, h, w, c), (0, 0, 0, wp - w, 0, hp - h))
    m = torch.roll(m, (-shift, -shift), (1, 2))
    win = m.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, ws * ws, c)
    heads = attn.num_heads
    qkv = attn.qkv(win).view(b, win.shape[1], ws * ws, 3, heads, c // heads)
    q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # (B, heads, nW, N, d)
    s = torch.einsum('bhwnd,bhwmd->bhwnm', q, k) * attn.scale + attn.rel_pos((ws, ws))[:, None]
    if shift:
        region = torch.zeros(hp, wp, dtype=torch.long)
        for i, rs in enumerate((slice(0, hp - ws), slice(hp - ws, hp - shift), slice(hp - shift, hp))):
            for j, cs in enumerate((slice(0, wp - ws), slice(wp - ws, wp - shift), slice(wp - shift, wp))):
                region[rs, cs] = 3 * i + j
        rw = region.view(hp // ws, ws, wp // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
        s = s + (rw[:, :, None] != rw[:, None, :]).to(s.dtype) * -100.
    if key_pad_mask is not None:
        s = s + key_pad_mask.view(1, 1, -1, 1, ws * ws)
    out = torch.einsum('bhwnm,bhwmd->bhwnd', s.softmax(-1), v).permute(0, 2, 3, 1, 4).reshape(b, -1, ws * ws, c)
    out = out.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    out = torch.roll(out, (shift, shift), (1, 2))[:, :h, :w].reshape(b, h * w, c)
    return attn.proj(out)


@pytest.mark.parametrize('hw,ws,shift,slice_bytes', [((9, 11), 4, 2, None), ((8, 8), 4, 0, None), ((8, 8), 4, 2, None),
                                                    ((5, 3), 7, 3, None), ((9, 11), 4, 0, None),
                                                    ((9, 11), 4, 2, 16 * 16 * 8 * 12),  # per head
                                                    ((9, 11), 4, 2, 16 * 16 * 8 * 5)])  # runs of windows
def test_window_attention_matches_definition_with_gradients(monkeypatch, hw, ws, shift, slice_bytes):
    """Training path (one autograd function from the qkv tokens to the output tokens, projections on
    real tokens only, padding slots = q/k/v of a zero token; also worked a head or a few windows at a
    time) and the no-grad fused path both equal the pad/roll/partition definition; the gradients of the
    input, both projections, the qkv bias (which the padding slots use too) and the relative-position
    table are the definition's."""
    from vit_backbones.layers import WindowAttention, attention_kernel, window_plan
    if slice_bytes:
        monkeypatch.setattr(attention_kernel, 'SLICE_BYTES', slice_bytes)
        assert len(attention_kernel._slices(2, 3, 9, 16 * 16, 8)) == {12: 6, 5: 12}[slice_bytes // (16 * 16 * 8)]
    torch.manual_seed(0)
    attn = WindowAttention(12, 3, (ws, ws)).double()
    with torch.no_grad():
        attn.qkv.bias.normal_()
        attn.rel_pos.relative_position_bias_table.normal_()
    x = torch.randn(2, hw[0] * hw[1], 12, dtype=torch.float64, requires_grad=True)
    plan = window_plan(hw, (ws, ws), (shift, shift), x.device)
    mask = shifted_window_mask(plan.padded_hw, (ws, ws), (shift, shift), x.device, torch.float64) if shift else None
    leaves = [x] + list(attn.parameters())
    ref = _window_attention_reference(x, attn, hw, ws, shift)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * g).sum(), leaves)
    out = attn(x, plan, mask)
    grads = torch.autograd.grad((out * g).sum(), leaves)
    assert (out - ref).abs().max() < 1e-12
    for (name, _), a, b in zip([('x', None)] + list(attn.named_parameters()), grads, ref_grads):
        assert (a - b).abs().max() < 1e-11, name
    with torch.no_grad():
        assert (attn(x, plan, mask) - ref).abs().max() < 1e-12
    # attention dropout in training takes the composed path; a vanishing rate must give the same values
    attn.attn_drop = 1e-12
    out = attn.train()(x, plan, mask)
    assert (out - ref).abs().max() < 1e-10
    assert (torch.autograd.grad((out * g).sum(), x)[0] - ref_grads[0]).abs().max() < 1e-10


def test_window_attention_key_padding_mask_with_gradients():
    """The (nW, 1, N) key-padding mask the Shuffle Transformer uses: padded keys get no weight."""
    from vit_backbones.layers import WindowAttention, window_plan
    torch.manual_seed(1)
    hw, ws = (6, 7), 4
    attn = WindowAttention(8, 2, (ws, ws), qkv_bias=False).double()
    plan = window_plan(hw, (ws, ws), (0, 0), torch.device('cpu'))
    key_mask = torch.zeros(plan.num_windows * ws * ws, dtype=torch.float64)
    key_mask[plan.pad_slots] = float('-inf')
    key_mask = key_mask.view(plan.num_windows, 1, ws * ws)
    x = torch.randn(3, hw[0] * hw[1], 8, dtype=torch.float64, requires_grad=True)
    ref = _window_attention_reference(x, attn, hw, ws, 0, key_mask)
    out = attn(x, plan, key_mask)
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 1e-12
    leaves = [x] + list(attn.parameters())
    for a, b in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(ref.sum(), leaves)):
        assert (a - b).abs().max() < 1e-11
    with torch.no_grad():
        assert (attn(x, plan, key_mask) - ref).abs().max() < 1e-12


@pytest.mark.parametrize('approximate', ['none', 'tanh'])
def test_mlp_training_function_equals_module_chain(approximate):
    """The fused fc1-GELU-fc2 training function (GELU gradient in place) runs the same operations as
    the module chain: identical output and gradients; under bf16 autocast it computes in bf16 like
    autocast's Linear and hands back float32 parameter gradients."""
    from vit_backbones.layers import Mlp
    torch.manual_seed(0)
    mlp = Mlp(6, 24, act_layer=lambda: torch.nn.GELU(approximate=approximate)).double()

    def chain(x):
        return mlp.fc2(F.gelu(mlp.fc1(x), approximate=approximate))

    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 6, dtype=torch.float64)
    leaves = [x] + list(mlp.parameters())
    out = mlp(x)
    assert out.grad_fn is not None and 'LinearGeluLinear' in type(out.grad_fn).__name__
    ref = chain(x)
    assert torch.equal(out, ref)
    for a, b in zip(torch.autograd.grad((out * g).sum(), leaves), torch.autograd.grad((ref * g).sum(), leaves)):
        assert torch.equal(a, b)
    mlp.float()
    xf = x.detach().float().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, ref = mlp(xf), chain(xf)
    assert out.dtype == ref.dtype == torch.bfloat16 and torch.equal(out, ref)
    grads = torch.autograd.grad(out.float().sum(), [xf] + list(mlp.parameters()))
    ref_grads = torch.autograd.grad(ref.float().sum(), [xf] + list(mlp.parameters()))
    for a, b in zip(grads, ref_grads):
        assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize('kind', ['frozen_bias', 'no_bias'])
def test_window_attention_constant_bias_training_path(kind):
    """With no bias gradient to compute (frozen table, or no table: ViTDet windows without rel-pos) the
    training path is the fused kernel with its own backward; values and gradients = the definition."""
    from vit_backbones.layers import WindowAttention, window_attention, window_plan
    torch.manual_seed(2)
    hw, ws, shift = (9, 10), 4, 2
    attn = WindowAttention(12, 3, (ws, ws)).double()
    with torch.no_grad():
        attn.qkv.bias.normal_()
        table = attn.rel_pos.relative_position_bias_table
        table.normal_() if kind == 'frozen_bias' else table.zero_()
    table.requires_grad_(False)
    x = torch.randn(2, hw[0] * hw[1], 12, dtype=torch.float64, requires_grad=True)
    plan = window_plan(hw, (ws, ws), (shift, shift), x.device)
    mask = shifted_window_mask(plan.padded_hw, (ws, ws), (shift, shift), x.device, torch.float64)
    rel = attn.rel_pos((ws, ws)) if kind == 'frozen_bias' else None
    out = attn.proj(window_attention(attn.qkv(x), plan, 3, attn.scale, rel, mask, attn.qkv.bias))
    seen, stack = set(), [out.grad_fn]
    while stack:
        f = stack.pop()
        if f is not None and f not in seen:
            seen.add(f)
            stack += [n for n, _ in f.next_functions]
    nodes = {type(f).__name__ for f in seen}
    assert any('ScaledDotProduct' in n for n in nodes) and '_WindowSoftmaxAttentionBackward' not in nodes
    ref = _window_attention_reference(x, attn, hw, ws, shift)
    assert (out - ref).abs().max() < 1e-12
    leaves = [x, attn.qkv.weight, attn.qkv.bias, attn.proj.weight]
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), leaves), torch.autograd.grad((ref * g).sum(), leaves)):
        assert (a - b).abs().max() < 1e-11


@pytest.mark.parametrize('bias_shape', [None, (1, 3, 10, 12), (2, 3, 10, 12)])
def test_attention_scores_match_definition(bias_shape):
    """The one explicit logit kernel (explicit attention, talking heads, re-attention): q k^T * scale + bias,
    the bias broadcast over batch and heads."""
    from vit_backbones.layers import attention_scores
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 10, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 12, 8, generator=g,
                                                                                   dtype=torch.float64)
    bias = None if bias_shape is None else torch.randn(*bias_shape, generator=g, dtype=torch.float64)
    ref = torch.einsum('bhnd,bhmd->bhnm', q, k) * 0.3 + (0 if bias is None else bias)
    out = attention_scores(q, k, 0.3, bias)
    assert out.shape == (2, 3, 10, 12) and (out - ref).abs().max() < 1e-12


@pytest.mark.parametrize('shift', [0, 2])
def test_generic_windowed_attention_equals_the_fused_path(shift):
    """``forward_windows`` is one interface: the base class's (windows cut out as a batch, ``forward`` with
    the relative bias + per-window mask) equals :class:`Attention`'s straight-from-tokens kernel, values and
    input gradients, with padding (9x11 map, 4x4 windows)."""
    from vit_backbones.layers import AttentionBase, window_plan
    torch.manual_seed(4)
    hw, ws = (9, 11), 4
    attn = Attention(12, 3).double()
    with torch.no_grad():
        attn.qkv.bias.normal_()
    x = torch.randn(2, hw[0] * hw[1], 12, dtype=torch.float64, requires_grad=True)
    rel = torch.randn(3, ws * ws, ws * ws, dtype=torch.float64)
    plan = window_plan(hw, (ws, ws), (shift, shift), x.device)
    mask = shifted_window_mask(plan.padded_hw, (ws, ws), (shift, shift), x.device, torch.float64) if shift else None
    fused = attn.forward_windows(x, plan, rel, mask)
    generic = AttentionBase.forward_windows(attn, x, plan, rel, mask)
    assert (fused - generic).abs().max() < 1e-12
    g = torch.randn_like(fused)
    (a, ), (b, ) = torch.autograd.grad((fused * g).sum(), [x]), torch.autograd.grad((generic * g).sum(), [x])
    assert (a - b).abs().max() < 1e-12


def test_grid_attentions_refuse_windows():
    from vit_backbones.layers import SpatialReductionAttention, window_plan
    from vit_backbones.layers.conv_proj import ConvProjectionAttention
    plan = window_plan((4, 4), (2, 2), (0, 0), torch.device('cpu'))
    for attn in (SpatialReductionAttention(8, 2, sr_ratio=2), ConvProjectionAttention(8, 2)):
        with pytest.raises(TypeError, match=type(attn).__name__):
            attn.forward_windows(torch.randn(1, 16, 8), plan)


def test_attention_family_shares_one_base_and_layers_import_without_cycles():
    """Every attention module is an ``AttentionBase``, and the relative imports between the modules of
    ``vit_backbones/layers`` (lazy ones inside functions included) form no cycle."""
    import ast
    import pathlib

    import vit_backbones.layers as layers
    from vit_backbones.layers.conv_proj import ConvProjectionAttention
    for cls in (layers.Attention, layers.WindowAttention, layers.TalkingHeadAttention, layers.ReAttention,
                layers.SpatialReductionAttention, ConvProjectionAttention):
        assert issubclass(cls, layers.AttentionBase), cls
    folder = pathlib.Path(layers.__file__).parent
    graph = {}
    for path in folder.glob('*.py'):
        if path.stem == '__init__':
            continue
        graph[path.stem] = {node.module.split('.')[0] for node in ast.walk(ast.parse(path.read_text()))
                            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    assert 'window_attention' in graph['attention'] and 'attention' not in graph['window_attention']

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n, ))) for n in graph.get(start, ()))

    cycles = sorted(m for m in graph if reaches(m, m))
    assert not cycles, cycles


def test_eval_bias_caches_follow_the_weights():
    """Eval reuses the relative-position bias and the SDPA masks built from it (one per block and size);
    an in-place change of a table (optimizer step, load_state_dict), a new dtype or a new size must give
    what a model without any cache gives."""
    from vit_backbones.layers.window_attention import _SDPA_BIAS
    torch.manual_seed(0)
    arch = {'base': 'tiny', 'embed_dims': 24, 'depths': (2, 2, 2, 2), 'num_heads': (1, 2, 3, 4)}
    model = vit_backbones.build_backbone('Swin', arch).eval()
    x = torch.randn(1, 3, 97, 131)

    def fresh(m, inp):  # the same weights, nothing cached
        clone = vit_backbones.build_backbone('Swin', arch).eval().to(next(m.parameters()).dtype)
        clone.load_state_dict(m.state_dict())
        _SDPA_BIAS.clear()
        with torch.no_grad():
            return clone(inp)

    with torch.no_grad():
        model(x)
        assert _SDPA_BIAS.entries  # something was cached
        first = model(x)
    assert all(torch.equal(a, b) for a, b in zip(first, fresh(model, x)))
    with torch.no_grad():
        model(x)
        for name, p in model.named_parameters():
            if name.endswith('relative_position_bias_table'):
                p.add_(torch.randn_like(p))  # in place, as an optimizer step
        after = model(x)
    ref = fresh(model, x)
    assert all(torch.equal(a, b) for a, b in zip(after, ref))
    assert not all(torch.equal(a, b) for a, b in zip(after, first))
    model.double()
    x64 = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    with torch.no_grad():
        model(x64)
        out = model(x64)
    assert all(torch.equal(a, b) for a, b in zip(out, fresh(model, x64)))


def test_inference_linear_equals_the_layer_and_steps_aside_for_autograd_and_hooks():
    """oneDNN's fused linear (+ exact GELU) without autograd equals the layer (+ F.gelu); gradients,
    subclasses and hooks take the layer itself; cast weights follow in-place changes."""
    from vit_backbones.layers.linear import inference_linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40)
    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        for gelu in (False, True):
            ref = lin(x.double().float())
            ref = F.gelu(ref) if gelu else ref
            out = inference_linear(x, lin, gelu=gelu)
            assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
            with torch.autocast('cpu', dtype=torch.bfloat16):
                ref16 = lin(x)
                ref16 = F.gelu(ref16.float()) if gelu else ref16.float()  # GELU of the bf16 product, in fp32
                out16 = inference_linear(x, lin, gelu=gelu)
            assert out16.dtype == torch.bfloat16
            assert torch.allclose(out16.float(), ref16, atol=0.05, rtol=0.02)
        lin.weight.mul_(2)  # in place: the cached bf16 weights must follow
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert torch.allclose(inference_linear(x, lin).float(), lin(x).float(), atol=0.05, rtol=0.02)
        calls = []
        handle = lin.register_forward_hook(lambda *a: calls.append(1))
        inference_linear(x, lin)
        handle.remove()
        assert calls == [1]  # a hook still sees the call
    y = inference_linear(x.requires_grad_(), lin, gelu=True)
    y.sum().backward()  # with autograd: the layer and F.gelu, differentiable
    assert x.grad is not None and lin.weight.grad is not None


def test_packed_inference_weights_give_the_plain_weights_numbers_and_survive_copies():
    """Under autocast the cast weights are kept packed in oneDNN's layout: bit for bit the product of the
    plain bf16 weights (with GELU fused too), refreshed after an in-place change, and a module that holds
    them can still be deep-copied and pickled (the copy derives its own on its first call)."""
    import copy
    import pickle
    from vit_backbones.layers import linear as lin_mod
    if lin_mod._REORDER is None or not lin_mod.onednn_usable(torch.zeros(1), torch.bfloat16):
        pytest.fail('this torch has no oneDNN linear-weight packing on CPU; the packed path is untested')
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 72)
    x = torch.randn(2, 9, 48)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        for gelu in (False, True):
            out = lin_mod.inference_linear(x, lin, gelu=gelu)
            kept = lin.__dict__['_vb_derived_weights'].value[0]
            assert kept.is_mkldnn  # packed, not a plain bf16 copy
            plain = lin_mod._ONEDNN_LINEAR(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16(),
                                           'gelu' if gelu else 'none', [], 'none' if gelu else '')
            assert torch.equal(out, plain)
        lin.weight.mul_(-1)
        assert torch.equal(lin_mod.inference_linear(x, lin), lin_mod._ONEDNN_LINEAR(
            x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16(), 'none', [], ''))
        for twin in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin))):
            assert twin.__dict__['_vb_derived_weights'].value is None
            assert torch.equal(lin_mod.inference_linear(x, twin), lin_mod.inference_linear(x, lin))


@pytest.mark.parametrize('columns', [16, 160])
def test_float32_gradient_matmuls_equal_the_float64_products(columns):
    """The training linears' gradient products (input gradient g @ W through a transposed view of W, weight
    gradient g.T @ x on either side of WEIGHT_GRAD_MIN_COLUMNS) equal the float64 products to float32
    rounding, for contiguous operands and for the strided views the backward passes."""
    from vit_backbones.layers.linear import WEIGHT_GRAD_MIN_COLUMNS, matmul_nn, matmul_tn
    assert 16 < WEIGHT_GRAD_MIN_COLUMNS <= 160  # both branches are exercised
    torch.manual_seed(0)
    g = torch.randn(300, 48)
    x = torch.randn(300, columns)
    w = torch.randn(48, columns)
    for gg in (g, torch.randn(48, 300).t()):  # contiguous, and a transposed view
        ref_tn = gg.double().t() @ x.double()
        assert (matmul_tn(gg, x).double() - ref_tn).abs().max() < 1e-5 * ref_tn.abs().max()
        ref_nn = gg.double() @ w.double()
        assert (matmul_nn(gg, w).double() - ref_nn).abs().max() < 1e-5 * ref_nn.abs().max()


def test_float32_training_linears_give_autograds_gradients():
    """The fp32 training path (oneDNN product and input gradient, mm for the weight gradient) and the MLP's
    training function give the values and gradients of plain autograd through F.linear / F.gelu, in
    float64 (the reference) within float32 rounding."""
    from vit_backbones.layers import Mlp
    from vit_backbones.layers.linear import inference_linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40)
    mlp = Mlp(24, 56)
    x = torch.randn(3, 7, 24, requires_grad=True)
    for fn, params in ((lambda t: inference_linear(t, lin), list(lin.parameters())), (mlp, list(mlp.parameters()))):
        out = fn(x)
        grads = torch.autograd.grad(out.square().sum(), [x] + params)
        x64 = x.detach().double().requires_grad_()
        p64 = [p.detach().double().requires_grad_() for p in params]
        if fn is mlp:
            ref = F.linear(F.gelu(F.linear(x64, p64[0], p64[1])), p64[2], p64[3])
        else:
            ref = F.linear(x64, p64[0], p64[1])
        ref_grads = torch.autograd.grad(ref.square().sum(), [x64] + p64)
        assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g.double(), r, atol=1e-4, rtol=1e-4), float((g.double() - r).abs().max())


@pytest.mark.parametrize('shape,bias_shape', [((2, 3, 49, 16), (1, 3, 49, 49)),  # windows
                                              ((2, 2, 30, 16), (2, 1, 1, 100)),  # key padding, more keys
                                              ((2, 2, 30, 16), None)])
@pytest.mark.parametrize('slice_bytes', [None, 600])
def test_inference_attention_matches_definition(monkeypatch, shape, bias_shape, slice_bytes):
    """Without autograd on CPU, bfloat16 attention runs the explicit inference kernel (faster there than the
    fused one); it equals the float64 definition within the error the fused kernel makes, also when it works
    a few query rows at a time."""
    dtype = torch.bfloat16
    from vit_backbones.layers import attention_kernel
    from vit_backbones.layers.attention_kernel import _explicit_is_faster
    if slice_bytes:
        monkeypatch.setattr(attention_kernel, 'SLICE_BYTES', slice_bytes)
    g = torch.Generator().manual_seed(0)
    b, h, n, d = shape
    m = bias_shape[-1] if bias_shape else n
    qkv = torch.randn(b, n, 3, h, d, generator=g, dtype=torch.float64)  # strided views, as the layers pass them
    q = qkv[:, :, 0].transpose(1, 2)
    k, v = (torch.randn(b, h, m, d, generator=g, dtype=torch.float64) for _ in range(2))
    bias = None if bias_shape is None else 2 * torch.randn(bias_shape, generator=g, dtype=torch.float64)
    ref = _naive_attention(q, k, v, bias, 0.3)
    args = [t if t is None else t.to(dtype) for t in (q, k, v, bias)]
    with torch.no_grad():
        assert _explicit_is_faster(*args[:3], args[3])
        out = scaled_dot_product(*args, scale=0.3)
        fused = F.scaled_dot_product_attention(*args[:3], attn_mask=args[3], scale=0.3)
    assert out.dtype == dtype and out.shape == ref.shape
    err, err_fused = ((t.double() - ref).abs().max().item() for t in (out, fused))
    assert err < 2 * err_fused + 1e-3 and err < 0.05 * ref.abs().max().item()


def test_attention_kernel_choice():
    """The fused kernel keeps float32 and other dtypes, anything with autograd, and score matrices over the
    memory bound."""
    from vit_backbones.layers.attention_kernel import _explicit_is_faster
    small = torch.randn(1, 2, 49, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert _explicit_is_faster(small, small, small, None)
        for dt in (torch.float32, torch.float64):
            assert not _explicit_is_faster(small.to(dt), small.to(dt), small.to(dt), None)
        huge = torch.empty(64, 16, 1024, 8, dtype=torch.bfloat16)  # a 2 GiB score matrix: sliced
        assert _explicit_is_faster(huge, huge, huge, None)
        huge5 = huge.view(8, 8, 16, 1024, 8)  # a shape the slices do not take: in one piece, so bounded
        assert not _explicit_is_faster(huge5, huge5, huge5, None)
    assert not _explicit_is_faster(small.requires_grad_(), small, small, None)


def test_token_map_is_a_dense_channels_last_view():
    """token_map gives the map of transpose + reshape, as a view of the tokens with dense channels-last
    strides (also for one image, where transpose + reshape gives a batch stride of C), and a dense copy for
    a sliced batch (prefix tokens dropped)."""
    from vit_backbones.layers import token_map
    h, w, c = 3, 5, 4
    for b, p in ((1, 0), (2, 0), (1, 1), (2, 1)):
        x = torch.randn(b, p + h * w, c)
        t = x[:, p:]
        m = token_map(t, (h, w))
        assert torch.equal(m, t.transpose(1, 2).reshape(b, c, h, w))
        assert m.is_contiguous(memory_format=torch.channels_last)
        assert m.stride() == (h * w * c, 1, w * c, c) or (b == 1 and m.stride()[1:] == (1, w * c, c)
                                                          and m.stride(0) >= h * w * c)
        assert (m.data_ptr() == t.data_ptr()) == (b == 1 or p == 0)  # a view unless a sliced batch
    with pytest.raises(ValueError, match='does not match the grid'):
        token_map(torch.randn(1, 14, c), (h, w))


def test_inference_conv_fuses_gelu_like_the_layer():
    """oneDNN's conv + exact GELU (PVT v2's dwconv, no autograd) equals F.gelu(conv(x)) on a channels-last
    token map, in float32 against float64 and in bfloat16 under autocast; with autograd or a hook it is
    the layer itself; the cast weights follow in-place changes; the MLP with dwconv gives its chain."""
    from vit_backbones.layers import Mlp, token_map
    from vit_backbones.layers.linear import inference_conv
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, 1, 1, groups=16)
    x = token_map(torch.randn(2, 5 * 6, 16), (5, 6))
    ref64 = F.gelu(F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 1, 1, 1, 16))
    with torch.no_grad():
        out = inference_conv(x, conv, gelu=True)
        assert out.dtype == torch.float32 and (out.double() - ref64).abs().max() < 1e-5
        assert torch.equal(inference_conv(x, conv), conv(x))  # nothing to fuse: the layer
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out16 = inference_conv(x, conv, gelu=True)
        assert out16.dtype == torch.bfloat16 and (out16.double() - ref64).abs().max() < 0.03
        conv.weight.mul_(2)
        ref64 = F.gelu(F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 1, 1, 1, 16))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert (inference_conv(x, conv, gelu=True).double() - ref64).abs().max() < 0.06
        calls = []
        handle = conv.register_forward_hook(lambda *a: calls.append(1))
        inference_conv(x, conv, gelu=True)
        handle.remove()
        assert calls == [1]
    y = inference_conv(x.requires_grad_(), conv, gelu=True)
    y.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    mlp = Mlp(8, 16, dwconv=True).eval()
    t = torch.randn(2, 5 * 6, 8)
    with torch.no_grad():
        chain = mlp.fc2(mlp.act(mlp.dwconv(mlp.fc1(t).transpose(1, 2).reshape(2, 16, 5, 6)).flatten(2).transpose(1, 2)))
        assert torch.allclose(mlp(t, (5, 6)), chain, atol=1e-6)


@pytest.mark.parametrize('bias_kind', ['none', 'learned'])
def test_bfloat16_training_attention_matches_definition(bias_kind):
    """bfloat16 attention with autograd takes the sliced explicit kernel (faster than the fused forward +
    backward there); its values and q/k/v (and learned bias) gradients equal the float64 definition's within
    a small multiple of the fused kernel's own bfloat16 error. Score tensors over the bound keep the fused
    kernel; so does no autograd (the inference path decides)."""
    from vit_backbones.layers.attention_kernel import EXPLICIT_TRAIN_MAX_BYTES, _explicit_trains_faster
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 30, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = None if bias_kind == 'none' else torch.randn(3, 30, 30, generator=g, dtype=torch.float64)
    w = torch.randn(2, 3, 30, 16, generator=g, dtype=torch.float64)
    ref_leaves = [q, k, v] + ([bias.requires_grad_()] if bias is not None else [])
    ref = _naive_attention(q, k, v, bias, 0.3)
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_leaves)
    leaves = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    if bias is not None:
        leaves.append(bias.detach().float().requires_grad_())  # a float32 table, as under autocast
    b16 = leaves[3] if bias is not None else None
    assert _explicit_trains_faster(*leaves[:3], b16)
    results = []
    for fn in (scaled_dot_product, F.scaled_dot_product_attention):
        out = fn(*leaves[:3], b16 if fn is scaled_dot_product or b16 is None else b16.bfloat16(), scale=0.3)
        grads = torch.autograd.grad((out.double() * w).sum(), leaves)
        assert all(gr.dtype == t.dtype for gr, t in zip(grads, leaves))
        results.append([(out.double() - ref).abs().max().item()] +
                       [(a.double() - b).abs().max().item() for a, b in zip(grads, ref_grads)])
    ours, fused = results
    scales = [ref.abs().max().item()] + [t.abs().max().item() for t in ref_grads]
    for e, f, s in zip(ours, fused, scales):
        assert e < 3 * f + 1e-3 and e < 0.03 * s
    rows = EXPLICIT_TRAIN_MAX_BYTES // (2 * 64 * 64) + 1  # one (rows, 64, 64) score tensor over the bound
    many = torch.randn(rows, 1, 64, 8, dtype=torch.bfloat16, requires_grad=True)
    assert not _explicit_trains_faster(many, many, many)
    with torch.no_grad():
        assert not _explicit_trains_faster(*leaves[:3])


@pytest.mark.parametrize('slice_bytes', [10**9, 3 * 37 * 37 * 8, 2 * 37 * 37 * 8, 16 * 37 * 8])
@pytest.mark.parametrize('bias_shape', [None, (3, 37, 37), (2, 1, 1, 37), (2, 3, 37, 37), (3, 37, 1)])
def test_sliced_attention_is_exact(monkeypatch, slice_bytes, bias_shape):
    """The sliced explicit kernel in float64 equals the definition (values and every gradient),
    whether its slices are whole images, heads of one image or query rows of one head, for a bias shared
    across images, a key-padding bias, a full one and one broadcast over the keys; v may be wider than q
    and k (LeViT)."""
    from vit_backbones.layers import attention_kernel as ak
    monkeypatch.setattr(ak, 'SLICE_BYTES', slice_bytes)
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(2, 3, 37, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 3, 37, 24, generator=g, dtype=torch.float64, requires_grad=True)
    bias = None if bias_shape is None else torch.randn(bias_shape, generator=g, dtype=torch.float64,
                                                       requires_grad=True)
    expected_slices = {10**9: 1, 3 * 37 * 37 * 8: 2, 2 * 37 * 37 * 8: 4, 16 * 37 * 8: 18}[slice_bytes]
    assert len(ak._slices(2, 3, 37, 37, 8)) == expected_slices
    leaves = [t for t in (q, k, v, bias) if t is not None]
    out = ak._SlicedAttention.apply(q, k, v, bias, 0.3)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    ref = _naive_attention(q, k, v, bias, 0.3)
    for a, b in zip(torch.autograd.grad((out * w).sum(), leaves), torch.autograd.grad((ref * w).sum(), leaves)):
        assert torch.allclose(a, b, atol=1e-12)
    assert torch.allclose(out, ref, atol=1e-12)


@pytest.mark.parametrize('m', [49, 100])
def test_inplace_softmax_matches_float64(m):
    """softmax_ (bfloat16 rows of few keys through the float32 kernel, slice by slice) equals the float64
    softmax rounded once to bfloat16, for every slice (more rows than one slice holds)."""
    from vit_backbones.layers.attention_kernel import softmax_
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(2**18 // (49 * m) * 2 + 3, 49, m, generator=g)).bfloat16()
    ref = torch.softmax(s.double(), -1)
    out = softmax_(s.clone())
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref).abs() <= 2**-8 * ref + 1e-6).all()  # rounded once: within one bf16 step
    assert torch.allclose(out.double().sum(-1), torch.ones(s.shape[:-1], dtype=torch.float64), atol=0.02)


def test_quick_gelu_mlp_inference_equals_the_chain():
    """CvT's MLP with QuickGELU in inference (fc1 scaled into oneDNN's swish, fc2 scaled back) equals the
    float64 chain fc2(QuickGELU(fc1(x))), in float32 and under bf16 autocast; the cached scaled weights follow
    in-place changes; with autograd it is the module chain itself (gradients flow)."""
    from vit_backbones.layers.mlp import Mlp, QuickGELU
    torch.manual_seed(0)
    mlp = Mlp(24, 96, act_layer=QuickGELU).eval()
    x = torch.randn(3, 7, 24)

    def chain64():
        h = F.linear(x.double(), mlp.fc1.weight.double(), mlp.fc1.bias.double())
        return F.linear(h * torch.sigmoid(1.702 * h), mlp.fc2.weight.double(), mlp.fc2.bias.double())

    with torch.no_grad():
        ref = chain64()
        assert (mlp(x).double() - ref).abs().max() < 1e-5
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out16 = mlp(x)
        assert out16.dtype == torch.bfloat16 and (out16.double() - ref).abs().max() < 0.02 * ref.abs().max()
        mlp.fc1.weight.mul_(-1)
        mlp.fc2.bias.add_(1)
        assert (mlp(x).double() - chain64()).abs().max() < 1e-5
    y = mlp(x.requires_grad_())
    y.sum().backward()
    assert x.grad is not None and mlp.fc1.weight.grad is not None
    assert (y.double() - chain64()).abs().max() < 1e-5


def _random_bn(bn):
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.3, 3.)
        bn.weight.normal_(1., 0.3)
        bn.bias.normal_(0., 0.3)
    return bn.eval()


@pytest.mark.parametrize('act', [None, 'hardswish', 'gelu'])
def test_batchnorm_folded_into_linear_and_conv_equals_the_chain(act):
    """An eval-mode BatchNorm folded into the linear / convolution before it (one oneDNN call with the activation
    applied to the accumulator) gives act(bn(layer(x))) against float64, in float32 and under bf16 autocast;
    the folded weights follow in-place changes of the running statistics; a training-mode BatchNorm, autograd,
    an activation oneDNN cannot apply, or a hook on the BatchNorm leave the call to the modules (None)."""
    from vit_backbones.layers.linear import inference_conv_bn, inference_linear_bn
    torch.manual_seed(0)
    act_mod = {None: None, 'hardswish': torch.nn.Hardswish(), 'gelu': torch.nn.GELU()}[act]
    act_fn = {None: lambda t: t, 'hardswish': F.hardswish, 'gelu': F.gelu}[act]
    lin, bn1 = torch.nn.Linear(24, 40), _random_bn(torch.nn.BatchNorm1d(40))
    conv, bn2 = torch.nn.Conv2d(6, 10, 3, 2, 1, bias=False), _random_bn(torch.nn.BatchNorm2d(10))
    dw, bn3 = torch.nn.Conv2d(10, 10, 3, 2, 1, groups=10, bias=False), _random_bn(torch.nn.BatchNorm2d(10))
    x, img, fmap = torch.randn(3, 7, 24), torch.randn(2, 6, 11, 13), torch.randn(2, 10, 9, 8)

    def ref64(kind):
        if kind == 'linear':
            y = F.linear(x.double(), lin.weight.double(), lin.bias.double()).transpose(1, 2)
            bn, y2 = bn1, None
        else:
            layer, bn, inp = (conv, bn2, img) if kind == 'conv' else (dw, bn3, fmap)
            y = F.conv2d(inp.double(), layer.weight.double(), None, layer.stride, layer.padding, 1, layer.groups)
        y2 = F.batch_norm(y, bn.running_mean.double(), bn.running_var.double(), bn.weight.double(),
                          bn.bias.double(), False, 0., bn.eps)
        y2 = act_fn(y2)
        return y2.transpose(1, 2) if kind == 'linear' else y2

    calls = {'linear': lambda: inference_linear_bn(x, lin, bn1, act_mod),
             'conv': lambda: inference_conv_bn(img, conv, bn2, act_mod),
             'dw': lambda: inference_conv_bn(fmap, dw, bn3, act_mod)}
    with torch.no_grad():
        for kind, call in calls.items():
            out = call()
            assert out.dtype == torch.float32 and (out.double() - ref64(kind)).abs().max() < 1e-5, kind
            with torch.autocast('cpu', dtype=torch.bfloat16):
                out16 = call()
            assert out16.dtype == torch.bfloat16
            assert ((out16.double() - ref64(kind)).abs().max() / ref64(kind).abs().max()) < 0.02, kind
        for bn in (bn1, bn2, bn3):  # in place, as a training step's running-statistics update does
            bn.running_mean.add_(0.7)
            bn.running_var.mul_(1.5)
        for kind, call in calls.items():
            assert (call().double() - ref64(kind)).abs().max() < 1e-5, kind
        bn1.train()
        assert inference_linear_bn(x, lin, bn1, act_mod) is None  # batch statistics: nothing to fold
        bn1.eval()
        assert inference_linear_bn(x, lin, bn1, torch.nn.SiLU()) is None
        handle = bn2.register_forward_hook(lambda *a: None)
        assert inference_conv_bn(img, conv, bn2, act_mod) is None
        handle.remove()
    assert inference_linear_bn(x.requires_grad_(), lin, bn1, act_mod) is None
    assert inference_conv_bn(img, conv.requires_grad_(), bn2, act_mod) is None


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_leff_with_folded_batchnorms_equals_its_modules(monkeypatch, dtype):
    """CeiT's LeFF with eval-mode BatchNorms (eval, or frozen statistics in training) folds each into its
    convolution (GELU fused without autograd): outputs and the input / parameter gradients equal running the
    convolutions, BatchNorms and activations one by one."""
    from vit_backbones.layers import linear as lin_mod
    from vit_backbones.layers.leff import LocallyEnhancedFeedForward
    torch.manual_seed(0)
    leff = LocallyEnhancedFeedForward(8, 24).to(dtype)
    for bn in (leff.bn1, leff.bn2, leff.bn3):
        _random_bn(bn)
    x = torch.randn(2, 1 + 5 * 6, 8, dtype=dtype)
    w = torch.linspace(-1, 1, x.numel(), dtype=dtype).view(x.shape)

    def run():
        xi = x.clone().requires_grad_()
        (leff(xi, (5, 6)) * w).sum().backward()
        grads = [xi.grad] + [p.grad.clone() for p in leff.parameters()]
        leff.zero_grad(set_to_none=True)
        with torch.no_grad():
            return leff(x, (5, 6)), grads

    out, grads = run()
    for name in ('foldable', 'inference_conv_bn'):
        monkeypatch.setattr(lin_mod, name, lambda *a: None)
    ref, ref_grads = run()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert (out - ref).abs().max() <= tol * ref.abs().max()
    scale = max(g.abs().max() for g in ref_grads)
    assert all((g - r).abs().max() <= tol * scale for g, r in zip(grads, ref_grads))
    assert all(not bn.training for bn in (leff.bn1, leff.bn2, leff.bn3))
