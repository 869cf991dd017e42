"""Issue #5 tools: the feature-extraction API, tools/extract_features.py, tools/convert_checkpoint.py and
tools/model_zoo.py (parameter and GMAC columns against every registered backbone's paper table)."""
import importlib.util
import json
import math
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch

import vit_backbones
from vit_backbones import FeatureExtractor, data_config, extract_features, get_backbone_class, list_backbones

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SWIN = dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
VIT = dict(embed_dims=32, depth=4, num_heads=2, mlp_ratio=4.)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _tool(name):
    spec = importlib.util.spec_from_file_location(f'_tool_{name}', osp.join(ROOT, 'tools', f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_image(path, h, w, seed):
    from PIL import Image
    rng = np.random.default_rng(seed)
    # smooth gradients plus noise: something a PCA picture can show
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], -1) * 200
    arr = np.clip(base + rng.integers(0, 55, (h, w, 3)), 0, 255).astype(np.uint8)
    os.makedirs(osp.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _max_diff(a, b):
    return float((a - b).abs().max())


# ----------------------------------------------------------------------------- API
def test_api_tensor_levels_and_normalisation():
    torch.manual_seed(0)
    ex = FeatureExtractor('Swin', SWIN, drop_path_rate=0.)
    x = torch.rand(2, 3, 70, 90)
    levels = ex(x)
    assert [lv.stride for lv in levels] == [4, 8, 16, 32]
    assert [lv.channels for lv in levels] == [16, 32, 64, 128]
    for lv in levels:
        assert tuple(lv.tensor.shape) == (2, lv.channels, math.ceil(70 / lv.stride), math.ceil(90 / lv.stride))
    # preprocessing = ImageNet mean/std on the [0, 1] image, no resize by default
    with torch.no_grad():
        ref = ex.model((x - IMAGENET_MEAN) / IMAGENET_STD)
    assert max(_max_diff(a, lv.tensor) for a, lv in zip(ref, levels)) < 1e-6


def test_api_image_file_checkpoint_and_resize_policy(tmp_path):
    torch.manual_seed(0)
    src = vit_backbones.build_backbone('Swin', SWIN, drop_path_rate=0.)
    ckpt = str(tmp_path / 'w.pth')
    torch.save({'state_dict': src.state_dict()}, ckpt)
    arr = _write_image(str(tmp_path / 'img.png'), 45, 61, 0)
    # one call: name, variant, checkpoint, image file
    levels = extract_features('Swin', str(tmp_path / 'img.png'), arch=SWIN, checkpoint=ckpt, drop_path_rate=0.)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        ref = src.eval()((x - IMAGENET_MEAN) / IMAGENET_STD)
    assert [tuple(lv.tensor.shape[-2:]) for lv in levels] == [(12, 16), (6, 8), (3, 4), (2, 2)]
    assert max(_max_diff(a, lv.tensor) for a, lv in zip(ref, levels)) < 1e-5  # the checkpoint was loaded
    # short side to 64, aspect kept: 45x61 -> 64x87 (61 * 64 / 45 = 86.8)
    ex = FeatureExtractor('Swin', SWIN, short_side=64)
    assert ex.preprocess(str(tmp_path / 'img.png')).shape[-2:] == (64, 87)
    assert [tuple(lv.tensor.shape[-2:]) for lv in ex(str(tmp_path / 'img.png'))] == [(16, 22), (8, 11), (4, 6),
                                                                                      (2, 3)]
    # with a cap on the long side (mmdet's 800/1333 rule): 45x61 short 64 capped at 80 -> 59x80
    assert FeatureExtractor('Swin', SWIN, short_side=64, max_size=80).preprocess(arr).shape[-2:] == (59, 80)
    # the classification setting: the pre-training square
    assert FeatureExtractor('Swin', SWIN, short_side='pretrain').preprocess(arr).shape[-2:] == (224, 224)
    with pytest.raises(ValueError, match='short_side'):
        FeatureExtractor('Swin', SWIN, short_side='big')


def test_data_config_per_model():
    with torch.device('meta'):
        vit384 = vit_backbones.build_backbone('ViT', 'base', img_size=384)
        swin = vit_backbones.build_backbone('Swin', 'tiny')
    assert data_config(vit384)['input_size'] == (3, 384, 384)
    cfg = data_config(swin)
    assert cfg['input_size'] == (3, 224, 224) and cfg['interpolation'] == 'bicubic'
    assert cfg['mean'] == (0.485, 0.456, 0.406) and cfg['std'] == (0.229, 0.224, 0.225)
    for name in list_backbones():  # every registered backbone gets a usable preprocessing
        cfg = data_config(name)
        assert len(cfg['mean']) == 3 and len(cfg['std']) == 3 and len(cfg['input_size']) == 3


def test_api_unreadable_image_error(tmp_path):
    bad = tmp_path / 'bad.jpg'
    bad.write_bytes(b'not an image')
    with pytest.raises(ValueError, match='cannot read image .*bad.jpg'):
        extract_features('Swin', str(bad), arch=SWIN)


# ----------------------------------------------------------------------------- extract_features.py
def test_extract_features_folder_bad_file_resume_and_pictures(tmp_path):
    imgs = tmp_path / 'imgs'
    a = _write_image(str(imgs / 'a.png'), 64, 96, 1)
    b = _write_image(str(imgs / 'sub' / 'b.jpg'), 64, 96, 2)
    _write_image(str(imgs / 'c.png'), 80, 72, 3)
    (imgs / 'broken.jpg').write_bytes(b'\x00garbage')
    out = tmp_path / 'out'
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'extract_features.py'), str(imgs), '--model', 'PVTv2', '--arch',
           'b0', '--out-dir', str(out), '--format', 'pt', 'npz', '--batch-size', '2', '--visualize']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1, res.stderr
    assert 'broken.jpg' in res.stderr and 'cannot read image' in res.stderr
    assert '3 image(s) written' in res.stdout
    written = {osp.relpath(osp.join(d, f), out) for d, _, fs in os.walk(out) for f in fs}
    assert written == {f'{n}.{e}' for n in ('a', 'sub/b', 'c') for e in ('pt', 'npz', 'png')}

    strides, channels = [4, 8, 16, 32], [32, 64, 160, 256]
    for name, (h, w) in [('a', (64, 96)), ('sub/b', (64, 96)), ('c', (80, 72))]:
        rec = torch.load(str(out / f'{name}.pt'), weights_only=True)
        npz = np.load(str(out / f'{name}.npz'))
        assert rec['strides'] == strides and rec['channels'] == channels and rec['model'] == 'PVTv2'
        assert npz['strides'].tolist() == strides and npz['channels'].tolist() == channels
        assert rec['image_size'] == [h, w] and rec['input_size'] == [h, w]
        for i, (s, c) in enumerate(zip(strides, channels)):
            assert tuple(rec['levels'][i].shape) == (c, math.ceil(h / s), math.ceil(w / s))
            assert np.array_equal(npz[f'level_{i}'], rec['levels'][i].numpy())
    # a and b share a size, so they went through one batch of 2: same result as alone through the API
    torch.manual_seed(0)
    ex = FeatureExtractor('PVTv2', 'b0')
    both = ex(torch.stack([torch.from_numpy(a), torch.from_numpy(b)]).permute(0, 3, 1, 2))
    alone = ex(torch.from_numpy(b).permute(2, 0, 1))
    assert max(_max_diff(x.tensor[1:], y.tensor) for x, y in zip(both, alone)) < 1e-4

    # the pictures: 5 panels of 256 px + 6 gaps of 6 px; panel height 256 * h / w, plus a 40 px label strip
    # and two 6 px margins
    from PIL import Image
    for name, (h, w) in [('a', (64, 96)), ('c', (80, 72))]:
        with Image.open(out / f'{name}.png') as im:
            assert im.size == (5 * 256 + 6 * 6, round(256 * h / w) + 40 + 12)
            pix = np.asarray(im.convert('RGB')).astype(float)
        for k in range(5):  # every panel has content (no blank PCA map)
            x0 = 6 + k * 262
            assert pix[50:-10, x0:x0 + 256].std() > 5, (name, k)
    assert Image.open(out / 'a.png').size == _tool('extract_features').expected_png_size(64, 96, 4)

    # second run: the outputs exist, nothing is recomputed, the bad file is still reported
    mtimes = {f: os.path.getmtime(out / f) for f in written}
    ef = _tool('extract_features')
    rc = ef.main([str(imgs), '--model', 'PVTv2', '--arch', 'b0', '--out-dir', str(out), '--format', 'pt', 'npz',
                  '--visualize'])
    assert rc == 1
    assert {f: os.path.getmtime(out / f) for f in written} == mtimes


