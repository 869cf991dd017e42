"""Checkpoint files as they come: training checkpoints with args/configs, hostile pickles, damaged files, bad values.

Every file here is written in the test (real classes, real ``torch.save``, or a few hand-assembled pickle
opcodes). Hostile files try to touch a marker file; the tests check it never appears and that the error
names the refused global without advising ``weights_only=False``.
"""
import argparse
import importlib.util
import io
import os
import os.path as osp
import pickle
import subprocess
import sys
import tarfile
import tracemalloc

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer

import vit_backbones
from vit_backbones.checkpoint import (CheckpointError, CheckpointFileError, CheckpointMismatchError,
                                      CheckpointNotFoundError, CheckpointResizeWarning, ForeignObject,
                                      UnsafeCheckpointError, load_pretrained, read_checkpoint)

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEIT = dict(base='tiny', embed_dims=32, depth=2, num_heads=2)
CAIT = dict(base='xxs24', embed_dims=32, depth=2, num_heads=4)
CEIT = dict(base='tiny', embed_dims=32, depth=2, num_heads=2)
SWIN = dict(base='tiny', embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


class Reduce:
    """Pickles as ``func(*args)`` (and ``__setstate__(state)`` when given): any call a file can ask for."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


class AttrDict(dict):
    """A dict subclass with attributes, like EasyDict / yacs CfgNode."""


class Steps(list):
    """A list subclass."""


class TrainState:
    """A plain class defined here: its module is importable, yet it must come back as a record."""

    def __init__(self):
        self.step, self.history = 7, [0.5, 0.25]


def _deit():
    return vit_backbones.build_backbone('DeiT', DEIT)


def _write_zip(path, payload: bytes) -> str:
    """A torch.save-format zip whose data.pkl is ``payload``."""
    writer = torch._C.PyTorchFileWriter(str(path))
    writer.write_record('data.pkl', payload, len(payload))
    writer.write_end_of_file()
    return str(path)


def _no_rerun_advice(message: str):
    assert 'weights_only=False' not in message and 'weights_only` set to `False' not in message, message


# ----------------------------------------------------------------------------- training checkpoints
@pytest.mark.parametrize('protocol', [1, 2, 4, 5])
def test_deit_style_training_checkpoint_loads_with_args_as_record(tmp_path, protocol):
    """DeiT/CaiT/CeiT/DeepViT/PVT/LeViT main.py: {'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'}."""
    src = _deit()
    args = argparse.Namespace(model='deit_tiny_patch16_224', lr=5e-4, epochs=300, smoothing=0.1, output_dir='out',
                              input_size=224, mixup=[0.8, 1.0], dist_eval=False)
    optim = torch.optim.AdamW(src.parameters(), lr=1e-3)
    src(torch.randn(1, 3, 32, 32))[0].sum().backward()
    optim.step()
    ckpt = dict(model=src.state_dict(), optimizer=optim.state_dict(), lr_scheduler={'last_epoch': 3}, epoch=3,
                args=args, scaler={'scale': 65536.0}, max_accuracy=np.float64(72.2))
    path = tmp_path / 'checkpoint.pth'
    torch.save(ckpt, path, pickle_protocol=protocol)
    loaded = read_checkpoint(path)
    assert isinstance(loaded['args'], ForeignObject) and loaded['args'].foreign_name == 'argparse.Namespace'
    assert loaded['args'].state == vars(args) and loaded['max_accuracy'] == 72.2
    assert loaded['optimizer']['param_groups'][0]['lr'] == 1e-3
    m = vit_backbones.build_backbone('DeiT', DEIT, checkpoint=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    assert m.load_report.foreign == {'argparse.Namespace': ["['args']"]}
    assert "foreign objects kept as inert records: argparse.Namespace at ['args']" in m.load_report.summary()


def test_swin_style_checkpoint_with_yacs_config(tmp_path):
    """Swin / Shuffle main.py save {'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch', 'config'}."""
    from yacs.config import CfgNode
    cfg = CfgNode(new_allowed=True)
    cfg.MODEL = CfgNode(new_allowed=True)
    cfg.MODEL.TYPE, cfg.MODEL.SWIN = 'swin', CfgNode({'EMBED_DIM': 96, 'DEPTHS': [2, 2, 6, 2], 'WINDOW_SIZE': 7})
    cfg.TRAIN = CfgNode({'BASE_LR': 5e-4, 'EPOCHS': 300})
    cfg.freeze()
    src = vit_backbones.build_backbone('Swin', SWIN)
    path = tmp_path / 'ckpt_epoch_299.pth'
    torch.save({'model': src.state_dict(), 'optimizer': {}, 'lr_scheduler': {}, 'max_accuracy': 81.2, 'epoch': 299,
                'config': cfg}, path)
    loaded = read_checkpoint(path)
    rec = loaded['config']
    assert rec.foreign_name == 'yacs.config.CfgNode' and rec['MODEL']['SWIN']['DEPTHS'] == [2, 2, 6, 2]
    assert rec['TRAIN']['BASE_LR'] == 5e-4 and rec.state['__immutable__'] is True
    report = load_pretrained(vit_backbones.build_backbone('Swin', SWIN), str(path))
    assert report.foreign['yacs.config.CfgNode'][:3] == ["['config']", "['config']['MODEL']", "['config']['MODEL']['SWIN']"]
    assert len(report.loaded) == len(src.state_dict())


@pytest.mark.parametrize('protocol', [0, 1, 2, 4, 5])
def test_objects_of_other_classes_become_records(tmp_path, protocol):
    meta = {'cfg': AttrDict(lr=0.1, nested=AttrDict(depth=2)), 'steps': Steps([1, 2, 3]), 'state': TrainState(),
            'ref': TrainState}
    path = tmp_path / f'meta_p{protocol}.pth'
    torch.save({'meta': [meta]}, path, pickle_protocol=protocol)  # protocol 0 cannot hold tensors in torch.save
    got = read_checkpoint(path)['meta'][0]
    name = f'{__name__}.'
    assert type(got['cfg']).__mro__[1] is ForeignObject and got['cfg'].foreign_name == name + 'AttrDict'
    assert got['cfg'] == {'lr': 0.1, 'nested': {'depth': 2}} and got['cfg']['nested'].foreign_name == name + 'AttrDict'
    assert got['steps'].listitems == [1, 2, 3] and got['steps'].args == ()
    assert got['state'].state == {'step': 7, 'history': [0.5, 0.25]}
    assert got['ref'].foreign_name == name + 'TrainState' and got['ref'] is not TrainState
    with pytest.raises(UnsafeCheckpointError, match=f'GLOBAL {name}TrainState'):
        got['ref']()  # placeholders can never be called


def test_classes_of_modules_that_do_not_exist_are_never_imported(tmp_path):
    path = tmp_path / 'legacy.pth'  # the legacy format is one pickle stream: module names are editable bytes
    torch.save({'model': _deit().state_dict(), 'state': TrainState()}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert __name__.encode() in data
    fake = b'zz_missing_module'.ljust(len(__name__), b'_')[:len(__name__)]
    path.write_bytes(data.replace(__name__.encode(), fake))
    got = read_checkpoint(path)
    assert got['state'].foreign_name == f'{fake.decode()}.TrainState' and fake.decode() not in sys.modules
    assert load_pretrained(_deit(), str(path)).foreign == {f'{fake.decode()}.TrainState': ["['state']"]}


# ----------------------------------------------------------------------------- hostile files
def _gadgets(marker):
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        'posix.system': Reduce(os.system, (f'touch {marker}', )),
        'subprocess.Popen': Reduce(subprocess.Popen, (['touch', str(marker)], )),
        'builtins.eval': Reduce(eval, (touch, )),
        'builtins.exec': Reduce(exec, (touch, )),
        'builtins.getattr': Reduce(getattr, (Reduce(getattr, (torch.Tensor, '__init__')), '__globals__')),
        'io.open': Reduce(open, (str(marker), 'w')),
        # an allowed torch function asked to call os.system on the file's behalf
        'posix.system via _rebuild_from_type_v2': Reduce(torch._tensor._rebuild_from_type_v2,
                                                          (os.system, torch.Tensor, (f'touch {marker}', ), {})),
        # hidden inside args, nested containers
        'posix.system in args': argparse.Namespace(opt={'sched': [(1, Reduce(os.system, (f'touch {marker}', )))]}),
    }


@pytest.mark.parametrize('protocol', [0, 2, 4, 5])
@pytest.mark.parametrize('gadget', ['posix.system', 'subprocess.Popen', 'builtins.eval', 'builtins.exec',
                                    'builtins.getattr', 'io.open', 'posix.system via _rebuild_from_type_v2',
                                    'posix.system in args'])
def test_files_that_would_call_code_are_refused(tmp_path, protocol, gadget):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    payload = {'args': [{'x': _gadgets(marker)[gadget]}]}
    if protocol:
        payload['model'] = _deit().state_dict()
    torch.save(payload, path, pickle_protocol=protocol)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_pretrained(_deit(), str(path))
    message = str(err.value)
    assert str(path) in message and ('never does' in message or 'refusing getattr' in message), message
    expected = {'posix.system via _rebuild_from_type_v2': "torch's tensor rebuild functions",
                'posix.system in args': 'GLOBAL posix.system'}.get(gadget, f'GLOBAL {gadget}')
    assert expected in message, message
    _no_rerun_advice(message)
    assert not marker.exists()
    if gadget == 'posix.system':  # the same file does run the command when pickle is let loose: a real threat
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_build_on_a_class_and_huge_allocations_are_refused(tmp_path):
    # PROTO 2, GLOBAL torch.Tensor (allowed), (None, {'__add__': 1}), BUILD: would set an attribute on the class
    build_class = b'\x80\x02ctorch\nTensor\nN}X\x07\x00\x00\x00__add__K\x01s\x86b.'
    add = torch.Tensor.__add__
    with pytest.raises(UnsafeCheckpointError, match='set the state of torch.Tensor'):
        read_checkpoint(_write_zip(tmp_path / 'build.pth', build_class))
    assert torch.Tensor.__add__ is add
    tracemalloc.start()
    try:
        for name, obj in [('bytearray', Reduce(bytearray, (10**12, ))),
                          ('torch.Tensor', Reduce(torch.Tensor, (10**6, 10**6))),
                          ('numpy.ndarray', Reduce(np.ndarray, ((200_000_000, ), 'O')))]:
            torch.save({'x': obj}, tmp_path / 'big.pth')
            with pytest.raises(UnsafeCheckpointError, match=name):
                read_checkpoint(tmp_path / 'big.pth')
        # a tensor storage claiming far more bytes than the file: BINUNICODE of 4 GB, and a storage record
        with pytest.raises(CheckpointFileError, match='more than the whole file'):
            read_checkpoint(_write_zip(tmp_path / 'str.pth', b'\x80\x02X\xff\xff\xff\xff.'))
        storage = b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu" \
                  b"J\x00\x00\x00\x40tQ."
        with pytest.raises(CheckpointFileError, match='more than the whole file'):
            read_checkpoint(_write_zip(tmp_path / 'storage.pth', storage))
        assert tracemalloc.get_traced_memory()[1] < 50 * 2**20
    finally:
        tracemalloc.stop()


# ----------------------------------------------------------------------------- mmengine safe globals
def test_history_buffer_file_cannot_change_the_class(tmp_path):
    """mmengine's HistoryBuffer.__setstate__ merges the file's statistics methods into the class."""
    hb = HistoryBuffer([1.0, 5.0], [1, 1])
    state = {'statistics_methods': {'mean': HistoryBuffer.max}, '_log_history': np.array([1.0, 5.0]),
             '_count_history': np.array([1, 1]), 'max_length': 10}
    hb.__getstate__ = lambda: state  # pickled as getattr(HistoryBuffer, 'max'), as mmengine writes it
    path = tmp_path / 'hb.pth'
    torch.save({'message_hub': {'log_scalars': {'loss': hb}}}, path)
    before = dict(HistoryBuffer._statistics_methods)
    with pytest.raises(pickle.UnpicklingError, match='statistics methods other than'):
        torch.load(path, weights_only=True)
    with pytest.raises(UnsafeCheckpointError, match='statistics methods other than'):
        read_checkpoint(path)
    assert HistoryBuffer._statistics_methods == before
    assert HistoryBuffer([1.0, 5.0], [1, 1]).mean() == 3.0
    state['statistics_methods'] = {'mean': HistoryBuffer.mean}  # what mmengine writes: loads, as instance data
    torch.save({'loss': hb}, path)
    loaded = torch.load(path, weights_only=True)['loss']
    assert isinstance(loaded, HistoryBuffer) and loaded.mean() == 3.0 and loaded.max_length == 10
    assert type(loaded._log_history) is np.ndarray and 'statistics_methods' not in vars(loaded)


_DTYPE = np.dtype('f8')
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]


@pytest.mark.parametrize('obj,needle', [
    (Reduce(np.dtype, ('f8', False, True), (3, '<', None, None, None, 8, 1, 63)), 'numpy dtype state'),  # hasobject
    (Reduce(np.dtype, ('f8', False, True), (3, '<', None, ('a', ), {'a': (np.dtype('O'), 0)}, 8, 1, 63)),
     'numpy dtype'),
    (Reduce(np.dtype, ('O8', False, True)), "numpy dtype 'O8'"),
    (Reduce(np.dtype, ('V8', False, True)), "numpy dtype 'V8'"),
    (Reduce(_RECONSTRUCT, (np.ndarray, (0, ), b'b'), (1, (10**9, ), _DTYPE, False, b'x' * 8)), 'with 8 bytes'),
    (Reduce(_RECONSTRUCT, (np.ndarray, (0, ), b'b'), (1, (2, ), _DTYPE, False, [1.0, 2.0])), 'not raw bytes'),
    (Reduce(np.ndarray, ((200_000_000, ), 'O')), 'numpy.ndarray'),
])
def test_numpy_states_are_checked_before_numpy_sees_them(tmp_path, obj, needle):
    path = tmp_path / 'np.pth'
    torch.save({'meta': obj}, path)
    with pytest.raises((pickle.UnpicklingError, TypeError), match='|'.join(('refusing', "not callable"))) as err:
        torch.load(path, weights_only=True)  # the mmengine path: vit_backbones' stand-ins
    assert needle in str(err.value) or isinstance(err.value, TypeError)
    with pytest.raises(UnsafeCheckpointError, match=needle.replace('(', r'\(').replace("'", "'")):
        read_checkpoint(path)


# ----------------------------------------------------------------------------- damaged and foreign files
def _bad_files(tmp_path):
    """{case: (path, text the message must contain)}: every file vit_backbones must explain."""
    good = tmp_path / 'good.pth'
    torch.save(_deit().state_dict(), good)
    files = {}

    def put(name, data):
        (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)

    files['missing'] = (str(tmp_path / 'nope.pth'), 'not found')
    files['directory'] = (str(tmp_path), 'is a directory')
    files['empty'] = (put('empty.pth', b''), 'is empty (0 bytes)')
    files['truncated zip'] = (put('cut.pth', good.read_bytes()[:4000]), 'truncated or damaged zip')
    files['random bytes'] = (put('random.pth', np.random.default_rng(0).bytes(3000)), 'not a readable PyTorch')
    files['html page'] = (put('page.pth', b'<!DOCTYPE html><html>Not found</html>'), 'HTML page')
    buf = io.BytesIO()
    torch.save(_deit().state_dict(), buf, _use_new_zipfile_serialization=False)
    files['truncated legacy'] = (put('cut_legacy.pth', buf.getvalue()[:2000]), 'cut short')
    torch.save([torch.ones(2), torch.zeros(3)], tmp_path / 'list.pth')
    files['list'] = (str(tmp_path / 'list.pth'), 'holds a list of 2 items, not a state dict')
    torch.save(torch.ones(3, 4), tmp_path / 'tensor.pth')
    files['tensor'] = (str(tmp_path / 'tensor.pth'), 'single tensor of shape (3, 4)')
    torch.save({'epoch': 3, 'args': argparse.Namespace(lr=1)}, tmp_path / 'no_tensors.pth')
    files['no tensors'] = (str(tmp_path / 'no_tensors.pth'), 'no tensors found')
    torch.save({'model': torch.nn.Linear(2, 2)}, tmp_path / 'module.pth', _use_new_zipfile_serialization=False)
    files['whole module'] = (str(tmp_path / 'module.pth'), 'whole pickled torch.nn.modules.linear.Linear object')
    files['corrupt safetensors'] = (put('bad.safetensors', b'\x05\x00\x00\x00\x00\x00\x00\x00{"a'),
                                    'not a valid safetensors file')
    files['zip named safetensors'] = (put('renamed.safetensors', good.read_bytes()), 'rename it to .pth')
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / 'scripted.pt')
    files['torchscript'] = (str(tmp_path / 'scripted.pt'), 'TorchScript archive')
    with tarfile.open(tmp_path / 'old.tar', 'w') as tar:
        tar.add(good, arcname='storages')
    files['tar'] = (str(tmp_path / 'old.tar'), 'tar archive')
    torch.save({'model': vit_backbones.build_backbone('Swin', SWIN).state_dict()}, tmp_path / 'swin.pth')
    files['other model'] = (str(tmp_path / 'swin.pth'), 'not a DeiT checkpoint')
    torch.save({'model': vit_backbones.build_backbone('DeiT', dict(DEIT, depth=3)).state_dict()},
               tmp_path / 'deeper.pth')
    files['other variant'] = (str(tmp_path / 'deeper.pth'), 'another variant')
    return files


def test_bad_files_get_one_clear_error(tmp_path):
    for case, (path, needle) in _bad_files(tmp_path).items():
        with pytest.raises(CheckpointError) as err:
            load_pretrained(_deit(), path)
        message = str(err.value)
        assert needle in message, (case, message)
        assert path in message, (case, message)
        _no_rerun_advice(message)
        if case == 'missing':
            assert isinstance(err.value, (CheckpointNotFoundError, FileNotFoundError))
        if case in ('other model', 'other variant'):
            assert isinstance(err.value, CheckpointMismatchError)


def _convert_tool():
    spec = importlib.util.spec_from_file_location('_convert_checkpoint', osp.join(REPO_ROOT, 'tools', 'convert_checkpoint.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_convert_tool_prints_one_error_line_and_exits_2(tmp_path, capsys):
    files = _bad_files(tmp_path)
    arch = str(DEIT).replace("'", '"')
    # the cases that used to end in a traceback, as real processes (in parallel: each imports torch)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS='1')
    procs = {case: subprocess.Popen([sys.executable, osp.join(REPO_ROOT, 'tools', 'convert_checkpoint.py'),
                                     files[case][0], str(tmp_path / 'out.pth'), '--model', 'DeiT', '--arch', arch],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for case in ('empty', 'truncated zip', 'list', 'corrupt safetensors')}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (case, out, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith('error: ') and files[case][1] in lines[0], (case, err)
        assert 'Traceback' not in err + out
    tool = _convert_tool()  # every case, in this process
    for case, (path, needle) in files.items():
        assert tool.main([path, str(tmp_path / 'out.pth'), '--model', 'DeiT', '--arch', arch]) == 2, case
        err = capsys.readouterr().err
        assert err.startswith('error: ') and err.count('\n') == 1 and needle in err, (case, err)
    assert not (tmp_path / 'out.pth').exists()


def test_torch_force_weights_only_load_is_honoured(tmp_path, monkeypatch):
    torch.save({'model': _deit().state_dict(), 'args': argparse.Namespace(lr=1)}, tmp_path / 'ckpt.pth')
    torch.save(_deit().state_dict(), tmp_path / 'plain.pth')
    monkeypatch.setenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', '1')
    assert 'pos_embed' in read_checkpoint(tmp_path / 'plain.pth')
    with pytest.raises(UnsafeCheckpointError, match='TORCH_FORCE_WEIGHTS_ONLY_LOAD.*GLOBAL argparse.Namespace') as e:
        read_checkpoint(tmp_path / 'ckpt.pth')
    _no_rerun_advice(str(e.value))


# ----------------------------------------------------------------------------- values
def test_nonfinite_weights_are_refused_unless_allowed(tmp_path):
    sd = _deit().state_dict()
    sd['blocks.0.attn.qkv.weight'][0, 0] = float('nan')
    sd['norm.bias'][1] = float('-inf')
    path = tmp_path / 'diverged.pth'
    torch.save({'model': sd}, path)
    with pytest.raises(CheckpointFileError, match=r'2 tensors hold NaN or inf.*blocks.0.attn.qkv.weight.*norm.bias'):
        load_pretrained(_deit(), str(path))
    m = _deit()
    report = load_pretrained(m, str(path), allow_nonfinite=True)
    assert report.nonfinite == ['blocks.0.attn.qkv.weight', 'norm.bias'] and torch.isnan(m.blocks[0].attn.qkv.weight[0, 0])
    assert 'loaded with NaN/inf values' in report.summary()
    tool = _convert_tool()
    assert tool.main([str(path), str(tmp_path / 'a.pth'), '--model', 'DeiT', '--arch', str(DEIT).replace("'", '"'),
                      '--quiet']) == 2
    assert tool.main([str(path), str(tmp_path / 'b.pth'), '--model', 'DeiT', '--arch', str(DEIT).replace("'", '"'),
                      '--allow-nonfinite', '--quiet']) == 0
    assert torch.isinf(torch.load(tmp_path / 'b.pth')['norm.bias'][1])


@pytest.mark.parametrize('dtype', [torch.int64, torch.bool, torch.complex64])
def test_non_float_tensors_for_float_weights_are_refused(dtype):
    sd = _deit().state_dict()
    sd['patch_embed.proj.weight'] = torch.ones(sd['patch_embed.proj.weight'].shape, dtype=dtype)
    with pytest.raises(CheckpointMismatchError, match=f'patch_embed.proj.weight \\({dtype}\\)'):
        load_pretrained(_deit(), sd)


def test_missing_buffers_are_reported_and_integer_buffers_load():
    src = vit_backbones.build_backbone('CeiT', CEIT)
    src.blocks[0].mlp.bn1.num_batches_tracked.fill_(12)
    sd = src.state_dict()
    assert sd['blocks.0.mlp.bn1.num_batches_tracked'].dtype == torch.int64
    m = vit_backbones.build_backbone('CeiT', CEIT)
    report = load_pretrained(m, sd)
    assert report.missing_buffers == [] and int(m.blocks[0].mlp.bn1.num_batches_tracked) == 12
    stats = [k for k in sd if k.endswith(('running_mean', 'running_var')) and not k.startswith('pyramid.')]
    assert len(stats) >= 2 * (1 + 2 * CEIT['depth'])
    report = load_pretrained(vit_backbones.build_backbone('CeiT', CEIT), {k: v for k, v in sd.items() if k not in stats})
    assert report.missing_buffers == stats and report.missing == []
    assert 'missing buffers (kept initialisation): ' + stats[0] in report.summary()
    # Swin's relative position indices are non-persistent (recomputed): never reported
    swin = vit_backbones.build_backbone('Swin', SWIN)
    assert any('relative_position_index' in k for k, _ in swin.named_buffers())
    assert load_pretrained(vit_backbones.build_backbone('Swin', SWIN), swin.state_dict()).missing_buffers == []


def test_lossy_resizes_warn_with_the_way_to_keep_them_exact():
    cait384 = vit_backbones.build_backbone('CaiT', CAIT, img_size=384).state_dict()
    with pytest.warns(CheckpointResizeWarning, match='from a 24x24 to a 14x14 grid.*img_size=384 keeps it exact'):
        report = load_pretrained(vit_backbones.build_backbone('CaiT', CAIT), cait384)
    assert report.notes and '24x24' in report.notes[0] and 'note: ' in report.summary()
    deit = vit_backbones.build_backbone('DeiT', DEIT, img_size=64).state_dict()  # class token + 4x4 grid
    with pytest.warns(CheckpointResizeWarning, match='4x4 to a 2x2 grid.*img_size=64'):
        load_pretrained(vit_backbones.build_backbone('DeiT', DEIT, img_size=32), deit)
    swin12 = vit_backbones.build_backbone('Swin', SWIN, window_size=12).state_dict()
    with pytest.warns(CheckpointResizeWarning, match=r'window 12x12 to 7x7 \(4: .*window_size=12 keeps them exact'):
        load_pretrained(vit_backbones.build_backbone('Swin', SWIN), swin12)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error', CheckpointResizeWarning)  # the same size: nothing to warn about
        assert not load_pretrained(vit_backbones.build_backbone('CaiT', CAIT), cait384 | {
            'pos_embed': torch.zeros(1, 196, 32)}).notes


def test_rename_helpers_apply_rules_in_order_and_report_drops():
    """The one rule-applying helper every converter uses: rules chain in order (a later rule sees the result
    of an earlier one, a replacement may be a function of the match); ``drop`` reasons are judged on the
    original key; ``unwrap_keys`` removes wrapper prefixes only where present."""
    from vit_backbones.checkpoint.rename import any_key_matches, rename_key, rename_keys, unwrap_keys
    rules = [(r'^layers\.(\d+)\.', lambda m: f'stages.{int(m.group(1)) + 1}.'), (r'^stages\.2\.', 'last.')]
    assert rename_key('layers.1.fc.weight', rules) == 'last.fc.weight'
    assert rename_key('layers.0.fc.weight', rules) == 'stages.1.fc.weight'
    sd = {'layers.0.w': torch.zeros(1), 'head.w': torch.ones(1), 'layers.1.w': torch.full((1, ), 2.)}
    out, dropped = rename_keys(sd, rules, lambda k: 'classification head' if k.startswith('head.') else None)
    assert list(out) == ['stages.1.w', 'last.w'] and out['last.w'].item() == 2.
    assert dropped == {'head.w': 'classification head'}
    assert unwrap_keys({'module.a': 1, 'b': 2, 'swin.module.c': 3}, ('swin.', 'module.')) == {'a': 1, 'b': 2, 'c': 3}
    assert any_key_matches(out, r'stages\.\d+\.w$') and not any_key_matches(out, r'w$')
