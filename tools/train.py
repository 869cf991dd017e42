#!/usr/bin/env python
"""Train an mmdet or mmseg model, with vit_backbones' backbones available.

One entry point for both libraries: the config's ``default_scope`` (``'mmdet'`` or ``'mmseg'``)
decides which library's modules are registered. Examples::

    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]] [--cfg-options k=v ...]
    python -m torch.distributed.run --nproc_per_node 2 tools/train.py CONFIG --launcher pytorch

Unlike mmdet's and mmseg's own tools this also runs distributed training on machines without
CUDA (gloo backend), mixed precision on the CPU (bfloat16 autocast), and resumes from the
checkpoints mmengine writes under PyTorch >= 2.6 (whose ``torch.load`` is ``weights_only``).
"""
import argparse
import os
import os.path as osp
import sys
from typing import List, Optional

from mmengine.config import Config, DictAction

try:
    import vit_backbones  # noqa: F401  (registers our backbones)
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
    import vit_backbones  # noqa: F401

from vit_backbones.runtime import (allow_mmengine_checkpoints, enable_amp, find_resume_checkpoint,
                                   keep_freed_memory, prepare_distributed, register_scope_modules, resolve_scope,
                                   use_safe_checkpoint_hook)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line (``argv``, default ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description='Train an mmdet or mmseg model (vit_backbones available)')
    parser.add_argument('config', help='train config file path (an mmdet or mmseg config)')
    parser.add_argument('--work-dir', help='directory for logs and checkpoints '
                        '(default: the config\'s work_dir, else ./work_dirs/<config name>)')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume training: with a checkpoint path, from that checkpoint; with no value, from the '
        'newest checkpoint in the work dir that loads (missing, partial or corrupt ones are skipped with a '
        'warning; training starts from scratch if there is none)')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='mixed-precision training. With CUDA: float16 autocast with dynamic loss scaling '
        '(mmengine AmpOptimWrapper). Without CUDA: bfloat16 autocast on the CPU, no loss scaling '
        '(vit_backbones BF16AutocastOptimWrapper); parameters and optimizer state stay float32')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate by the total batch size (the config\'s auto_scale_lr)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value pairs merged into the config, e.g. '
        'train_cfg.max_iters=10 "model.backbone.out_indices=(1,2,3)"; lists as key="[a,b]" '
        '(quotes needed, no white space)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher; without CUDA the processes use the gloo backend')
    # torch.distributed.launch passes --local-rank (newer) or --local_rank (older).
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_config(args: argparse.Namespace) -> Config:
    """Load the config and apply the command-line arguments to it (without side effects elsewhere)."""
    if not osp.isfile(args.config):
        raise FileNotFoundError(f'config file not found: {args.config}')
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)

    # work_dir: command line > config > ./work_dirs/<config name>
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    if args.amp:
        enable_amp(cfg)

    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise KeyError('--auto-scale-lr needs auto_scale_lr=dict(base_batch_size=...) in the config')
        cfg.auto_scale_lr.enable = True

    # Crash-safe checkpoints with the generator states (exact resume) instead of mmengine's CheckpointHook.
    use_safe_checkpoint_hook(cfg)

    if args.resume == 'auto':
        allow_mmengine_checkpoints()
        found = find_resume_checkpoint(cfg.work_dir) if osp.isdir(cfg.work_dir) else None
        if found is None:
            print(f'--resume: no complete checkpoint in {cfg.work_dir}; training starts from scratch', flush=True)
            cfg.resume = False
        else:
            print(f'--resume: resuming from {found}', flush=True)
            cfg.resume = True
            cfg.load_from = found
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise FileNotFoundError(f'--resume checkpoint not found: {args.resume}')
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def main(argv: Optional[List[str]] = None) -> None:
    """Train according to the command line."""
    args = parse_args(argv)
    print(keep_freed_memory(), flush=True)
    allow_mmengine_checkpoints()
    cfg = build_config(args)
    scope = resolve_scope(cfg)
    cfg.default_scope = scope
    register_scope_modules(scope)
    prepare_distributed(cfg, args.launcher)

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if 'runner_type' in cfg:
        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    runner.train()


if __name__ == '__main__':
    main()
