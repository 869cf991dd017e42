"""tools/benchmark.py covers every backbone and times the same function in ours and the anchor; with --peers it
prints a column per requested peer (mmdet/mmseg, timm, HF) for every model."""
import importlib.util
import json
import os
import re
import sys

import pytest
import torch

import vit_backbones

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools', 'benchmark.py')


def _bench():
    spec = importlib.util.spec_from_file_location('vb_benchmark_tool', _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_registered_backbone_can_be_benchmarked():
    bench = _bench()
    names = vit_backbones.list_backbones()
    assert len(names) == 12
    for name in names:  # any registered name, any case, runs ours alone
        assert bench._split(name.lower())[0] == name
    assert {spec[0] for spec in bench.SPECS.values()} == {'Swin', 'PVT', 'PVTv2', 'ViT', 'DeiT'}
    with pytest.raises(SystemExit, match='unknown --model'):
        bench._split('resnet50')


@pytest.mark.parametrize('model', ['pvtv2', 'deit'])
def test_anchor_and_ours_compute_the_same_function(model):
    """The anchors (mmdet PVT v2-b2; mmseg VisionTransformer for DeiT-S) get our converted weights."""
    bench = _bench()
    anchor, ours = bench.shared_weights(model, drop_path=0.)
    anchor.eval()
    ours.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref, out = bench._trunk_outputs(anchor, x), bench._trunk_outputs(ours, x)
    assert [tuple(r.shape) for r in ref] == [tuple(o.shape) for o in out]
    # mmdet's PVT v2 uses LayerNorm eps 1e-6 in its patch embeddings where the official code (and ours) use 1e-5
    tol = 5e-4 if model == 'pvtv2' else 1e-4
    assert max(float((r - o).abs().max()) for r, o in zip(ref, out)) < tol


def test_paired_timing_alternates_and_summarises():
    """--pairs: anchor and ours in one process, alternating steps; the summary is consistent."""
    bench = _bench()
    r = bench.time_pairs('swin', 'train', (32, 48, 1), pairs=3, warmup=0, device=torch.device('cpu'),
                         drop_path=0.)
    assert r['pairs'] == 3 and r['anchor_ms'] > 0 and r['ours_ms'] > 0
    assert r['ratio_min'] <= r['ratio_median'] <= r['ratio_max']


# ---------------------------------------------------------------- --peers: every peer, interleaved
_PEERS_PATH = os.path.join(os.path.dirname(_PATH), 'bench_peers.py')

#: small hyper-parameter overrides (ours and every peer get them): the run stays fast
TINY = {
    'swin': {'embed_dims': 16, 'depths': [1, 1, 1, 1], 'num_heads': [1, 1, 2, 2]},
    'pvtv2': {'embed_dims': [16, 32, 80, 128], 'depths': [1, 1, 1, 1]},
    'pvt': {'embed_dims': [16, 32, 80, 128], 'depths': [1, 1, 1, 1]},
    'levit': {'embed_dims': [32, 48, 64], 'key_dim': 16, 'num_heads': [2, 3, 4], 'depths': [1, 1, 1]},
    'vit': {'embed_dims': 32, 'depth': 4, 'num_heads': 2},
    'deit': {'embed_dims': 32, 'depth': 4, 'num_heads': 2},
    'cait': {'embed_dims': 32, 'depth': 4, 'num_heads': 2},
    'cvt': {'embed_dims': [16, 32, 64], 'depths': [1, 2, 3], 'num_heads': [1, 2, 4]},  # HF CvT needs depth > stage
}

#: (model, peer column) -> what the column says where that peer has no such model
NO_SUCH_MODEL = {
    ('pvt', 'timm'): 'timm has no PVT v1',
    ('levit', 'mmdet'): 'no LeViT in mmdet/mmseg',
    ('cait', 'mmdet'): 'no CaiT in mmdet/mmseg',
    ('cait', 'mmdet+neck'): 'no CaiT in mmdet/mmseg',
    ('cait', 'hf'): 'HF transformers has no CaiT',
    ('cvt', 'mmdet'): 'no CvT in mmdet/mmseg',
    ('cvt', 'timm'): 'timm has no CvT',
}
_RATIO = re.compile(r'^\d+\.\d\dx \[\d+\.\d\d-\d+\.\d\d\]$')


def _peers():
    spec = importlib.util.spec_from_file_location('vb_bench_peers', _PEERS_PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(_PEERS_PATH))
    spec.loader.exec_module(mod)
    return mod


def _tables(text):
    """{model label: (header, rows)} from the markdown tables the --peers run prints at the end."""
    tables, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith('### '):
            label = line[4:].split(':')[0]
            header = [c.strip() for c in lines[i + 1].strip('|').split('|')]
            rows = []
            for row in lines[i + 3:]:
                if not row.startswith('|'):
                    break
                rows.append(dict(zip(header, (c.strip() for c in row.strip('|').split('|')))))
            tables[label] = (header, rows)
    return tables


def _run_peers(monkeypatch, capsys, argv):
    bench = _bench()
    monkeypatch.setattr(sys, 'argv', ['benchmark.py'] + argv)
    bench.main()
    return capsys.readouterr().out


def test_peers_mode_prints_every_requested_peer_for_every_model(monkeypatch, capsys):
    """--peers mmdet,timm,hf over all eight models (tiny archs, one pair): every table has each peer's
    column, holding a paired ratio [min-max] or the reason why not ('timm not importable' where timm
    cannot be imported, the named missing model elsewhere)."""
    peers = _peers()
    models = list(peers.MODELS)
    assert set(models) == {'swin', 'pvtv2', 'pvt', 'levit', 'vit', 'deit', 'cait', 'cvt'}
    out = _run_peers(monkeypatch, capsys, [
        '--peers', 'mmdet,timm,hf', '--models', ','.join(models), '--sizes', '64x64x2', '--pairs', '1',
        '--passes', 'train', '--dtypes', 'fp32', '--peak-n', '64', '--threads', '1', '--arch', json.dumps(TINY)])
    tables = _tables(out)
    assert len(tables) == len(models), out[-3000:]
    timm_ok = peers.timm is not None
    assert ('timm not importable' in out) == (not timm_ok)
    for key, (header, rows) in zip(models, tables.values()):
        plain = peers.MODELS[key].get('plain', False)
        columns = ['mmdet', 'mmdet+neck', 'timm', 'hf'] if plain else ['mmdet', 'timm', 'hf']
        assert [c for c in header if c in columns] == columns, (key, header)
        assert 'ours % of matmul peak' in header and any(h.startswith('peak MB ours') for h in header)
        assert len(rows) == 1 and rows[0]['pass'] == 'train' and rows[0]['dtype'] == 'fp32'
        for col in columns:
            value = rows[0][col]
            if (key, col) in NO_SUCH_MODEL:
                assert value == NO_SUCH_MODEL[key, col], (key, col, value)
            elif col == 'timm' and not timm_ok:
                assert value == 'timm not importable', (key, value)
            else:
                assert _RATIO.match(value), (key, col, value)
        assert re.match(r'^\d+% \(\d+\)$', rows[0]['ours % of matmul peak']), rows[0]


def test_peers_mode_cells_train_eval_fp32_bf16(monkeypatch, capsys):
    """Each cell (pass x dtype) is one row per size (default: train and eval, fp32 and bf16); a subset of
    passes/dtypes runs only those cells."""
    out = _run_peers(monkeypatch, capsys, [
        '--peers', 'hf,mmdet', '--models', 'swin', '--sizes', '64x96x1', '--pairs', '1', '--peak-n', '64',
        '--threads', '1', '--arch', json.dumps(TINY['swin'])])
    (header, rows), = _tables(out).values()
    assert 'timm' not in header and 'hf' in header and 'mmdet' in header
    assert [(r['input'], r['pass'], r['dtype']) for r in rows] == [
        ('64x96 b1', p, d) for p in ('train', 'eval') for d in ('fp32', 'bf16')]
    assert all(_RATIO.match(r['hf']) and _RATIO.match(r['mmdet']) for r in rows)
    out = _run_peers(monkeypatch, capsys, [
        '--peers', 'hf', '--models', 'cvt', '--sizes', '64x64x1', '--pairs', '1', '--peak-n', '64', '--threads', '1',
        '--passes', 'eval', '--no-bf16', '--arch', json.dumps(TINY['cvt'])])
    (header, rows), = _tables(out).values()
    assert [(r['pass'], r['dtype']) for r in rows] == [('eval', 'fp32')] and _RATIO.match(rows[0]['hf'])


@pytest.mark.parametrize('model,peer', [('swin', 'hf'), ('swin', 'mmdet'), ('levit', 'hf'), ('vit', 'hf')])
def test_peers_get_our_weights(model, peer):
    """Every peer computes with our weights (the inverse of our converter): same outputs as ours."""
    peers = _peers()
    spec, arch, cfg = peers.resolve(model, TINY[model])
    size = (224, 224, 1)
    if spec.get('plain'):
        cfg['taps'] = tuple(peers.build_ours(spec, arch, cfg, size, 0.).block_indices)
    torch.manual_seed(0)
    ours = peers.build_ours(spec, arch, cfg, size, 0.).eval()
    net, _ = spec['build'](peer, cfg, size, 0.)
    note = peers.share_weights(ours, net)
    assert 'of its float tensors set from ours' in note and not note.startswith('weights differ'), note
    net.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = peers.OursTrunk(ours)(x) if spec.get('plain') else ours(x)
        out = net(x)
    if model == 'levit':  # HF's hidden states after stages 0 and 1 end with the next stage's shrink attention:
        ref = [r.flatten(2).transpose(1, 2) for r in ref[3:]]  # ours' stride-32 and -64 levels as tokens
        out = [out[0], out[-1]]
    if model == 'vit':  # HF's hidden states are the blocks' outputs before the final norm, which ours applies last
        ref, out = ref[:-1], out[:-1]
    assert len(ref) == len(out)
    for r, o in zip(ref, out):
        assert r.shape == o.shape
        assert float((r - o).abs().max()) <= 1e-4 * float(r.abs().max())


# ---------------------------------------------------------------- bench_compile / bench_revisions
def _tool(name):
    path = os.path.join(os.path.dirname(_PATH), f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'vb_{name}', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_compile_counts_graphs_and_times_both(tmp_path, capsys):
    """One case end to end (dynamo's 'eager' backend: no code generation, CI time): one graph for the
    four sizes, no break, a paired ratio and the output difference in the row and the JSON."""
    tool = _tool('bench_compile')
    out = tmp_path / 'rows.json'
    assert tool.main(['--models', 'PVTv2', '--arch', '{"base": "b0", "depths": [1, 1, 1, 1]}', '--backend', 'eager',
                      '--dtypes', 'fp32', '--pairs', '2', '--size', '64x96x2', '--threads', '1', '--json', str(out)]) == 0
    text = capsys.readouterr().out
    assert 'AMD' in text or 'Intel' in text or 'CPU:' in text
    (row, ) = json.loads(out.read_text())
    assert row['graphs'] == 1 and row['graphs_after_timing_size'] == 1 and row['breaks'] == 0, row
    assert row['ratio']['n'] == 2 and row['eager_ms'] > 0 and row['compiled_ms'] > 0
    assert row['rel_diff'] < 1e-5
    assert re.search(r'\| PVTv2 \S* \| eval \| fp32 \| [\d.]+ \| 1 / 0 \|', text), text
    with pytest.raises(SystemExit):
        tool.main(['--models', 'ResNet50'])


def test_bench_revisions_pairs_the_two_runs(capsys):
    """The pairing and the summary (the working tree against itself: no git needed in CI's checkout)."""
    tool = _tool('bench_revisions')
    assert tool.main(['WORKTREE', 'WORKTREE', '--models', 'PVTv2', '--arch', '{"base": "b0", "depths": [1, 1, 1, 1]}',
                      '--modes', 'eval', '--sizes', '64x64x1', '--rounds', '2', '--steps', '1', '--threads', '1']) == 0
    text = capsys.readouterr().out
    row = re.search(r'\| PVTv2 \| eval \| fp32 \| 64x64 b1 \| (\d+) \| (\d+) \| ([\d.]+)x \[([\d.]+)-([\d.]+)\] \|', text)
    assert row, text
    lo, med, hi = float(row.group(4)), float(row.group(3)), float(row.group(5))
    assert lo <= med <= hi
