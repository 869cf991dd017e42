"""Crash-safe checkpoints and exact resume for mmengine runners.

mmengine 0.10.7's ``CheckpointHook`` removes the oldest checkpoint *before* writing the new one, writes
the new one in place and then points ``last_checkpoint`` at it; a run killed during the write leaves a
partial file (or none, with ``max_keep_ckpts=1``) and a ``last_checkpoint`` naming it, and ``--resume``
fails. It also saves no random-number-generator state, so a resumed run draws other RoI samples,
drop-path masks and flips than the uninterrupted run would have.

:class:`SafeCheckpointHook` takes the same arguments as ``CheckpointHook`` and changes what happens
around each save:

1. the checkpoint is written to a hidden temporary file in the same folder, flushed and fsynced, then
   renamed over its final name (and the folder fsynced), so a file under a checkpoint name is always
   complete;
2. ``last_checkpoint`` is replaced the same way, after the checkpoint is complete;
3. checkpoints beyond ``max_keep_ckpts`` are removed only after that;
4. the Python, numpy, torch CPU and CUDA generator states are saved in the checkpoint and restored
   on resume at the moment the uninterrupted run would have continued: after mmengine has replayed
   the data loader of an iteration-based loop, or at the start of the next epoch of an epoch-based
   loop;
5. validation during training runs between a save and the next iteration, so it is bracketed: the
   generator states are put back after validation and training draws the same numbers whether or
   not (and however often) it validates.

:func:`find_resume_checkpoint` is what ``tools/train.py --resume`` uses: the newest checkpoint in the
work dir that loads, skipping (with a warning naming it) any that is missing, partial or corrupt.
"""
import glob
import os
import os.path as osp
import random
import re
import warnings
import zipfile
from collections import deque
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_rank, get_world_size, is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.registry import HOOKS

from ..registry import register_real

__all__ = ['SafeCheckpointHook', 'atomic_write_bytes', 'capture_rng_state', 'restore_rng_state',
           'find_resume_checkpoint', 'RNG_STATE_KEY']

#: Key of the generator states in a checkpoint written by :class:`SafeCheckpointHook`.
RNG_STATE_KEY = 'rng_state'
_TMP_PREFIX = '.tmp-'


# --------------------------------------------------------------------------------------------------
# Durable writes
# --------------------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    """Make a rename in folder ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: str, final: str) -> None:
    """fsync ``tmp``, rename it over ``final`` and fsync the folder."""
    with open(tmp, 'rb+') as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(osp.dirname(osp.abspath(final)))


