"""torch.compile(model, dynamic=True): no graph break in any backbone's forward and one graph for every
input size, also for a training step (forward + backward) of Swin, PVT v2 and ViT.

Graph breaks and recompilations are decided by dynamo, not by the code generator, so the graphs are
counted with the 'eager' backend (and 'aot_eager' for the training step, which also traces the backward
through AOT autograd); inductor's compile time and speed are measured in the README, not here.
``fullgraph=True`` turns any graph break into an error. The first call is at a non-square size: a square
first call makes dynamo assume H == W ("duck sizing"), which costs one recompilation at the first
non-square input (set ``torch.fx.experimental._config.use_duck_shape = False`` to avoid it).
"""
import itertools

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import vit_backbones
from vit_backbones.layers import WindowAttention
from vit_backbones.layers.window import get_window_plan, key_padding_mask, shift_mask

from test_export import TEST_ARCH, build

#: four input sizes (the first one non-square): Swin's last stage has 2 windows at the first, 1 at the others
SIZES = [(256, 320), (224, 224), (97, 131), (72, 66)]
#: training steps: smaller, fewer cells to differentiate through
TRAIN_SIZES = [(128, 160), (96, 96), (97, 131), (72, 66)]


class GraphCounter:
    """A compile backend that counts the graphs dynamo hands over (each recompilation is one more)."""

    def __init__(self, backend: str = 'eager'):
        self.graphs = 0
        self.backend = backend

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        if self.backend == 'eager':
            return gm.forward
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize('name', vit_backbones.list_backbones())
def test_eval_forward_compiles_to_one_graph_for_every_size(name):
    model = build(name)
    counter = GraphCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for hw in SIZES:
            x = torch.randn(2, 3, *hw)
            out, ref = compiled(x), model(x)
            assert all(torch.allclose(o, r, atol=1e-5, rtol=1e-4) for o, r in zip(out, ref))
    assert counter.graphs == 1, f'{name}: {counter.graphs} graphs for {len(SIZES)} sizes (recompilations)'
    assert not counters['graph_break'], dict(counters['graph_break'])


@pytest.mark.parametrize('name,backend', [('Swin', 'eager'), ('PVTv2', 'eager'), ('ViT', 'aot_eager')])
def test_training_step_compiles_to_one_graph_with_eager_gradients(name, backend):
    """Forward + backward in training mode (dropout, BatchNorm statistics). 'aot_eager' also traces the
    backward graph (AOT autograd); 'eager' (faster, for CI time) runs autograd on dynamo's forward graph."""
    torch.manual_seed(0)
    model = vit_backbones.build_backbone(name, TEST_ARCH[name], drop_path_rate=0.).train()
    counter = GraphCounter(backend)
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    params = [p for p in model.parameters() if p.requires_grad]
    for hw in TRAIN_SIZES:
        x = torch.randn(2, 3, *hw)
        grads = []
        for fn in (compiled, model):
            loss = sum(o.float().square().mean() for o in fn(x))
            grads.append(torch.autograd.grad(loss, params))
        # other operation orders (no training autograd Functions): compare on the scale of all gradients
        scale = max(float(g.abs().max()) for g in grads[1])
        assert max(float((a - b).abs().max()) for a, b in zip(*grads)) <= 1e-4 * scale
    # AOT autograd may hand the first frame over twice (a restart); later sizes must add nothing
    assert counter.graphs <= 2, f'{name}: {counter.graphs} graphs'
    assert counters['stats']['unique_graphs'] == 1
    assert not counters['graph_break'], dict(counters['graph_break'])


@pytest.mark.parametrize('hw,shift,shuffled', [((9, 13), 3, False), ((7, 7), 3, False), ((5, 16), 0, True),
                                               ((14, 14), 0, True), ((9, 13), 0, False)])
def test_traced_window_attention_equals_eager_with_gradients(hw, shift, shuffled):
    """The graph's window attention (gathers into (B, heads*nW, N, d), masks per query slot) is the eager
    one, values and gradients, float64."""
    torch.manual_seed(0)
    for qkv_bias in (True, False):
        attn = WindowAttention(24, 3, (7, 7), qkv_bias=qkv_bias).double()
        x = torch.randn(2, hw[0] * hw[1], 24, dtype=torch.float64, requires_grad=True)
        w = hw[1]

        def attend(x):
            plan = get_window_plan((x.shape[1] // w, w), (7, 7), (shift, shift), x.device, shuffled)
            mask = shift_mask(plan, torch.float64) if shift else (
                key_padding_mask(plan, torch.float64) if shuffled else None)
            return attn(x, plan, mask)

        leaves = [x, attn.rel_pos.relative_position_bias_table]
        ref = attend(x)
        ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
        torch._dynamo.reset()
        out = torch.compile(attend, backend='eager', dynamic=True, fullgraph=True)(x)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        assert torch.allclose(out, ref, atol=1e-12)
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, ref_grads))


def test_traced_levit_bias_equals_eager_crop_and_resample():
    from vit_backbones.layers.attention_bias import (gather_offset_bias, offset_bias_index, resize_offset_bias_table,
                                                     traced_offset_bias)
    torch.manual_seed(0)
    for mode, (th, tw) in itertools.product(('bicubic', 'bilinear'), ((14, 14), (7, 7), (4, 4))):
        table = torch.randn(4, th * tw)
        for kv, stride in itertools.product(((14, 14), (5, 9), (20, 3), (1, 1), (30, 31)), (1, 2)):
            q = ((kv[0] + stride - 1) // stride, (kv[1] + stride - 1) // stride)
            ref = gather_offset_bias(resize_offset_bias_table(table, (th, tw), kv, mode), kv,
                                     offset_bias_index(q, kv, stride))
            out = traced_offset_bias(table, (th, tw), q, kv, stride, mode)
            if kv[0] <= th and kv[1] <= tw:
                assert torch.equal(out, ref)  # the learned values themselves
            else:
                assert torch.allclose(out, ref, atol=3e-5), float((out - ref).abs().max())