def test_extract_features_glob_missing_input_and_too_small_image(tmp_path, capsys):
    _write_image(str(tmp_path / 'ok.png'), 40, 48, 4)
    _write_image(str(tmp_path / 'tiny.png'), 20, 20, 5)  # below Swin's total stride (32)
    ef = _tool('extract_features')
    rc = ef.main([str(tmp_path / '*.png'), str(tmp_path / 'nope' / '*.jpg'), '--model', 'Swin', '--arch',
                  json.dumps(SWIN), '--out-dir', str(tmp_path / 'o')])
    err = capsys.readouterr().err
    assert rc == 1
    assert 'tiny.png' in err and 'at least 32x32' in err and 'nope' in err
    assert os.path.isfile(tmp_path / 'o' / 'ok.pt') and not os.path.exists(tmp_path / 'o' / 'tiny.pt')
    assert ef.main(['x.png', '--model', 'NoSuchNet', '--out-dir', str(tmp_path)]) == 2
    assert 'unknown backbone' in capsys.readouterr().err


# ----------------------------------------------------------------------------- convert_checkpoint.py
def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def test_convert_transformers_vit_checkpoint(tmp_path, capsys):
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, image_size=224,
                    patch_size=16, layer_norm_eps=1e-6, qkv_bias=True, num_labels=10)
    hf = _randomize(ViTForImageClassification(cfg)).eval()
    src = str(tmp_path / 'pytorch_model.bin')
    torch.save(hf.state_dict(), src)
    cc = _tool('convert_checkpoint')
    dst = str(tmp_path / 'vit_tiny.pth')
    assert cc.main([src, dst, '--model', 'ViT', '--arch', json.dumps(VIT)]) == 0
    report = capsys.readouterr().out
    assert 'checkpoint format: hf' in report and 'dropped  (classification head): classifier.weight' in report
    assert 'missing  (kept initialisation): pyramid.' in report
    sd = torch.load(dst, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values()) and 'blocks.3.attn.qkv.weight' in sd
    assert not any(k.startswith(('pyramid.', 'classifier')) for k in sd)
    ours = vit_backbones.build_backbone('ViT', VIT, drop_path_rate=0.).eval()
    ours.load_checkpoint(dst)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = hf.vit(x, output_hidden_states=True)
        feats, _ = ours.forward_features(x, taps=range(4))
    expected = list(ref.hidden_states[1:-1]) + [ref.last_hidden_state]
    assert max(_max_diff(a, b) for a, b in zip(expected, feats)) < 1e-4
    # safetensors output holds the same tensors
    assert cc.main([src, str(tmp_path / 'vit_tiny.safetensors'), '--model', 'ViT', '--arch', json.dumps(VIT),
                    '--quiet']) == 0
    from safetensors.torch import load_file
    st = load_file(str(tmp_path / 'vit_tiny.safetensors'))
    assert set(st) == set(sd) and all(torch.equal(st[k], sd[k]) for k in sd)


