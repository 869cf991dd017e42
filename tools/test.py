#!/usr/bin/env python
"""Test (evaluate) an mmdet or mmseg model from a checkpoint, with vit_backbones' backbones available.

One entry point for both libraries: the config's ``default_scope`` (``'mmdet'`` or ``'mmseg'``)
decides which library's modules are registered. Examples::

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE] [--show-dir DIR]
    python -m torch.distributed.run --nproc_per_node 2 tools/test.py CONFIG CHECKPOINT --launcher pytorch

The checkpoint is read with ``torch.load(weights_only=True)`` plus the allow-list of the types
mmengine writes (see ``vit_backbones.runtime.allow_mmengine_checkpoints``).
"""
import argparse
import os
import os.path as osp
import sys
from typing import Any, Dict, List, Optional

from mmengine.config import Config, ConfigDict, DictAction

try:
    import vit_backbones  # noqa: F401  (registers our backbones)
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
    import vit_backbones  # noqa: F401

from vit_backbones.runtime import (allow_mmengine_checkpoints, keep_freed_memory, prepare_distributed,
                                   register_scope_modules, resolve_scope)

PICKLE_SUFFIXES = ('.pkl', '.pickle')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line (``argv``, default ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description='Test (and evaluate) an mmdet or mmseg model '
                                     '(vit_backbones available)')
    parser.add_argument('config', help='test config file path (an mmdet or mmseg config)')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='directory for the log and the metrics json '
                        '(default: the config\'s work_dir, else ./work_dirs/<config name>)')
    parser.add_argument(
        '--out',
        help='save the predictions. A path ending in .pkl/.pickle: dump all predictions to that pickle file '
        '(mmdet and mmseg). Any other path (mmseg only): a directory that receives one predicted label PNG '
        'per image, as mmseg\'s own tool does')
    parser.add_argument('--show-dir', help='directory where images painted with the predictions are saved '
                        '(mmdet: DIR/<image name>; mmseg: DIR/vis_data/vis_image/)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value pairs merged into the config, e.g. '
        'test_dataloader.batch_size=2; lists as key="[a,b]" (quotes needed, no white space)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher; without CUDA the processes use the gloo backend')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def _evaluators(cfg: Config) -> List[Any]:
    """``cfg.test_evaluator`` as a list of metric configs (an ``Evaluator`` dict's ``metrics``, a list, or one)."""
    evaluator = cfg.get('test_evaluator')
    if evaluator is None:
        raise KeyError('the config has no test_evaluator')
    if isinstance(evaluator, dict) and 'metrics' in evaluator:
        metrics = evaluator['metrics']
        return list(metrics) if isinstance(metrics, (list, tuple)) else [metrics]
    return list(evaluator) if isinstance(evaluator, (list, tuple)) else [evaluator]


def _set_evaluators(cfg: Config, metrics: List[Any]) -> None:
    evaluator = cfg.test_evaluator
    if isinstance(evaluator, dict) and 'metrics' in evaluator:
        evaluator['metrics'] = metrics
    else:
        cfg.test_evaluator = metrics if len(metrics) > 1 else metrics[0]


def add_prediction_output(cfg: Config, scope: str, out: str) -> None:
    """Make the test run save its predictions to ``out`` (see ``--out``)."""
    out = osp.abspath(out)
    metrics = _evaluators(cfg)
    if out.endswith(PICKLE_SUFFIXES):
        dump_type = 'DumpDetResults' if scope == 'mmdet' else 'mmengine.DumpResults'
        metrics.append(ConfigDict(type=dump_type, out_file_path=out))
        _set_evaluators(cfg, metrics)
    elif scope == 'mmseg':
        seg_metrics = [m for m in metrics if isinstance(m, dict) and 'IoUMetric' in str(m.get('type', ''))]
        if not seg_metrics:
            raise ValueError('--out DIR (prediction PNGs) needs an IoUMetric in test_evaluator; '
                             'use --out FILE.pkl to dump the predictions instead')
        for metric in seg_metrics:
            metric['output_dir'] = out
        _set_evaluators(cfg, metrics)
    else:
        raise ValueError(f'--out for an mmdet config must be a pickle file ending in .pkl or .pickle, got {out!r}')


def enable_visualization(cfg: Config, scope: str, show_dir: str) -> None:
    """Turn on the config's visualization hook and send every painted test image to ``show_dir``."""
    hooks: Dict[str, Any] = cfg.get('default_hooks') or {}
    hook = hooks.get('visualization')
    if hook is None:
        hook_type = 'DetVisualizationHook' if scope == 'mmdet' else 'SegVisualizationHook'
        raise KeyError(f'--show-dir needs default_hooks.visualization (e.g. dict(type="{hook_type}")) '
                       'and a visualizer in the config')
    show_dir = osp.abspath(show_dir)
    hook['draw'] = True
    if scope == 'mmdet':
        hook['test_out_dir'] = show_dir  # absolute, so it is not put under work_dir/timestamp
    else:
        hook['interval'] = 1
        if cfg.get('visualizer') is None:
            raise KeyError('--show-dir needs a visualizer in the config, e.g. '
                           'dict(type="SegLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")])')
        cfg.visualizer['save_dir'] = show_dir


def build_config(args: argparse.Namespace) -> Config:
    """Load the config and apply the command-line arguments to it."""
    if not osp.isfile(args.config):
        raise FileNotFoundError(f'config file not found: {args.config}')
    if not osp.isfile(args.checkpoint) and not args.checkpoint.startswith(('http://', 'https://')):
        raise FileNotFoundError(f'checkpoint file not found: {args.checkpoint}')
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    scope = resolve_scope(cfg)
    cfg.default_scope = scope

    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    cfg.load_from = args.checkpoint
    cfg.resume = False
    if args.show_dir:
        enable_visualization(cfg, scope, args.show_dir)
    if args.out:
        add_prediction_output(cfg, scope, args.out)
    return cfg


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    """Test according to the command line; returns the metrics."""
    args = parse_args(argv)
    print(keep_freed_memory(), flush=True)
    allow_mmengine_checkpoints()
    cfg = build_config(args)
    register_scope_modules(cfg.default_scope)
    prepare_distributed(cfg, args.launcher)

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if 'runner_type' in cfg:
        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    return runner.test()


if __name__ == '__main__':
    main()
