#!/usr/bin/env python
"""Kill ``tools/train.py`` with SIGKILL at chosen or random moments, resume it, and check the result.

Each trial trains the synthetic Mask R-CNN + Swin-T config (RandomSampler in RPN and RoI heads, drop
path, random flip) in a fresh work dir, kills the process (SIGKILL: no clean-up runs), runs
``tools/train.py --resume`` until the schedule is done, and compares the final checkpoint's weights,
buffers and optimizer state with those of one uninterrupted run, bit for bit (``torch.equal``).
Kill moments:

* ``iter:K``: right after the log line of iteration K (between checkpoints, or just after one);
* ``save``, ``save:K``: while a checkpoint (the one of iteration K) is being written: its hidden
  temporary file exists;
* ``saved:K``: as soon as the checkpoint of iteration K exists under its name (it may still be the
  moment between publishing it, pointing ``last_checkpoint`` at it and removing the older one);
* ``iter:K+D``: D seconds after the log line of iteration K (anywhere inside the next iteration, its
  checkpoint write included);
* ``random``: ``iter:K+D`` with K uniform over the iterations and D uniform over one iteration's wall
  time (measured in the uninterrupted run), so every part of a run is hit.

Examples::

    python tools/resume_trials.py --trials 20                      # random kill moments, small model
    python tools/resume_trials.py --moments iter:1 save iter:5     # what the CI test runs
    python tools/resume_trials.py --trials 10 --full --workers 2   # the demo's full model, 2 loader workers

It prints one line per trial and ends with ``N of N killed trials bit-identical``; exit status 1 if any
run was not.
"""
import argparse
import glob
import os
import os.path as osp
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from math import ceil
from typing import Dict, List, Optional, Sequence

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TRAIN = osp.join(REPO_ROOT, 'tools', 'train.py')
CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'mask_rcnn_swin_t_synthetic.py')

#: A narrower Swin and heads, so a trial takes seconds (the structure and every random draw stay).
SMALL_MODEL = """
model.update(
    backbone=dict(drop_path_rate=0.2,
                  arch=dict(_delete_=True, base='tiny', embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        mask_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64),
        mask_head=dict(in_channels=32, conv_out_channels=32)))
"""


NUM_TRAIN = 12


def make_data(root: str, size: int = 64) -> str:
    """The synthetic COCO-format set (``tools/make_synthetic_data.py``) in ``root``, made once."""
    if not osp.isfile(osp.join(root, 'annotations', 'instances_train2017.json')):
        subprocess.run([sys.executable, osp.join(REPO_ROOT, 'tools', 'make_synthetic_data.py'), '--out', root,
                        '--kind', 'coco', '--size', str(size), '--num-train', str(NUM_TRAIN), '--num-val', '2'],
                       check=True, cwd=REPO_ROOT, capture_output=True)
    return root


@dataclass
class Setup:
    """What a trial trains: ``iters`` iterations with a checkpoint every ``interval`` (``max_keep_ckpts=1``,
    as the demo), or with ``epochs`` > 0 an epoch-based loop (DefaultSampler, a checkpoint every epoch);
    drop path 0.2, every iteration logged; validation at every checkpoint if ``validate``; the small
    model unless ``full``. ``rng_state=False`` leaves the generator states out of the checkpoints (to
    see what they are for)."""
    iters: int = 6
    interval: int = 2
    workers: int = 0
    persistent_workers: bool = False
    epochs: int = 0
    validate: bool = False
    full: bool = False
    rng_state: bool = True

    @property
    def final_checkpoint(self) -> str:
        return f'epoch_{self.epochs}.pth' if self.epochs else f'iter_{self.iters}.pth'

    def checkpoint_name(self, k) -> str:
        return f'epoch_{k}.pth' if self.epochs else f'iter_{k}.pth'


def write_config(root: str, data_root: str, setup: Setup) -> str:
    """A config inheriting the synthetic Mask R-CNN one, as ``setup`` says; returns its path."""
    path = osp.join(root, 'trial_config.py')
    d = data_root + '/'
    total = setup.iters if not setup.epochs else setup.epochs * ceil(NUM_TRAIN / 2)
    text = f"""_base_ = [{CONFIG!r}]
train_dataloader = dict(num_workers={setup.workers}, persistent_workers={setup.persistent_workers},
                        dataset=dict(data_root={d!r}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=2),
    dict(type='CosineAnnealingLR', T_max={max(total - 2, 1)}, eta_min=2e-5, by_epoch=False, begin=2, end={total}),
]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval={setup.interval if not setup.epochs else 1},
                     by_epoch={bool(setup.epochs)}, max_keep_ckpts=1, save_rng_state={setup.rng_state}))
model = dict(backbone=dict(drop_path_rate=0.2))
"""
    if setup.epochs:
        text += f"""train_dataloader.update(sampler=dict(_delete_=True, type='DefaultSampler', shuffle=True))
train_cfg = dict(_delete_=True, type='EpochBasedTrainLoop', max_epochs={setup.epochs}, val_interval=1)
log_processor = dict(by_epoch=True)
"""
    else:
        text += f"train_cfg = dict(max_iters={setup.iters}, val_interval={setup.interval})\n"
    if setup.validate:
        text += f"""val_dataloader = dict(dataset=dict(data_root={d!r}))
val_evaluator = dict(ann_file={d + 'annotations/instances_val2017.json'!r})
test_dataloader = val_dataloader
test_evaluator = val_evaluator
"""
    else:
        text += 'val_dataloader = val_cfg = val_evaluator = test_dataloader = test_cfg = test_evaluator = None\n'
    if not setup.full:
        text += SMALL_MODEL
    with open(path, 'w') as f:
        f.write(text)
    return path