def test_convert_resizes_position_embedding(tmp_path, capsys):
    src_model = vit_backbones.build_backbone('ViT', VIT, img_size=384)
    torch.save(src_model.state_dict(), tmp_path / 'v384.pth')
    cc = _tool('convert_checkpoint')
    assert cc.main([str(tmp_path / 'v384.pth'), str(tmp_path / 'v224.pth'), '--model', 'ViT', '--arch',
                    json.dumps(VIT)]) == 0
    assert 'resized  pos_embed: (1, 577, 32) -> (1, 197, 32)' in capsys.readouterr().out
    assert torch.load(tmp_path / 'v224.pth', weights_only=True)['pos_embed'].shape == (1, 197, 32)
    # or keep the grid with a construction argument
    assert cc.main([str(tmp_path / 'v384.pth'), str(tmp_path / 'k.pth'), '--model', 'ViT', '--arch', json.dumps(VIT),
                    '--model-args', 'img_size=384']) == 0
    assert 'resized 0' in capsys.readouterr().out


class _Payload:
    """Not a tensor: restoring it would call a function (objects of other classes load as inert records)."""

    def __reduce__(self):
        return (os.system, ('true', ))


def test_convert_refusals(tmp_path, capsys):
    from transformers import SwinConfig, SwinModel
    swin = SwinModel(SwinConfig(image_size=224, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2]))
    torch.save(swin.state_dict(), tmp_path / 'swin.bin')
    cc = _tool('convert_checkpoint')
    # another model's checkpoint
    assert cc.main([str(tmp_path / 'swin.bin'), str(tmp_path / 'x.pth'), '--model', 'ViT', '--arch',
                    json.dumps(VIT)]) == 2
    err = capsys.readouterr().err
    assert 'refusing' in err and 'not a ViT checkpoint' in err and not os.path.exists(tmp_path / 'x.pth')
    # another variant of the right model
    assert cc.main([str(tmp_path / 'swin.bin'), str(tmp_path / 'x.pth'), '--model', 'Swin', '--arch', 'tiny']) == 2
    assert 'refusing' in capsys.readouterr().err
    # the right one converts
    assert cc.main([str(tmp_path / 'swin.bin'), str(tmp_path / 's.pth'), '--model', 'Swin', '--arch',
                    json.dumps(SWIN), '--quiet']) == 0
    capsys.readouterr()
    # unknown variant / unknown model
    assert cc.main([str(tmp_path / 'swin.bin'), str(tmp_path / 'x.pth'), '--model', 'Swin', '--arch', 'huge']) == 2
    assert "unknown arch 'huge' for Swin; choose one of ['base', 'large', 'small', 'tiny']" in capsys.readouterr().err
    assert cc.main([str(tmp_path / 'swin.bin'), str(tmp_path / 'x.pth'), '--model', 'Swinn']) == 2
    assert "unknown backbone 'Swinn'" in capsys.readouterr().err
    # a pickle that would run code is never loaded
    torch.save({'state_dict': swin.state_dict(), 'obj': _Payload()}, tmp_path / 'evil.pth')
    assert cc.main([str(tmp_path / 'evil.pth'), str(tmp_path / 'x.pth'), '--model', 'Swin', '--arch',
                    json.dumps(SWIN)]) == 2
    assert 'never does' in capsys.readouterr().err and not os.path.exists(tmp_path / 'x.pth')