def _tmp_name(final: str) -> str:
    """The hidden temporary name a file is written under before it is renamed to ``final``."""
    return osp.join(osp.dirname(final), f'{_TMP_PREFIX}{os.getpid()}-{osp.basename(final)}')


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``."""
    tmp = _tmp_name(path)
    with open(tmp, 'wb') as f:
        f.write(data)
        f.flush()
    _publish(tmp, path)


# --------------------------------------------------------------------------------------------------
# Generator states, as tensors and plain numbers (loadable with torch.load(weights_only=True))
# --------------------------------------------------------------------------------------------------


def capture_rng_state() -> Dict[str, Any]:
    """The Python, numpy and torch (CPU and every CUDA device) generator states of this process."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        'python': {'version': version, 'state': torch.tensor(internal, dtype=torch.int64),
                   'gauss_next': gauss_next},
        'numpy': {'name': name, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
        'torch': torch.get_rng_state(),
        'cuda': [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Set this process's generators to ``state`` (from :func:`capture_rng_state`)."""
    py = state['python']
    random.setstate((py['version'], tuple(int(v) for v in py['state'].tolist()), py['gauss_next']))
    npy = state['numpy']
    np.random.set_state((npy['name'], npy['keys'].numpy().astype(np.uint32), npy['pos'], npy['has_gauss'],
                         npy['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    cuda = state.get('cuda') or []
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f'the checkpoint holds the generator states of {len(cuda)} CUDA devices but this '
                          f'process sees {torch.cuda.device_count() if torch.cuda.is_available() else 0}; '
                          'the CUDA generators are not restored, so GPU-side random draws will differ')


class _RestoreAfterReplay:
    """Wraps an iteration-based loop's data iterator: after ``skip`` batches (mmengine's replay of the
    batches already trained on) it restores the generator states, then hands itself back."""

    def __init__(self, loop: Any, skip: int, state: Dict[str, Any]):
        self.loop, self.inner, self.left, self.state = loop, loop.dataloader_iterator, skip, state

    def __iter__(self):
        return self

    def __next__(self):
        if self.left > 0:
            self.left -= 1
            return next(self.inner)
        restore_rng_state(self.state)
        self.loop.dataloader_iterator = self.inner
        return next(self.inner)


# --------------------------------------------------------------------------------------------------
# The hook
# --------------------------------------------------------------------------------------------------


class SafeCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` (same arguments) with crash-safe saves and exact resume.

    See the module documentation for what it changes. Remote storage backends (``backend_args`` that
    are not the local file system) are saved as ``CheckpointHook`` does, without the atomic rename.

    Args:
        save_rng_state: Save the generator states and restore them on resume (default True).
        **kwargs: ``CheckpointHook`` arguments (``interval``, ``by_epoch``, ``max_keep_ckpts``,
            ``save_best``, ``out_dir``, ``filename_tmpl`` ...).
    """

    def __init__(self, *args, save_rng_state: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_rng_state = save_rng_state
        self._resumed: Optional[Tuple[int, int, Dict[str, Any]]] = None  # (epoch, iter, rng state)
        self._epoch_restore: Optional[Dict[str, Any]] = None
        self._val_state: Optional[Dict[str, Any]] = None
        self._rank_states: Optional[List[Dict[str, Any]]] = None

    # ------------------------------------------------------------------------------------- saving
    def _local(self) -> bool:
        return isinstance(self.file_backend, LocalBackend)

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if self._local() and is_main_process():
            self._remove_leftovers(runner)
        loop = runner.train_loop
        loader = getattr(loop, 'dataloader', None)
        if (self.save_rng_state and not hasattr(loop, 'dataloader_iterator')
                and getattr(loader, 'persistent_workers', False) and getattr(loader, 'num_workers', 0) > 0):
            # An epoch-based loop with persistent workers: a resumed run starts its workers afresh while
            # the uninterrupted one keeps them, so their augmentation draws differ.
            runner.logger.warning(
                'train_dataloader has persistent_workers=True in an epoch-based loop: a run resumed from these '
                'checkpoints starts its loader workers afresh, so its random augmentations differ from an '
                'uninterrupted run. Set persistent_workers=False (workers then restart every epoch, in both) '
                'for a bit-identical resume.')
        self._arm_restore(runner)

    def _remove_leftovers(self, runner) -> None:
        """Temporary files of killed saves, and checkpoints the retention policy already gave up
        (a run killed between publishing a checkpoint and removing the oldest leaves one)."""
        for tmp in glob.glob(osp.join(glob.escape(self.out_dir), _TMP_PREFIX + '*')):
            runner.logger.warning(f'removing {tmp}, left by a save that was interrupted')
            os.remove(tmp)
        keep = list(getattr(self, 'keep_ckpt_ids', []) or [])
        if self.max_keep_ckpts > 0 and keep:
            pattern = re.compile('^' + re.escape(self.filename_tmpl).replace(r'\{\}', r'(\d+)') + '$')
            for name in os.listdir(self.out_dir):
                m = pattern.match(name)
                if m and int(m.group(1)) < min(keep):
                    runner.logger.info(f'removing {name}: beyond max_keep_ckpts={self.max_keep_ckpts}')
                    os.remove(osp.join(self.out_dir, name))

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # Runs on the main process only (Runner.save_checkpoint is master_only); the other ranks' states
        # were gathered in _save_checkpoint_with_step, which every rank runs.
        if self.save_rng_state:
            states, self._rank_states = self._rank_states or [capture_rng_state()], None
            checkpoint[RNG_STATE_KEY] = states[0]
            checkpoint[RNG_STATE_KEY + '_per_rank'] = states

    def _gather_rank_states(self) -> None:
        self._rank_states = None
        if self.save_rng_state:
            state = capture_rng_state()
            self._rank_states = all_gather_object(state) if get_world_size() > 1 else [state]

    def _save_checkpoint_with_step(self, runner, step, meta):
        self._gather_rank_states()
        if not self._local():
            return super()._save_checkpoint_with_step(runner, step, meta)
        outdated: List[int] = []
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            keep = deque(self.keep_ckpt_ids)
            keep.append(step)
            while len(keep) > self.max_keep_ckpts:
                outdated.append(keep.popleft())
            self.keep_ckpt_ids = deque(keep, self.max_keep_ckpts)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))

        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        tmp = _tmp_name(self.last_ckpt)
        runner.save_checkpoint(
            self.out_dir,
            osp.basename(tmp),
            self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            meta=meta,
            by_epoch=self.by_epoch,
            backend_args=self.backend_args,
            **self.args)
        if not is_main_process():
            return
        _publish(tmp, self.last_ckpt)
        atomic_write_bytes(osp.join(runner.work_dir, 'last_checkpoint'), self.last_ckpt.encode())
        for old in outdated:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old))
            if osp.isfile(path):
                os.remove(path)

    # ------------------------------------------------------------------------------------ resuming
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # Called for resume and for load_from alike; before_train tells them apart by the iteration.
        state = checkpoint.get(RNG_STATE_KEY)
        per_rank = checkpoint.get(RNG_STATE_KEY + '_per_rank')
        if isinstance(per_rank, list) and len(per_rank) > 1:
            if len(per_rank) == get_world_size():
                state = per_rank[get_rank()]
            else:
                runner.logger.warning(
                    f'the checkpoint holds the generator states of {len(per_rank)} processes, this run has '
                    f'{get_world_size()}: every process starts from rank 0\'s, so random draws differ from an '
                    'uninterrupted run')
        meta = checkpoint.get('meta') or {}
        self._resumed = None
        if isinstance(state, dict) and 'iter' in meta:
            self._resumed = (int(meta.get('epoch', 0)), int(meta['iter']), state)

    def _arm_restore(self, runner) -> None:
        resumed, self._resumed = self._resumed, None
        if runner.iter == 0:  # a fresh run, or load_from (weights only): nothing to restore
            return
        if resumed is None or resumed[1] != runner.iter:
            runner.logger.warning(
                'resuming from a checkpoint without generator states (not written by SafeCheckpointHook): '
                'the run continues, but its random draws differ from those of an uninterrupted run')
            return
        epoch, it, state = resumed
        loop = runner.train_loop
        if hasattr(loop, 'dataloader_iterator'):  # iteration-based: restore after mmengine's replay
            loop.dataloader_iterator = _RestoreAfterReplay(loop, it, state)
            return
        per_epoch = len(loop.dataloader) if hasattr(loop, 'dataloader') else 0
        if per_epoch and it != epoch * per_epoch:
            runner.logger.warning(
                f'resuming at iteration {it}, inside epoch {epoch + 1}: mmengine restarts that epoch from its '
                'first batch, so this run is not identical to an uninterrupted one (resume from an epoch-end '
                'checkpoint, or checkpoint by epoch, for an exact continuation)')
        self._epoch_restore = state

    def before_train_epoch(self, runner) -> None:
        state, self._epoch_restore = self._epoch_restore, None
        if state is not None:
            restore_rng_state(state)

    def before_val(self, runner) -> None:
        self._val_state = capture_rng_state() if self.save_rng_state else None

    def after_val(self, runner) -> None:
        state, self._val_state = self._val_state, None
        if state is not None:
            restore_rng_state(state)


# --------------------------------------------------------------------------------------------------
# Choosing the checkpoint to resume from
# --------------------------------------------------------------------------------------------------


def _checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be resumed from, or None if it reads back completely."""
    if not osp.isfile(path):
        return 'the file does not exist'
    if osp.getsize(path) == 0:
        return 'the file is empty'
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()  # reads every member and checks its CRC
        if bad is not None:
            return f'member {bad} is corrupt (CRC mismatch)'
    except zipfile.BadZipFile as e:
        return f'not a complete checkpoint ({e}); it was probably cut off while being written'
    except OSError as e:
        return f'cannot be read ({e})'
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot resume from it"
        return f'torch.load failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})'
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or 'meta' not in ckpt:
        return 'not an mmengine training checkpoint (no state_dict / meta)'
    return None


def find_resume_checkpoint(work_dir: str, logger=None) -> Optional[str]:
    """The newest checkpoint in ``work_dir`` that loads completely, or None.

    Candidates are the file ``last_checkpoint`` names and every ``*.pth`` in ``work_dir``, newest
    (modification time) first; ``last_checkpoint``'s target wins a tie. Each that is missing, empty,
    cut off or corrupt is skipped with a warning that names it and says why.
    """

    def warn(msg: str) -> None:
        if logger is not None:
            logger.warning(msg)
        else:
            warnings.warn(msg)

    named = None
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip() or None
    files = [p for p in glob.glob(osp.join(glob.escape(work_dir), '*.pth')) if osp.isfile(p)]
    order = sorted(files, key=lambda p: (osp.getmtime(p), p == named), reverse=True)
    if named is not None and named not in order:
        order.insert(0, named)
    for path in order:
        problem = _checkpoint_problem(path)
        if problem is None:
            return path
        warn(f'--resume: skipping {path}: {problem}')
    return None


def use_safe_checkpoint_hook(cfg) -> Optional[str]:
    """Make a config's checkpoint hook :class:`SafeCheckpointHook`, in place (its arguments carry over).

    Only mmengine's own ``CheckpointHook`` is replaced; another custom hook is left alone.

    Returns:
        The checkpoint hook type now in the config, or None if the config has none.
    """
    hooks = cfg.get('default_hooks') or {}
    ckpt = hooks.get('checkpoint')
    if not ckpt:
        return None
    if ckpt.get('type') in ('CheckpointHook', 'mmengine.CheckpointHook', CheckpointHook):
        ckpt['type'] = 'SafeCheckpointHook'
    return ckpt.get('type')


register_real(HOOKS, SafeCheckpointHook)