def train_command(config: str, work_dir: str, resume: bool) -> List[str]:
    """``tools/train.py CONFIG --work-dir WORK_DIR [--resume]``."""
    return [sys.executable, TRAIN, config, '--work-dir', work_dir] + (['--resume'] if resume else [])


def _env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    env['OMP_NUM_THREADS'] = str(threads)
    env['PYTHONUNBUFFERED'] = '1'
    return env


def run_to_end(cmd: List[str], env: Dict[str, str], log_path: str) -> Dict[int, float]:
    """Run to the end; returns when (seconds from the start) each iteration's log line appeared."""
    seen: Dict[int, float] = {}
    start = time.time()
    with open(log_path, 'a') as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            n = _iters_logged(log_path)
            if n and n not in seen:
                seen[n] = time.time() - start
            time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f'training failed ({proc.returncode}); log: {log_path}\n' + open(log_path).read()[-4000:])
    return seen


def run_and_kill(cmd: List[str], env: Dict[str, str], log_path: str, work_dir: str, moment: str,
                 setup: Setup, max_wall: float) -> str:
    """Start training, SIGKILL it at ``moment``; returns what happened ('killed at ...' or 'finished')."""
    log = open(log_path, 'a')
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    start = time.time()
    kind, _, arg = moment.partition(':')
    deadline = start + max_wall
    delay = 0.0
    if kind == 'iter' and '+' in arg:
        arg, delay_text = arg.split('+')
        delay = float(delay_text)
    tmp_pattern = osp.join(glob.escape(work_dir), '.tmp-*' + (f'-{setup.checkpoint_name(arg)}' if arg else ''))
    try:
        while proc.poll() is None:
            if kind == 'iter' and _iters_logged(log_path) >= int(arg):
                time.sleep(delay)
                break
            if kind == 'save' and glob.glob(tmp_pattern):
                break
            if kind == 'saved' and osp.exists(osp.join(work_dir, setup.checkpoint_name(arg))):
                break
            if time.time() >= deadline:
                break
            time.sleep(0.001 if kind in ('save', 'saved') else 0.02)
        if proc.poll() is not None:
            return f'finished before the kill moment (exit {proc.returncode})'
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return f'killed at {moment} after {time.time() - start:.1f} s'
    finally:
        log.close()


def _iters_logged(log_path: str) -> int:
    """How many training iterations the log shows (``Iter(train) [ 3/12]`` or ``Epoch(train) [1][3/6]``)."""
    return len(re.findall(r'(?:Iter|Epoch)\(train\)\s*(?:\[\s*\d+\])?\s*\[\s*\d+/', open(log_path).read()))


def compare(a_path: str, b_path: str) -> List[str]:
    """Names of the tensors that differ between two checkpoints (weights, buffers, optimizer state)."""
    import torch
    import vit_backbones  # noqa: F401  (allow-lists what mmengine writes for weights_only loading)
    a = torch.load(a_path, map_location='cpu', weights_only=True)
    b = torch.load(b_path, map_location='cpu', weights_only=True)
    diff = [k for k in a['state_dict'] if k not in b['state_dict'] or not torch.equal(a['state_dict'][k],
                                                                                     b['state_dict'][k])]
    for idx, state in a['optimizer']['state'].items():
        for key, value in state.items():
            other = b['optimizer']['state'].get(idx, {}).get(key)
            if isinstance(value, torch.Tensor) and (other is None or not torch.equal(value, other)):
                diff.append(f'optimizer.state.{idx}.{key}')
    if a['meta']['iter'] != b['meta']['iter']:
        diff.append(f"meta.iter {a['meta']['iter']} != {b['meta']['iter']}")
    return diff


