"""Every backbone exports once with dynamic batch, H and W (torch.onnx.export(dynamo=True), which runs
torch.export.export) and its ONNX graph, run in onnxruntime, and its torch.export program match eager at
sizes that divide nothing; torch.jit.trace / the TorchScript ONNX exporter either refuse or are right.

The models are small variants (fewer blocks, narrower Swin/Shuffle) so that twelve exports fit in CI;
they run the code paths of the full models (padded windows at every stage, shifted and shuffled ones
in the last, shrink attention with resampled biases, prefix tokens, spatial reduction, pyramids).
Export runs with gradients enabled, as a user calling it on an eval model does.
"""
import importlib.util
import io
import os

import pytest
import torch

import vit_backbones
from vit_backbones.layers.tracing import StaticTraceError, fixed_size_trace


def onnxruntime():
    """onnxruntime: the ``export`` extra (onnx, onnxruntime, onnxscript) is part of the test install
    (``tools/install.sh``), so a missing one fails here with its ImportError instead of skipping."""
    import onnx  # noqa: F401
    import onnxscript  # noqa: F401
    import onnxruntime as ort
    return ort


_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools', 'export.py')

#: small variants of every backbone (the smallest released one, fewer blocks)
TEST_ARCH = {
    'Swin': {'base': 'tiny', 'embed_dims': 48, 'depths': (1, 1, 1, 2), 'num_heads': (2, 4, 8, 16)},
    'ShuffleTransformer': {'base': 'tiny', 'embed_dims': 48, 'depths': (1, 1, 1, 2), 'num_heads': (2, 4, 8, 16)},
    'PVT': {'base': 'tiny', 'depths': (1, 1, 1, 1)},
    'PVTv2': {'base': 'b0', 'depths': (1, 1, 1, 1)},
    'CvT': {'base': '13', 'depths': (1, 1, 1)},
    'LeViT': {'base': '128s', 'depths': (1, 1, 1)},
    'ViT': {'base': 'tiny', 'depth': 2},
    'DeiT': {'base': 'tiny-distilled', 'depth': 2},
    'CaiT': {'base': 'xxs24', 'depth': 2},
    'DeepViT': {'base': '16b', 'depth': 2, 'reattn_blocks': 2},
    'CPVT': {'base': 'tiny', 'depth': 2},
    'CeiT': {'base': 'tiny', 'depth': 2},
}
#: (batch, H, W) checked in onnxruntime and in the torch.export program; the export traces 1x3x224x224
SIZES = [(1, 224, 224), (2, 256, 320), (1, 333, 517)]


def export_tool():
    spec = importlib.util.spec_from_file_location('vb_export_tool', _TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return vit_backbones.build_backbone(name, TEST_ARCH[name]).eval()


def _rel(ref, out) -> float:
    scale = max(float(r.abs().max()) for r in ref)
    return max(float((torch.as_tensor(o) - r).abs().max()) for r, o in zip(ref, out)) / scale


def test_every_backbone_has_a_test_variant():
    assert sorted(TEST_ARCH) == vit_backbones.list_backbones()


@pytest.mark.parametrize('name', vit_backbones.list_backbones())
def test_dynamic_onnx_export_matches_eager(name, tmp_path):
    ort = onnxruntime()
    tool = export_tool()
    model = build(name)
    path = str(tmp_path / f'{name}.onnx')
    program = tool.export_onnx(model, torch.randn(1, 3, 224, 224), path, optimize=False)[1]  # tool test: optimised
    assert tool.onnx_input_dims(path) == ['batch', 3, 'height', 'width']  # symbolic batch, H and W
    lo = tool.export_min_size(model)
    ranges = sorted((int(r.lower), int(r.upper)) for r in program.exported_program.range_constraints.values())
    assert ranges[:3] == [(1, 256), (lo, 4096), (lo, 4096)], ranges  # the graph holds for all of them
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    module = program.exported_program.module()
    for b, h, w in SIZES + [(1, lo, lo + 7)]:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            ref = model(x)
            exported = module(x)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert [tuple(g.shape) for g in got] == [tuple(r.shape) for r in ref]
        assert _rel(ref, got) < 1e-4, (name, (b, h, w), _rel(ref, got))
        assert _rel(ref, exported) < 1e-5, (name, (b, h, w), _rel(ref, exported))


@pytest.mark.parametrize('name', vit_backbones.list_backbones())
def test_jit_trace_refuses_or_is_right_at_other_sizes(name):
    """No silent errors: a trace at 224x224 either raises (a size-dependent decision would become a
    constant) with a message pointing at the dynamic exporters, or is right at other sizes."""
    model = build(name)
    try:
        traced = torch.jit.trace(model, torch.randn(1, 3, 224, 224), check_trace=False)
    except StaticTraceError as e:
        assert 'torch.export.export' in str(e) and 'dynamo=True' in str(e)
        return
    for hw in ((256, 320), (333, 517)):
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            assert _rel(model(x), traced(x)) < 1e-5


def test_legacy_onnx_export_refuses_swin_and_fixed_size_trace_opts_in():
    onnxruntime()  # the TorchScript exporter needs onnx
    model = build('Swin')
    with pytest.raises(StaticTraceError, match='dynamo=True'):
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224), ), io.BytesIO(), dynamo=False)
    x = torch.randn(1, 3, 224, 224)
    with fixed_size_trace(), torch.no_grad():
        traced = torch.jit.trace(model, x)
    with torch.no_grad():
        assert _rel(model(x), traced(x)) < 1e-5  # valid at the traced size (the only one it promises)


