"""Checkpoint loading under torch.load(weights_only=True): mmengine's own checkpoints load, nothing else does.

The checkpoints here come from a real ``mmengine.runner.Runner`` (a toy model, so no mmdet/mmseg is
needed); tests/test_train_tools.py does the same with mmdet and mmseg runners through the tools.
"""
import os
import os.path as osp
import pickle
import subprocess
import sys
import textwrap
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner, load_checkpoint
from torch.utils.data import Dataset

from vit_backbones.runtime import safe_globals as runtime
from vit_backbones.runtime import allow_mmengine_checkpoints, mmengine_safe_globals

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


class _ToyModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 1)

    def forward(self, inputs, targets=None, mode='tensor'):
        x = torch.stack(inputs) if isinstance(inputs, (list, tuple)) else inputs
        out = self.fc(self.bn(self.conv(x)).mean((2, 3)))
        if mode == 'loss':
            y = torch.stack(targets) if isinstance(targets, (list, tuple)) else targets
            return dict(loss=((out - y)**2).mean())
        return out


class _ToyData(Dataset):
    metainfo = dict(classes=('a', 'b'), palette=[(1, 2, 3), (4, 5, 6)])

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(3, 8, 8, generator=g), targets=torch.full((1, ), float(i)))


def _runner(work_dir, max_iters, resume=False, load_from=None):
    return Runner(
        model=_ToyModel(),
        work_dir=str(work_dir),
        train_dataloader=dict(dataset=_ToyData(), sampler=dict(type='InfiniteSampler', shuffle=False),
                              batch_size=2, num_workers=0, collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        param_scheduler=dict(type='LinearLR', by_epoch=False, begin=0, end=max_iters, start_factor=0.5),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0),
        resume=resume,
        load_from=load_from,
        experiment_name=f'toy_{os.getpid()}_{max_iters}_{resume}_{id(work_dir)}')


