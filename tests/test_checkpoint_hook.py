"""SafeCheckpointHook and find_resume_checkpoint on a toy mmengine Runner (no mmdet/mmseg, seconds).

tests/test_resume_exact.py kills real Mask R-CNN training processes; this file checks the pieces one by
one: what a save leaves on disk when it fails half-way, retention, the generator states, validation
bracketing, and which checkpoint ``--resume`` takes among good and broken files.
"""
import os
import os.path as osp
import random
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

from vit_backbones.runtime import SafeCheckpointHook, find_resume_checkpoint, use_safe_checkpoint_hook
from vit_backbones.runtime.checkpoint_hook import RNG_STATE_KEY, capture_rng_state, restore_rng_state


class _Noisy(BaseModel):
    """Draws from torch, numpy and Python generators in every training step (as drop path, RoI sampling
    and augmentation do), so a wrong generator state changes the weights."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, inputs, targets=None, mode='tensor'):
        x = torch.stack(inputs) if isinstance(inputs, (list, tuple)) else inputs
        if self.training:
            x = x * torch.rand_like(x) + float(np.random.rand()) + random.random()
        out = self.fc(x)
        if mode == 'loss':
            y = torch.stack(targets) if isinstance(targets, (list, tuple)) else targets
            return dict(loss=((out - y)**2).mean())
        return [out]


class _Data(Dataset):
    metainfo = dict(classes=('a', ))

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return dict(inputs=torch.full((4, ), float(i)), targets=torch.full((1, ), float(i % 2)))


class _Metric:
    """A minimal evaluator: validation draws from the torch generator (as a sampler-free loader's
    iterator creation does), which must not leak into training."""

    def __init__(self):
        self.dataset_meta = None

    def process(self, data_samples, data_batch):
        torch.rand(3)

    def evaluate(self, size):
        return dict(score=1.0)


def _runner(work_dir, max_iters, resume=False, load_from=None, validate=False, max_keep=1, by_epoch=False,
            **hook_kwargs):
    extra = {}
    if validate:
        from mmengine.evaluator import Evaluator, BaseMetric

        class _M(BaseMetric):

            def process(self, data_batch, data_samples):
                torch.rand(3)
                self.results.append(1.0)

            def compute_metrics(self, results):
                return dict(score=float(len(results)))

        extra = dict(val_dataloader=dict(dataset=_Data(), sampler=dict(type='DefaultSampler', shuffle=False),
                                         batch_size=2, num_workers=0, collate_fn=dict(type='default_collate')),
                     val_cfg=dict(type='ValLoop'), val_evaluator=Evaluator(_M()))
    train_cfg = (dict(by_epoch=True, max_epochs=max_iters, val_interval=1) if by_epoch else
                 dict(by_epoch=False, max_iters=max_iters, val_interval=2))
    sampler = dict(type='DefaultSampler', shuffle=True) if by_epoch else dict(type='InfiniteSampler', shuffle=True)
    torch.manual_seed(0)  # the model is built here, before the Runner seeds the generators
    return Runner(
        model=_Noisy(),
        work_dir=str(work_dir),
        train_dataloader=dict(dataset=_Data(), sampler=sampler, batch_size=2, num_workers=0,
                              collate_fn=dict(type='default_collate')),
        train_cfg=train_cfg,
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        default_hooks=dict(checkpoint=dict(type='SafeCheckpointHook', interval=1 if by_epoch else 2,
                                           by_epoch=by_epoch, max_keep_ckpts=max_keep, **hook_kwargs),
                           logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0),
        resume=resume,
        load_from=load_from,
        experiment_name=f'safe_ckpt_{os.getpid()}_{id(work_dir)}_{max_iters}_{resume}',
        **extra)


def _weights(path):
    import vit_backbones  # noqa: F401  (mmengine allow-list)
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generator_states_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    expect = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expect[0] and got[1] == expect[1] and torch.equal(got[2], expect[2])
    # stored as tensors and plain numbers: loads with weights_only=True and no extra allow-list
    assert all(isinstance(v, (torch.Tensor, dict, list)) for v in state.values())


@pytest.mark.parametrize('by_epoch', [False, True])
@pytest.mark.parametrize('validate', [False, True])
def test_resume_in_process_is_exact(tmp_path, by_epoch, validate):
    """Stop after the first checkpoint, resume in a new Runner: the end equals an uninterrupted run;
    with validation in between too (its draws do not leak into training)."""
    total = 3 if by_epoch else 6
    full = _runner(tmp_path / 'full', total, validate=validate, by_epoch=by_epoch)
    full.train()
    name = f'epoch_{total}.pth' if by_epoch else f'iter_{total}.pth'
    first = _runner(tmp_path / 'part', 1 if by_epoch else 2, validate=validate, by_epoch=by_epoch)
    first.train()
    resumed = _runner(tmp_path / 'part', total, resume=True, validate=validate, by_epoch=by_epoch)
    resumed.train()
    assert _equal(_weights(tmp_path / 'full' / name), _weights(tmp_path / 'part' / name))
    # ... and the generator states were what made it so: without them it differs.
    _runner(tmp_path / 'norng', 1 if by_epoch else 2, validate=validate, by_epoch=by_epoch,
            save_rng_state=False).train()
    _runner(tmp_path / 'norng', total, resume=True, validate=validate, by_epoch=by_epoch,
            save_rng_state=False).train()
    assert not _equal(_weights(tmp_path / 'full' / name), _weights(tmp_path / 'norng' / name))


def test_failed_save_leaves_previous_checkpoint_and_pointer(tmp_path, monkeypatch):
    """A save that dies half-way (here: an exception after part of the file is written) leaves the
    previous checkpoint, ``last_checkpoint`` pointing at it, and no file under the new name."""
    runner = _runner(tmp_path, 4)
    real_save = Runner.save_checkpoint
    calls = []

    def dying_save(self, out_dir, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:  # the checkpoint of iteration 4
            with open(osp.join(out_dir, filename), 'wb') as f:
                f.write(b'PK\x03\x04 partial')
            raise KeyboardInterrupt('killed during the save')
        return real_save(self, out_dir, filename, *args, **kwargs)

    monkeypatch.setattr(Runner, 'save_checkpoint', dying_save)
    with pytest.raises(KeyboardInterrupt):
        runner.train()
    assert calls[0].startswith('.tmp-') and calls[0].endswith('iter_2.pth')  # written under a hidden name
    assert osp.isfile(tmp_path / 'iter_2.pth') and not osp.exists(tmp_path / 'iter_4.pth')
    assert (tmp_path / 'last_checkpoint').read_text() == str(tmp_path / 'iter_2.pth')
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_2.pth')
    # The next run removes the partial temporary file and resumes from iteration 2.
    monkeypatch.setattr(Runner, 'save_checkpoint', real_save)
    again = _runner(tmp_path, 4, resume=True, load_from=str(tmp_path / 'iter_2.pth'))
    again.train()
    assert not [n for n in os.listdir(tmp_path) if n.startswith('.tmp-')]
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith('.pth')) == ['iter_4.pth']  # max_keep_ckpts=1


def test_retention_removes_only_after_the_new_checkpoint(tmp_path, monkeypatch):
    removed_while_saving = []
    real_save = Runner.save_checkpoint

    def watching_save(self, out_dir, filename, *args, **kwargs):
        removed_while_saving.append(sorted(n for n in os.listdir(out_dir) if n.endswith('.pth')))
        return real_save(self, out_dir, filename, *args, **kwargs)

    monkeypatch.setattr(Runner, 'save_checkpoint', watching_save)
    runner = _runner(tmp_path, 6, max_keep=2)
    runner.train()
    # Before each save, the checkpoints kept so far are all still there.
    assert removed_while_saving == [[], ['iter_2.pth'], ['iter_2.pth', 'iter_4.pth']]
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith('.pth')) == ['iter_4.pth', 'iter_6.pth']
    ckpt = torch.load(tmp_path / 'iter_6.pth', map_location='cpu', weights_only=True)
    assert RNG_STATE_KEY in ckpt and ckpt['message_hub']['runtime_info']['keep_ckpt_ids'] == [4, 6]


def test_find_resume_checkpoint_skips_broken_files(tmp_path):
    _runner(tmp_path, 2).train()
    good = tmp_path / 'iter_2.pth'
    data = good.read_bytes()
    broken = {
        'iter_8.pth': b'',  # empty
        'iter_6.pth': data[:len(data) // 2],  # cut off while being written
        'iter_5.pth': os.urandom(2000),  # random bytes
    }
    for i, (name, content) in enumerate(broken.items()):
        (tmp_path / name).write_bytes(content)
        os.utime(tmp_path / name, (2e9 + i, 2e9 + i))  # newer than the good one
    with zipfile.ZipFile(tmp_path / 'iter_7.pth', 'w') as zf:  # a complete zip that is no checkpoint
        zf.writestr('x/data.pkl', b'not a pickle')
    os.utime(tmp_path / 'iter_7.pth', (2e9 + 9, 2e9 + 9))
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_9.pth'))  # names a missing file
    with pytest.warns(UserWarning) as record:
        assert find_resume_checkpoint(str(tmp_path)) == str(good)
    text = '\n'.join(str(w.message) for w in record)
    for name, why in [('iter_9.pth', 'does not exist'), ('iter_8.pth', 'empty'), ('iter_6.pth', 'cut off'),
                      ('iter_5.pth', 'cut off'), ('iter_7.pth', 'torch.load failed')]:
        assert f'skipping {tmp_path / name}: ' in text and why in text.split(f'{tmp_path / name}: ')[1].split('\n')[0]
    for name in broken:
        os.remove(tmp_path / name)
    os.remove(tmp_path / 'iter_7.pth')
    os.remove(good)
    with pytest.warns(UserWarning):
        assert find_resume_checkpoint(str(tmp_path)) is None


def test_use_safe_checkpoint_hook():
    from mmengine.config import Config
    cfg = Config(dict(default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=3, max_keep_ckpts=2))))
    assert use_safe_checkpoint_hook(cfg) == 'SafeCheckpointHook'
    assert cfg.default_hooks.checkpoint == dict(type='SafeCheckpointHook', interval=3, max_keep_ckpts=2)
    other = Config(dict(default_hooks=dict(checkpoint=dict(type='MyHook'))))
    assert use_safe_checkpoint_hook(other) == 'MyHook'
    assert use_safe_checkpoint_hook(Config(dict())) is None
    assert issubclass(SafeCheckpointHook, __import__('mmengine').hooks.CheckpointHook)