# ----------------------------------------------------------------------------- model_zoo.py
def _zoo_cases():
    return [(name, arch) for name in list_backbones()
            for arch in (getattr(get_backbone_class(name), 'paper_table', None) or {})]


def test_every_registered_backbone_fills_the_zoo_table():
    """A backbone that lands later must describe every named variant in ``paper_table``."""
    lacking = {name: sorted(set(getattr(get_backbone_class(name), 'arch_zoo', {})) -
                            set(getattr(get_backbone_class(name), 'paper_table', {}) or {}))
               for name in list_backbones()}
    assert {k: v for k, v in lacking.items() if v} == {}
    for name in list_backbones():
        for arch, row in get_backbone_class(name).paper_table.items():
            assert row.get('params') and row.get('source') and 'gmacs' in row, (name, arch)


# Entries whose paper figure and our model are known to disagree beyond the tolerance; the numbers
# are the papers' (from each model's paper_table), the wider bound is stated here, the reason in the model
# file. Anything else gets the tolerance.
KNOWN_WIDER = {
    ('DeepViT', 'l', 'params'): 0.08,  # paper 55M; the official deepvit_L definition has 58.9M (deepvit.py)
    ('DeepViT', 'l', 'gmacs'): 0.08,  # paper 12.5G for the 55M model; counted here 13.15 for that definition
    ('CeiT', 'tiny', 'gmacs'): 0.20,  # paper 1.2G "unverified" (ceit.py); counted here 1.39
    ('CeiT', 'small', 'gmacs'): 0.08,  # paper 4.5G "unverified" (ceit.py); counted here 4.75
}


@pytest.mark.parametrize('name,arch', _zoo_cases())
def test_zoo_params_and_gmacs_match_paper(name, arch):
    """Parameters within 1% (Swin) / 2% (others) of the paper, GMACs at 224 within 5% where it gives one."""
    zoo = _tool('model_zoo')
    model = zoo.build(name, arch, 'meta')
    paper = get_backbone_class(name).paper_table[arch]
    params = model.paper_param_count() / 1e6  # the zoo's params column
    tol = KNOWN_WIDER.get((name, arch, 'params'), 0.01 if name == 'Swin' else 0.02)
    assert abs(params / paper['params'] - 1) < tol, (params, paper['params'])
    if paper['gmacs'] is not None:
        gmacs = zoo.count_gmacs(model, (224, 224), model.dense_only_prefixes)  # the zoo's GMACs 224 column
        tol = KNOWN_WIDER.get((name, arch, 'gmacs'), 0.05)
        assert abs(gmacs / paper['gmacs'] - 1) < tol, (gmacs, paper['gmacs'])