@pytest.fixture(scope='module')
def runner_ckpt(tmp_path_factory):
    """A checkpoint written by mmengine's Runner after 2 AdamW iterations (message hub, numpy in meta)."""
    work_dir = tmp_path_factory.mktemp('toy_run')
    runner = _runner(work_dir, max_iters=2)
    runner.train()
    path = osp.join(work_dir, 'iter_2.pth')
    assert osp.isfile(path)
    return path


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]))
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_mmengine_checkpoint_needs_the_fix_and_loads_after_it(runner_ckpt):
    # Without the call (fresh process: the allow-list is process-wide), mmengine cannot read its own file.
    proc = _python(f"""
        import torch
        from mmengine.runner import CheckpointLoader
        try:
            CheckpointLoader.load_checkpoint({runner_ckpt!r}, map_location='cpu')
            print('LOADED_WITHOUT_FIX')
        except Exception as e:
            print('FAILED_WITHOUT_FIX', type(e).__name__, str(e).splitlines()[0])
        import vit_backbones.runtime as rt
        rt.allow_mmengine_checkpoints()
        rt.allow_mmengine_checkpoints()  # idempotent
        ckpt = CheckpointLoader.load_checkpoint({runner_ckpt!r}, map_location='cpu')
        print('LOADED_WITH_FIX', ckpt['meta']['iter'])
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'FAILED_WITHOUT_FIX UnpicklingError' in proc.stdout, proc.stdout
    assert 'Weights only load failed' in proc.stdout
    assert 'LOADED_WITH_FIX 2' in proc.stdout


def test_load_checkpoint_restores_weights_and_message_hub(runner_ckpt):
    allow_mmengine_checkpoints()
    model = _ToyModel()
    before = model.fc.weight.detach().clone()
    ckpt = load_checkpoint(model, runner_ckpt, map_location='cpu', strict=True)
    saved = ckpt['state_dict']
    assert not torch.equal(before, saved['fc.weight'])
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    # The non-tensor content mmengine wrote came back as the right types.
    assert ckpt['meta']['iter'] == 2
    assert ckpt['meta']['dataset_meta']['classes'] == ('a', 'b')
    loss = ckpt['message_hub']['log_scalars']['train/loss']
    assert isinstance(loss, HistoryBuffer)
    assert loss.data[0].dtype == np.float64 and loss.data[0].shape == (2, )
    assert loss.mean() == pytest.approx(float(np.mean(loss.data[0])))
    assert set(loss._statistics_methods) >= {'min', 'max', 'current', 'mean'}
    assert isinstance(ckpt['message_hub']['runtime_info']['eta'], np.floating)
    assert ckpt['optimizer']['state'][0]['exp_avg'].shape == model.conv.weight.shape


def test_runner_resume_continues_from_checkpoint(runner_ckpt, tmp_path):
    allow_mmengine_checkpoints()
    saved = torch.load(runner_ckpt, map_location='cpu')
    runner = _runner(tmp_path, max_iters=4)
    runner.resume(runner_ckpt)  # what Runner.train does for resume=True
    assert runner.iter == 2
    state = runner.optim_wrapper.state_dict()['state']
    for idx, entry in saved['optimizer']['state'].items():
        assert torch.equal(state[idx]['exp_avg'], entry['exp_avg'])
        assert torch.equal(state[idx]['exp_avg_sq'], entry['exp_avg_sq'])
        assert float(state[idx]['step']) == 2.0
    assert runner.param_schedulers[0].last_step == saved['param_schedulers'][0]['last_step']
    assert torch.equal(runner.model.fc.weight, saved['state_dict']['fc.weight'])


class _RunsShell:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


class _GetattrGadget:
    """Unpickling this calls getattr on an object that is not HistoryBuffer."""

    def __reduce__(self):
        return (getattr, (OrderedDict, 'fromkeys'))


class _HistoryBufferDunder:
    """getattr on HistoryBuffer, but for an attribute that is not a statistics method."""

    def __reduce__(self):
        return (getattr, (HistoryBuffer, '__init__'))


def _save(obj, path):
    torch.save({'state_dict': {'w': torch.ones(2)}, 'meta': obj}, path)
    return str(path)


def test_arbitrary_code_is_still_refused(tmp_path):
    allow_mmengine_checkpoints()
    marker = tmp_path / 'pwned'
    path = _save(_RunsShell(marker), tmp_path / 'evil.pth')
    with pytest.raises(pickle.UnpicklingError, match='posix.system|os.system|system'):
        load_checkpoint(_ToyModel(), path, map_location='cpu')
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)  # the default stays weights_only=True
    assert not marker.exists()
    # The same file does run the command when weights_only is turned off: the test file is a real threat.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize('gadget', [_GetattrGadget(), _HistoryBufferDunder()])
def test_getattr_is_limited_to_history_buffer_statistics(tmp_path, gadget):
    allow_mmengine_checkpoints()
    path = _save(gadget, tmp_path / 'gadget.pth')
    with pytest.raises(pickle.UnpicklingError, match='refusing getattr'):
        torch.load(path)


def test_object_arrays_and_other_classes_are_refused(tmp_path):
    allow_mmengine_checkpoints()
    path = _save(np.array([{'a': 1}], dtype=object), tmp_path / 'objarr.pth')
    with pytest.raises(pickle.UnpicklingError, match="refusing numpy dtype 'O8'"):
        torch.load(path)
    path = _save(subprocess.Popen, tmp_path / 'popen.pth')
    with pytest.raises(pickle.UnpicklingError, match='Popen'):
        torch.load(path)


def test_numpy_values_round_trip(tmp_path):
    allow_mmengine_checkpoints()
    values = dict(f64=np.float64(1.5), f32=np.float32(2.5), i64=np.int64(-3), b=np.bool_(True),
                  arr=np.arange(6, dtype=np.int64).reshape(2, 3), farr=np.linspace(0, 1, 4, dtype=np.float32))
    path = _save(values, tmp_path / 'np.pth')
    loaded = torch.load(path)['meta']
    for key, value in values.items():
        # arrays come back as a checked ndarray subclass (its __setstate__ validates before numpy runs)
        assert type(loaded[key]) is type(value) or isinstance(value, np.ndarray) and isinstance(loaded[key], np.ndarray)
        assert np.array_equal(loaded[key], value) and loaded[key].dtype == value.dtype, key
    # ... which pickles as a plain numpy array again
    again = pickle.loads(pickle.dumps(loaded['arr']))
    assert type(again) is np.ndarray and b'safe_globals' not in pickle.dumps(loaded['arr'], protocol=2)


def test_message_hub_gets_working_history_buffers(runner_ckpt):
    from mmengine.logging import MessageHub
    allow_mmengine_checkpoints()
    ckpt = torch.load(runner_ckpt, map_location='cpu')
    hub = MessageHub.get_instance(f'hub_{os.getpid()}_{id(ckpt)}')
    hub.load_state_dict(ckpt['message_hub'])
    loss = hub.get_scalar('train/loss')
    assert type(loss) is HistoryBuffer and type(loss._log_history) is np.ndarray
    assert loss.mean() == pytest.approx(float(np.mean(loss.data[0]))) and loss.statistics('max') == loss.data[0].max()
    loss.update(100.0)
    assert loss.current() == 100.0 and len(loss.data[0]) == 3
    # saved again, it names mmengine's class, not the stand-in
    data = pickle.dumps(loss, protocol=2)
    assert b'HistoryBuffer' in data and b'_HistoryBuffer' not in data and b'vit_backbones' not in data
    assert type(pickle.loads(data)) is HistoryBuffer


def test_safe_globals_list_is_exact_and_idempotent():
    allow_mmengine_checkpoints()
    before = set(torch.serialization.get_safe_globals())
    allow_mmengine_checkpoints()
    assert set(torch.serialization.get_safe_globals()) == before
    entries = mmengine_safe_globals()
    assert all(e in before for e in entries)
    names = {e[1] if isinstance(e, tuple) else f'{e.__module__}.{e.__qualname__}' for e in entries}
    assert 'builtins.getattr' in names and 'mmengine.logging.history_buffer.HistoryBuffer' in names
    # getattr is our restricted stand-in, never the builtin.
    assert all(e is not getattr for e in entries)
    assert dict((e[1], e[0]) for e in entries if isinstance(e, tuple))['builtins.getattr'] is \
        runtime._history_buffer_getattr
    assert not any(isinstance(e, type) and e is type(np.dtype(object)) for e in entries)


def test_runner_checkpoint_contains_only_allowed_globals(runner_ckpt):
    # In a fresh process nothing is allow-listed yet, so torch lists every non-default global.
    proc = _python(f"""
        import torch
        print(sorted(torch.serialization.get_unsafe_globals_in_checkpoint({runner_ckpt!r})))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    unsafe = set(eval(proc.stdout.strip().splitlines()[-1]))
    allowed = {e[1] if isinstance(e, tuple) else f'{e.__module__}.{e.__qualname__}' for e in mmengine_safe_globals()}
    assert {'mmengine.logging.history_buffer.HistoryBuffer', 'builtins.getattr', 'numpy.ndarray'} <= unsafe
    assert unsafe <= allowed, unsafe - allowed


def test_checkpoints_written_with_numpy1_load(tmp_path):
    """numpy 1.x pickles name ``numpy.core.multiarray``; numpy 2 writes ``numpy._core.multiarray``."""
    allow_mmengine_checkpoints()
    path = tmp_path / 'np1.pth'
    torch.save({'meta': {'loss': np.float64(1.5), 'counts': np.arange(3, dtype=np.int64)}}, path,
               _use_new_zipfile_serialization=False)  # one plain pickle stream: names are editable bytes
    data = path.read_bytes()
    assert b'numpy._core.multiarray' in data
    path.write_bytes(data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray'))
    meta = torch.load(path)['meta']
    assert meta['loss'] == 1.5 and isinstance(meta['loss'], np.float64)
    assert np.array_equal(meta['counts'], [0, 1, 2])