def test_legacy_onnx_export_of_pvtv2_is_right_at_other_sizes(tmp_path):
    """PVT v2 makes no size-dependent Python decision (overlapping patch embeddings never pad): the
    TorchScript exporter with dynamic axes gives a graph that is right at other sizes."""
    ort = onnxruntime()
    model = build('PVTv2')
    path = str(tmp_path / 'pvtv2_legacy.onnx')
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224), ), path, dynamo=False, input_names=['x'],
                      dynamic_axes={'x': {0: 'b', 2: 'h', 3: 'w'}})
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    x = torch.randn(2, 3, 333, 517)
    with torch.no_grad():
        assert _rel(model(x), session.run(None, {'x': x.numpy()})) < 1e-4


def test_export_tool_end_to_end_and_argument_errors(tmp_path, capsys):
    onnxruntime()
    tool = export_tool()
    out, pt2 = str(tmp_path / 'pvtv2.onnx'), str(tmp_path / 'pvtv2.pt2')
    arch = '{"base": "b0", "depths": [1, 1, 1, 1]}'
    assert tool.main(['PVTv2', '--arch', arch, '--out', out, '--pt2', pt2, '--check-size', '97x203,64x80', '--repeats', '1']) == 0
    text = capsys.readouterr().out
    assert "['batch', 3, 'height', 'width']" in text and 'parity at 97x203' in text and 'onnxruntime' in text
    assert 'parity at 64x80' in text and 'time per forward at 64x80' in text
    assert os.path.exists(out) and os.path.exists(pt2)
    loaded = torch.export.load(pt2).module()  # the saved program runs at another size
    x = torch.randn(1, 3, 80, 96)
    assert [tuple(o.shape) for o in loaded(x)] == [(1, 32, 20, 24), (1, 64, 10, 12), (1, 160, 5, 6), (1, 256, 3, 3)]
    for argv, message in ((['ResNet50'], 'unknown backbone'), (['Swin', '--arch', 'huge'], 'cannot build Swin'),
                          (['Swin', '--check-size', '333by517'], '--check-size must be HxW'),
                          (['Swin', '--check-size', '16x16'], 'outside the exported range'),
                          (['Swin', '--check-size', '224x224,16x16'], 'outside the exported range'),
                          (['all', '--arch', 'tiny'], 'one class-default variant per backbone'),
                          (['Swin', '--checkpoint', str(tmp_path / 'missing.pth')], 'does not exist'),
                          (['Swin', '--arch', '{"base": tiny}'], 'does not parse')):
        assert tool.main(argv + ['--out', str(tmp_path / 'x.onnx')]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith('error: ') and message in err, (argv, err)
    with pytest.raises(SystemExit):
        tool.main(['--no-such-flag'])