def run_trials(moments: Sequence[str], root: str, setup: Optional[Setup] = None, threads: int = 1,
               verbose: bool = True, data_root: Optional[str] = None) -> List[dict]:
    """Reference run, then one kill-and-resume trial per moment; returns one dict per trial."""
    setup = setup or Setup()
    env = _env(threads)
    data_root = data_root or make_data(osp.join(root, 'data'))
    config = write_config(root, data_root, setup)
    ref_dir = osp.join(root, 'reference')
    t0 = time.time()
    iter_times = run_to_end(train_command(config, ref_dir, False), env, osp.join(root, 'reference.log'))
    ref_wall = time.time() - t0
    steps = sorted(iter_times)
    iter_wall = max((iter_times[steps[-1]] - iter_times[steps[0]]) / max(len(steps) - 1, 1), 0.05)
    reference = osp.join(ref_dir, setup.final_checkpoint)
    if verbose:
        print(f'uninterrupted run: {_iters_logged(osp.join(root, "reference.log"))} iterations in {ref_wall:.1f} s '
              f'({iter_wall:.2f} s per iteration)', flush=True)
    results = []
    for i, moment in enumerate(moments):
        if moment == 'random':
            moment = f'iter:{random.randint(1, steps[-1])}+{random.uniform(0, iter_wall):.2f}'
        work = osp.join(root, f'trial{i}')
        log_path = osp.join(root, f'trial{i}.log')
        what = run_and_kill(train_command(config, work, False), env, log_path, work, moment, setup,
                            max_wall=10 * ref_wall + 60)
        resumes = 0
        while not osp.isfile(osp.join(work, setup.final_checkpoint)):
            run_to_end(train_command(config, work, True), env, log_path)
            resumes += 1
            if resumes > 3:
                raise RuntimeError(f'trial {i}: no final checkpoint after {resumes} resumes; log: {log_path}')
        diff = compare(reference, osp.join(work, setup.final_checkpoint))
        log_text = open(log_path).read()
        resumed_from = [line.split('resuming from ', 1)[1].strip() for line in log_text.splitlines()
                        if '--resume: resuming from ' in line]
        res = dict(moment=moment, what=what, resumes=resumes, identical=not diff, differing=diff,
                   resumed_from=[osp.basename(p) for p in resumed_from],
                   from_scratch='training starts from scratch' in log_text, log=log_path)
        results.append(res)
        if verbose:
            start = res['resumed_from'] or (['scratch'] if res['from_scratch'] else [])
            how = (f'resumed from {", ".join(start)}' if resumes else 'no resume needed: the final checkpoint was '
                   'already complete')
            print(f'trial {i + 1}/{len(moments)}: {what}; {how}; '
                  + ('bit-identical' if not diff else f'{len(diff)} tensors differ (e.g. {diff[:3]})'), flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--trials', type=int, default=10, help='number of random kill moments (without --moments)')
    parser.add_argument('--moments', nargs='+',
                        help='kill moments: iter:K, iter:K+D, save, save:K, saved:K, random (overrides --trials); K is '
                        'the iteration, or the epoch with --epochs')
    parser.add_argument('--iters', type=int, default=6, help='iterations per run (iteration-based loop)')
    parser.add_argument('--interval', type=int, default=2, help='checkpoint interval (iterations)')
    parser.add_argument('--epochs', type=int, default=0,
                        help=f'an epoch-based loop of this many epochs ({ceil(NUM_TRAIN / 2)} iterations each, '
                        'a checkpoint per epoch) instead')
    parser.add_argument('--workers', type=int, default=0, help='train data loader workers')
    parser.add_argument('--persistent-workers', action='store_true', help='persistent_workers=True')
    parser.add_argument('--validate', action='store_true', help='validate at every checkpoint')
    parser.add_argument('--threads', type=int, default=1, help='OMP_NUM_THREADS of the training processes')
    parser.add_argument('--full', action='store_true', help="the demo's full-width model instead of the small one")
    parser.add_argument('--without-rng-state', action='store_true',
                        help='checkpoints without the generator states (shows that resume is then not exact)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random kill moments')
    parser.add_argument('--work-root', help='folder for data, logs and runs (default: a temporary folder)')
    args = parser.parse_args(argv)
    random.seed(args.seed)
    moments = args.moments or ['random'] * args.trials
    root = args.work_root or tempfile.mkdtemp(prefix='resume_trials_')
    os.makedirs(root, exist_ok=True)
    setup = Setup(iters=args.iters, interval=args.interval, workers=args.workers,
                  persistent_workers=args.persistent_workers, epochs=args.epochs, validate=args.validate,
                  full=args.full, rng_state=not args.without_rng_state)
    print(f'work root: {root}; {len(moments)} trials; {setup}; {args.threads} threads', flush=True)
    results = run_trials(moments, root, setup, args.threads)
    killed = [r for r in results if r['what'].startswith('killed')]
    good = sum(r['identical'] for r in killed)
    print(f'{good} of {len(killed)} killed trials bit-identical to the uninterrupted run'
          f' ({len(results) - len(killed)} more finished before their kill moment)')
    return 0 if good == len(killed) and all(r['identical'] for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