def test_zoo_gmacs_count_excludes_dense_parts_and_cli_markdown(tmp_path, capsys):
    zoo = _tool('model_zoo')
    # ViT-B trunk: 12 blocks of qkv/proj/mlp matmuls (12 * 197 * 768^2 * 12) + attention (2 * 12 * 197^2 * 768)
    # + patch embedding (196 * 768 * 768); the deconvolution pyramid is excluded
    expected = (12 * 197 * 768 * 768 * 12 + 12 * 2 * 197 * 197 * 768 + 196 * 768 * 768) / 1e9
    with torch.device('meta'):
        m = vit_backbones.build_backbone('ViT', 'base')
    assert abs(zoo.count_gmacs(m, (224, 224), m.dense_only_prefixes) - expected) < 1e-6
    assert zoo.count_gmacs(m, (224, 224)) > expected + 2  # the pyramid's ~2.8 GMACs
    # on the CPU (timed runs) attention goes through the fused CPU kernel: counted the same as on meta
    cpu = vit_backbones.build_backbone('ViT', 'tiny').eval()
    with torch.device('meta'):
        meta = vit_backbones.build_backbone('ViT', 'tiny').eval()
    assert zoo.count_gmacs(cpu, (224, 224), ('pyramid.', )) == zoo.count_gmacs(meta, (224, 224), ('pyramid.', ))
    md = str(tmp_path / 'zoo.md')
    assert zoo.main(['--no-time', '--no-large', '--models', 'PVTv2', '--variants', 'b0', '--markdown', md]) == 0
    text = open(md).read()
    assert '| PVTv2 | b0 | 3.67 | 3.7 | -0.9% | 0.57 | 0.57 |' in text
    assert zoo.main(['--models', 'NoSuchNet']) == 2


def _smallest_variant(name):
    cls = get_backbone_class(name)
    return min(cls.paper_table, key=lambda a: cls.paper_table[a]['params'])


@pytest.mark.parametrize('name', list_backbones())
def test_tools_work_on_every_backbone(tmp_path, capsys, name):
    """Each of the twelve, smallest variant: a checkpoint written as a detector would save it (``backbone.``
    prefix, ``state_dict`` wrapper) converts with tools/convert_checkpoint.py and reproduces the model;
    tools/extract_features.py then writes every level with the model's strides and ceil sizes."""
    arch = _smallest_variant(name)
    torch.manual_seed(0)
    src_model = vit_backbones.build_backbone(name, arch, drop_path_rate=0.).eval()
    src = str(tmp_path / 'detector.pth')
    torch.save({'state_dict': {'backbone.' + k: v for k, v in src_model.state_dict().items()}, 'meta': {}}, src)
    dst = str(tmp_path / 'converted.pth')
    assert _tool('convert_checkpoint').main([src, dst, '--model', name, '--arch', arch, '--quiet']) == 0
    capsys.readouterr()
    img = str(tmp_path / 'in' / 'a.png')
    arr = _write_image(img, 70, 100, seed=1)
    out_dir = str(tmp_path / 'out')
    assert _tool('extract_features').main([img, '--model', name, '--arch', arch, '--checkpoint', dst,
                                           '--out-dir', out_dir]) == 0
    saved = torch.load(osp.join(out_dir, 'a.pt'), weights_only=True)
    assert list(saved['strides']) == src_model.out_strides and list(saved['channels']) == src_model.out_channels
    cfg = data_config(name)  # no resize by default: the image at its own size, normalised as pre-trained
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(cfg['mean']).view(1, 3, 1, 1)) / torch.tensor(cfg['std']).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = src_model(x)
    levels = saved['levels']
    assert len(levels) == len(ref)
    for s, lv, r in zip(src_model.out_strides, levels, ref):
        assert tuple(lv.shape) == (r.shape[1], math.ceil(70 / s), math.ceil(100 / s))
        assert _max_diff(torch.as_tensor(lv), r[0]) < 1e-4
