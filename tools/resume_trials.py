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
* ``random``: a uniformly random time within the uninterrupted run's wall time.

Examples::

    python tools/resume_trials.py --trials 20                      # random kill moments, small model
    python tools/resume_trials.py --moments iter:1 save iter:5     # what the CI test runs
    python tools/resume_trials.py --trials 10 --full --workers 2   # the demo's full model, 2 loader workers

It prints one line per trial and ends with ``N of N trials bit-identical``; exit status 1 if any was not.
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


def make_data(root: str, size: int = 64, num_train: int = 12) -> str:
    """The synthetic COCO-format set (``tools/make_synthetic_data.py``) in ``root``, made once."""
    if not osp.isfile(osp.join(root, 'annotations', 'instances_train2017.json')):
        subprocess.run([sys.executable, osp.join(REPO_ROOT, 'tools', 'make_synthetic_data.py'), '--out', root,
                        '--kind', 'coco', '--size', str(size), '--num-train', str(num_train), '--num-val', '2'],
                       check=True, cwd=REPO_ROOT, capture_output=True)
    return root


def write_config(root: str, data_root: str, iters: int, interval: int, workers: int, full: bool,
                 rng_state: bool = True) -> str:
    """A config inheriting the synthetic Mask R-CNN one: ``iters`` iterations, a checkpoint every
    ``interval`` (``max_keep_ckpts=1``, as the demo), drop path 0.2, every iteration logged, no
    validation; the small model unless ``full``. ``rng_state=False`` turns off the generator states
    in the checkpoints (to see what they are for)."""
    path = osp.join(root, 'trial_config.py')
    text = f"""_base_ = [{CONFIG!r}]
train_dataloader = dict(num_workers={workers}, persistent_workers={workers > 0},
                        dataset=dict(data_root={data_root + '/'!r}))
train_cfg = dict(max_iters={iters}, val_interval={iters + 1})
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = None
test_cfg = None
test_evaluator = None
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=2),
    dict(type='CosineAnnealingLR', T_max={max(iters - 2, 1)}, eta_min=2e-5, by_epoch=False, begin=2, end={iters}),
]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval={interval}, max_keep_ckpts=1,
                                                             save_rng_state={rng_state}))
model = dict(backbone=dict(drop_path_rate=0.2))
"""
    if not full:
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


def run_to_end(cmd: List[str], env: Dict[str, str], log_path: str) -> None:
    with open(log_path, 'a') as log:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f'training failed ({proc.returncode}); log: {log_path}\n' + open(log_path).read()[-4000:])


def run_and_kill(cmd: List[str], env: Dict[str, str], log_path: str, work_dir: str, moment: str,
                 max_wall: float) -> str:
    """Start training, SIGKILL it at ``moment``; returns what happened ('killed at ...' or 'finished')."""
    log = open(log_path, 'a')
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    start = time.time()
    kind, _, arg = moment.partition(':')
    deadline = start + (float(arg) if kind == 'random' else max_wall)
    try:
        while proc.poll() is None:
            now = time.time()
            if kind == 'iter' and _log_has_iter(log_path, int(arg)):
                break
            if kind == 'save' and glob.glob(osp.join(glob.escape(work_dir), f'.tmp-*{arg and f"_{arg}.pth"}')):
                break
            if kind == 'saved' and osp.exists(osp.join(work_dir, f'iter_{arg}.pth')):
                break
            if now >= deadline:
                break
            time.sleep(0.001 if kind in ('save', 'saved') else 0.02)
        if proc.poll() is not None:
            return f'finished before the kill moment (exit {proc.returncode})'
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return f'killed at {moment} after {time.time() - start:.1f} s'
    finally:
        log.close()


def _log_has_iter(log_path: str, k: int) -> bool:
    """Whether the training log shows iteration ``k`` (mmengine pads the number: ``[ 3/12]``)."""
    return re.search(r'Iter\(train\) \[\s*%d/' % k, open(log_path).read()) is not None


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


def run_trials(moments: Sequence[str], root: str, iters: int = 6, interval: int = 2, workers: int = 0,
               full: bool = False, threads: int = 1, verbose: bool = True, data_root: Optional[str] = None,
               rng_state: bool = True) -> List[dict]:
    """Reference run, then one kill-and-resume trial per moment; returns one dict per trial."""
    env = _env(threads)
    data_root = data_root or make_data(osp.join(root, 'data'))
    config = write_config(root, data_root, iters, interval, workers, full, rng_state)
    ref_dir = osp.join(root, 'reference')
    t0 = time.time()
    run_to_end(train_command(config, ref_dir, False), env, osp.join(root, 'reference.log'))
    ref_wall = time.time() - t0
    reference = osp.join(ref_dir, f'iter_{iters}.pth')
    if verbose:
        print(f'uninterrupted run: {iters} iterations in {ref_wall:.1f} s', flush=True)
    results = []
    for i, moment in enumerate(moments):
        if moment == 'random':
            moment = f'random:{random.uniform(0.3, 1.0) * ref_wall:.2f}'
        work = osp.join(root, f'trial{i}')
        log_path = osp.join(root, f'trial{i}.log')
        what = run_and_kill(train_command(config, work, False), env, log_path,
                            work, moment, max_wall=10 * ref_wall + 60)
        resumes = 0
        while not osp.isfile(osp.join(work, f'iter_{iters}.pth')):
            run_to_end(train_command(config, work, True), env, log_path)
            resumes += 1
            if resumes > 3:
                raise RuntimeError(f'trial {i}: no final checkpoint after {resumes} resumes; log: {log_path}')
        diff = compare(reference, osp.join(work, f'iter_{iters}.pth'))
        log_text = open(log_path).read()
        resumed_from = [line.split('resuming from ', 1)[1].strip() for line in log_text.splitlines()
                        if '--resume: resuming from ' in line]
        res = dict(moment=moment, what=what, resumes=resumes, identical=not diff, differing=diff,
                   resumed_from=[osp.basename(p) for p in resumed_from],
                   from_scratch='training starts from scratch' in log_text, log=log_path)
        results.append(res)
        if verbose:
            start = res['resumed_from'] or (['scratch'] if res['from_scratch'] else [])
            print(f'trial {i + 1}/{len(moments)}: {what}; resumed from {", ".join(start) or "?"}; '
                  + ('bit-identical' if not diff else f'{len(diff)} tensors differ (e.g. {diff[:3]})'), flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--trials', type=int, default=10, help='number of random kill moments (without --moments)')
    parser.add_argument('--moments', nargs='+',
                        help='kill moments: iter:K, save, save:K, saved:K, random (overrides --trials)')
    parser.add_argument('--iters', type=int, default=6, help='iterations per run')
    parser.add_argument('--interval', type=int, default=2, help='checkpoint interval (iterations)')
    parser.add_argument('--workers', type=int, default=0, help='train data loader workers')
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
    print(f'work root: {root}; {len(moments)} trials, {args.iters} iterations, checkpoint every {args.interval}, '
          f'max_keep_ckpts=1, {args.workers} loader workers, {args.threads} threads', flush=True)
    results = run_trials(moments, root, args.iters, args.interval, args.workers, args.full, args.threads,
                         rng_state=not args.without_rng_state)
    good = sum(r['identical'] for r in results)
    print(f'{good} of {len(results)} trials bit-identical to the uninterrupted run')
    return 0 if good == len(results) else 1


if __name__ == '__main__':
    sys.exit(main())
