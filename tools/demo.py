"""End-to-end demo: Mask R-CNN + Swin-T learns to find and segment shapes, on a CPU, in minutes.

``python tools/demo.py`` (no arguments needed):

1. writes a small synthetic COCO-format instance segmentation set (ellipses, rectangles and triangles
   on textured backgrounds, see ``vit_backbones.data.synthetic``) into the work dir, unless it is there;
2. builds Mask R-CNN + FPN with our ``Swin`` backbone from ``configs/demo/mask_rcnn_swin_t_synthetic.py``
   (random initial weights: no pretrained checkpoint is downloaded) and a plain mmengine ``Runner``;
3. evaluates the untrained model on the held-out validation images (COCO bbox and mask mAP through
   mmdet's ``CocoMetric``), trains it, and evaluates it again;
4. draws ground truth, untrained and trained predictions for a few validation images side by side
   (``<work-dir>/predictions.png``) and writes every number to ``<work-dir>/demo_metrics.json``;
5. prints a summary: mAP before and after, iterations, wall time, where the picture is.

The config's 500 iterations take about 10 minutes on an otherwise idle 2-core CPU. When the CPU is
shared and slower, a time budget (``--time-budget``, 12 minutes by default) measures the speed during
the first iterations and trains fewer (and anneals the learning rate sooner) so that the whole demo
still ends within the budget; the summary says how many iterations ran. ``--iters N`` fixes the count.
``--quick`` runs a few iterations on a handful of images (a smoke test; its mAP means nothing).
"""
import argparse
import json
import os
import os.path as osp
import sys
import time

import numpy as np

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO_ROOT not in sys.path:  # running from a checkout without the package installed
    sys.path.insert(0, REPO_ROOT)

DEFAULT_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'mask_rcnn_swin_t_synthetic.py')
# mmdet's own Swin-T, for comparing with ours (--backbone mmdet); same channels and strides.
MMDET_SWIN_T = dict(
    type='mmdet.SwinTransformer', embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
    window_size=7, mlp_ratio=4, qkv_bias=True, drop_path_rate=0.0, patch_norm=True,
    out_indices=(0, 1, 2, 3), with_cp=False, init_cfg=None)


def parse_args(argv=None):
    """Parse the command line.

    Args:
        argv: Arguments (``sys.argv[1:]`` when None).

    Returns:
        The parsed ``argparse.Namespace``.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work-dir', default='work_dirs/demo', help='where data, logs, picture and metrics go')
    parser.add_argument('--iters', type=int, default=None, help='training iterations (default: the config\'s)')
    parser.add_argument('--time-budget', type=float, default=12.0,
                        help='minutes of wall time the whole demo may take: when the measured speed says the '
                             "config's iterations would not fit, it trains fewer (ignored with --iters; 0: no budget)")
    parser.add_argument('--quick', action='store_true',
                        help='smoke test: 4 iterations, 8 train / 4 val images, no checkpoint')
    parser.add_argument('--config', default=DEFAULT_CONFIG, help='demo config to train')
    parser.add_argument('--num-train', type=int, default=None, help='synthetic training images (default 200)')
    parser.add_argument('--num-val', type=int, default=None, help='synthetic validation images (default 40)')
    parser.add_argument('--image-size', type=int, default=None,
                        help="side of the square synthetic images and of the model's input (default: the config's)")
    parser.add_argument('--seed', type=int, default=0, help='seed of the data and of training')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: the cores not already busy, see choose_threads)')
    parser.add_argument('--backbone', choices=('ours', 'mmdet'), default='ours',
                        help="ours: vit_backbones' Swin (default); mmdet: mmdet's SwinTransformer, for comparison")
    parser.add_argument('--vis-images', type=int, default=4, help='validation images in the picture')
    parser.add_argument('--score-thr', type=float, default=0.3, help='score threshold of drawn predictions')
    parser.add_argument('--max-drawn', type=int, default=8, help='at most this many predictions drawn per image')
    parser.add_argument('--no-checkpoint', action='store_true', help='do not save the trained weights')
    return parser.parse_args(argv)


def log(msg):
    """Print a phase line, flushed, so it interleaves correctly with mmengine's logger."""
    print(f'[demo {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def choose_threads(requested=None):
    """Pick the number of torch CPU threads.

    With every core free, use them all. When other processes already keep cores busy (the 1-minute
    load average), use only the idle ones: torch's parallel ops wait for their slowest thread, so
    threads that must share a core with another busy process make each op wait for the scheduler.
    Measured on a 2-core machine with two other busy processes: with one thread a Mask R-CNN Swin-T
    training step took 2.7-3.2 s, with two 10-11 s.

    Args:
        requested: An explicit count, used as is when given.

    Returns:
        ``(threads, reason)``.
    """
    cores = os.cpu_count() or 1
    if requested:
        return requested, 'as requested'
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return cores, f'{cores} cores'
    threads = max(1, min(cores, int(cores - load + 0.5)))
    return threads, f'{cores} cores, load average {load:.1f} from other processes'


# ------------------------------------------------------------------------------------------------- data

def ensure_dataset(root, num_train, num_val, image_size, seed, classes):
    """Write the synthetic COCO set into ``root`` unless an identical one is already there.

    Args:
        root: Dataset root.
        num_train: Training images.
        num_val: Validation images.
        image_size: Side of the square images.
        seed: Generator seed.
        classes: Shape class names.

    Returns:
        True if the set was (re)written, False if it was reused.
    """
    from vit_backbones.data import make_coco_instances
    params = dict(num_train=num_train, num_val=num_val, image_size=[image_size, image_size], seed=seed,
                  classes=list(classes))
    marker = osp.join(root, 'generator_params.json')
    if osp.exists(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return False
    make_coco_instances(root, num_train, num_val, image_size=(image_size, image_size), seed=seed,
                        classes=classes)
    with open(marker, 'w') as f:
        json.dump(params, f)
    return True


# --------------------------------------------------------------------------------------------- config

def build_config(args, data_root, work_dir, iters):
    """Load the demo config and point it at the generated data and the work dir.

    Args:
        args: Parsed command line.
        data_root: Synthetic COCO root (ending with a separator).
        work_dir: Work dir.
        iters: Training iterations.

    Returns:
        The ``mmengine.Config``.
    """
    from mmengine.config import Config
    cfg = Config.fromfile(args.config)
    cfg.work_dir = work_dir
    cfg.randomness = dict(seed=args.seed, deterministic=False)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = data_root
    ann = osp.join(data_root, 'annotations', 'instances_val2017.json')
    cfg.val_evaluator.ann_file = ann
    cfg.test_evaluator.ann_file = ann
    if args.image_size:
        for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            for step in cfg[loader].dataset.pipeline:
                if step['type'] == 'Resize':
                    step['scale'] = (args.image_size, args.image_size)
    if args.backbone == 'mmdet':
        cfg.model.backbone = dict(MMDET_SWIN_T)
    base_iters = cfg.train_cfg.max_iters
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = iters
    # Stretch the schedule's iteration boundaries to the requested length.
    for sched in cfg.param_scheduler:
        for key in ('begin', 'end', 'T_max'):
            if key in sched and sched[key] is not None:
                sched[key] = max(1, round(sched[key] * iters / base_iters)) if sched[key] else 0
    cfg.default_hooks.logger.interval = max(1, min(cfg.default_hooks.logger.interval, iters // 10 or 1))
    if args.quick or args.no_checkpoint:
        cfg.default_hooks.checkpoint = dict(type='SafeCheckpointHook', by_epoch=False, interval=-1, save_last=False)
    else:
        cfg.default_hooks.checkpoint = dict(type='SafeCheckpointHook', by_epoch=False, interval=iters,
                                            max_keep_ckpts=1, save_optimizer=False, save_param_scheduler=False)
    return cfg


# --------------------------------------------------------------------------------------------- hooks

def make_demo_hook(vis_indices, t_start, budget_s=None, decide_at=20, recheck_every=20, clock=time.time,
                   save_on_stop=False):
    """Build the hook that evaluates before training, records every validation and keeps the time budget.

    The time budget: after ``decide_at`` training iterations the hook measures the time per iteration
    (leaving out the first two, which are slower) and, if the configured iterations would not fit in
    ``budget_s`` seconds of wall time (counted from ``t_start``; room is kept for the final evaluation,
    estimated by the untrained one, for the picture, and a 10% margin), it plans a shorter run. Every
    ``recheck_every`` iterations after that it projects the end time again from the recent speed (the
    slower of the last ``recheck_every`` and the last 5 iterations) and, should the machine have slowed
    down so much that the run would overrun the budget, plans a shorter one again. The decay schedule
    that ends with the run (cosine or poly, both in mmengine's chainable form) is re-fitted to end at the
    planned length, so the run still anneals to its final learning rate; a warmup that has already
    started is left alone. The hook never lengthens a run.

    A shortened run ends as mmengine's ``EarlyStoppingHook`` ends one, through the public
    ``runner.train_loop.stop_training`` flag once the planned iterations are done; the train loop
    validates only at its configured end, so the hook then runs the final validation itself (and, with
    ``save_on_stop``, saves the weights through ``runner.save_checkpoint``).

    Args:
        vis_indices: Validation-set indices whose untrained predictions are kept for the picture.
        t_start: ``clock()`` at the start of the demo.
        budget_s: Wall-time budget of the whole demo in seconds; None: no budget.
        decide_at: Iteration at which the number of iterations is first decided.
        recheck_every: Iterations between later checks against the budget.
        clock: Returns the current time in seconds (``time.time``; replaceable for tests).
        save_on_stop: Save the weights when the budget ends the run early.

    Returns:
        A ``mmengine.hooks.Hook`` instance with ``results`` (list of ``(iteration, metrics, seconds)``),
        ``untrained_predictions`` (dataset index -> prediction dict), ``train_start``, ``stop_at`` (the
        planned number of iterations; None until training starts or a budget decision is made) and
        ``planned`` (the iteration count configured and the one finally planned; None until training
        starts or, in tests that skip ``before_train``, until a budget decision shortens the run).
    """
    from mmengine.hooks import Hook

    class DemoHook(Hook):
        """Evaluates the freshly initialised model in ``before_train``, records metrics, keeps the budget."""

        priority = 'LOWEST'

        def __init__(self):
            self.results = []
            self.untrained_predictions = {}
            self.train_start = None
            self.planned = None
            self.stop_at = None
            self._stopped = False
            self._val_start = None
            self._iter_starts = []

        def before_train(self, runner):
            log('evaluating the UNTRAINED model (weights as initialised for training) ...')
            self.untrained_predictions = predict(runner.model, runner.val_dataloader.dataset, vis_indices)
            runner.val_loop.run()
            self.train_start = clock()
            self.planned = (runner.max_iters, runner.max_iters)
            self.stop_at = runner.max_iters
            log(f'training for {runner.max_iters} iterations'
                + (f' (fewer if they would not fit the {budget_s / 60:.1f}-minute budget)' if budget_s else '')
                + ' ...')

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            now = clock()
            self._iter_starts.append(now)
            it = runner.iter
            end = self.stop_at or runner.max_iters
            if budget_s is None or it < decide_at or it >= end - 1:
                return
            # seconds kept for the final evaluation, the picture and the checkpoint
            tail_s = 1.1 * (self.results[0][2] if self.results else 0.0) + 20.0
            starts = self._iter_starts
            if it == decide_at:
                per_iter = (starts[-1] - starts[2]) / (len(starts) - 3)
            elif (it - decide_at) % recheck_every == 0:
                # the slower of the last `recheck_every` and the last 5 iterations: a slowdown shows first
                # in the latest ones
                per_iter = max((starts[-1] - starts[-1 - recheck_every]) / recheck_every,
                               (starts[-1] - starts[-6]) / 5)
                projected = (now - t_start) + (end - it) * per_iter + tail_s
                if projected <= budget_s:
                    return
            else:
                return
            fit = it + int(0.9 * (budget_s - (now - t_start) - tail_s) / per_iter)
            if fit >= end:
                log(f'{per_iter:.2f} s/iteration: all {end} iterations fit the budget')
                return
            # keep at least 10 iterations of every schedule that has not started yet (the decay)
            pending = [sched.begin for sched in self._schedulers(runner) if sched.begin > it]
            new = max(it + 2, max(pending, default=0) + 10, fit)
            if new >= end:
                return
            self._plan(runner, end, new)
            log(f'{per_iter:.2f} s/iteration: {end} iterations would not fit the {budget_s / 60:.1f}-minute '
                f'budget; training for {new} instead (--iters N fixes the count)')
            self.planned = ((self.planned or (end,))[0], new)

        def _plan(self, runner, old, new):
            """End the run after ``new`` iterations instead of ``old``: the schedules that end with the run
            are re-fitted to end there, and :meth:`after_train_iter` stops the loop."""
            self.stop_at = new
            for sched in self._schedulers(runner):
                if sched.end < old:
                    continue  # ends before the run does (the warmup): leave it as it is
                sched.end = new
                if hasattr(sched, 'T_max'):  # cosine
                    sched.T_max = new - sched.begin
                if hasattr(sched, 'total_iters'):  # poly
                    sched.total_iters = new - sched.begin - 1

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if self.stop_at is not None and runner.iter + 1 >= self.stop_at and self.stop_at < runner.max_iters:
                runner.train_loop.stop_training = True
                self._stopped = True

        def after_train(self, runner):
            if not self._stopped:
                return  # the loop ran to its configured end and validated there
            runner.val_loop.run()
            if save_on_stop:
                runner.save_checkpoint(runner.work_dir, f'iter_{runner.iter}.pth', save_optimizer=False,
                                       save_param_scheduler=False)

        @staticmethod
        def _schedulers(runner):
            schedulers = runner.param_schedulers or []
            if isinstance(schedulers, dict):
                schedulers = [s for group in schedulers.values() for s in group]
            return list(schedulers)

        def before_val(self, runner):
            self._val_start = clock()

        def after_val_epoch(self, runner, metrics=None):
            self.results.append((runner.iter, dict(metrics or {}), clock() - self._val_start))

    return DemoHook()


# ----------------------------------------------------------------------------------------- prediction

def predict(model, dataset, indices):
    """Run the model on some dataset items.

    Args:
        model: An mmdet detector.
        dataset: The (test-mode) dataset.
        indices: Which items.

    Returns:
        Dict index -> ``dict(bboxes, labels, scores, masks)`` numpy arrays in original image
        coordinates.
    """
    import torch
    from mmengine.dataset import pseudo_collate
    was_training = model.training
    model.eval()
    out = {}
    with torch.no_grad():
        for i in indices:
            sample = model.test_step(pseudo_collate([dataset[i]]))[0]
            pred = sample.pred_instances
            out[i] = dict(
                bboxes=pred.bboxes.cpu().numpy(),
                labels=pred.labels.cpu().numpy(),
                scores=pred.scores.cpu().numpy(),
                masks=(pred.masks.cpu().numpy().astype(bool) if 'masks' in pred
                       else np.zeros((0,) + tuple(sample.ori_shape), bool)),
                img_path=sample.img_path)
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------- main

def _coco_numbers(metrics):
    keys = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'segm_mAP', 'segm_mAP_50', 'segm_mAP_75')
    return {k: float(metrics.get(f'coco/{k}', float('nan'))) for k in keys}


def main(argv=None):
    """Run the demo; returns the summary dict that is also written to ``demo_metrics.json``.

    Args:
        argv: Arguments (``sys.argv[1:]`` when None).
    """
    args = parse_args(argv)
    t_start = time.time()
    load_at_start = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
    import torch
    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)

    import vit_backbones  # noqa: F401  (registers our backbones and SafeCheckpointHook)
    import mmdet  # noqa: F401  (registers mmdet's modules)
    from mmengine.runner import Runner

    work_dir = osp.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    num_train = args.num_train or (8 if args.quick else 200)
    num_val = args.num_val or (4 if args.quick else 40)
    from mmengine.config import Config
    base_cfg = Config.fromfile(args.config)
    classes = tuple(base_cfg.metainfo['classes'])
    image_size = args.image_size or int(base_cfg.img_scale[0])
    data_root = osp.join(work_dir, 'data', 'synthetic_coco') + os.sep
    log(f'synthetic COCO set: {num_train} train / {num_val} val images of {image_size}px, '
        f'classes {classes}')
    wrote = ensure_dataset(data_root, num_train, num_val, image_size, args.seed, classes)
    log(('wrote' if wrote else 'reusing') + f' {data_root}')

    iters = args.iters or (4 if args.quick else base_cfg.train_cfg.max_iters)
    cfg = build_config(args, data_root, work_dir, iters)
    log(f'building Mask R-CNN + FPN + {"our Swin-T" if args.backbone == "ours" else "mmdet SwinTransformer"} '
        f'({osp.relpath(args.config, os.getcwd())}); torch threads: {threads} ({why})')
    runner = Runner.from_cfg(cfg)
    torch.set_num_threads(threads)
    vis_indices = list(range(min(args.vis_images, num_val)))
    budget_s = None if (args.iters or args.quick or not args.time_budget) else 60 * args.time_budget
    hook = make_demo_hook(vis_indices, t_start, budget_s, save_on_stop=not (args.quick or args.no_checkpoint))
    runner.register_hook(hook, priority='LOWEST')

    runner.train()
    t_train_end = time.time()
    if len(hook.results) < 2:
        raise RuntimeError(f'expected a validation before and after training, got {len(hook.results)}')
    (_, untrained_metrics, untrained_eval_s), (final_iter, trained_metrics, trained_eval_s) = \
        hook.results[0], hook.results[-1]
    train_s = t_train_end - hook.train_start - trained_eval_s

    log('drawing predictions ...')
    from vit_backbones.data.draw import draw_predictions
    trained_preds = predict(runner.model, runner.val_dataloader.dataset, vis_indices)
    picture = osp.join(work_dir, 'predictions.png')
    draw_predictions(picture, cfg.val_evaluator.ann_file, classes, hook.untrained_predictions, trained_preds,
                     args.score_thr, args.max_drawn)

    wall_s = time.time() - t_start
    summary = dict(
        config=osp.relpath(args.config, REPO_ROOT),
        backbone=cfg.model.backbone['type'],
        quick=bool(args.quick),
        iterations=int(final_iter),
        batch_size=int(cfg.train_dataloader.batch_size),
        num_train_images=num_train,
        num_val_images=num_val,
        image_size=image_size,
        classes=list(classes),
        seed=args.seed,
        torch_threads=threads,
        load_average_at_start=None if load_at_start is None else round(load_at_start, 2),
        time_budget_min=None if budget_s is None else args.time_budget,
        configured_iterations=int(iters),
        untrained=_coco_numbers(untrained_metrics),
        trained=_coco_numbers(trained_metrics),
        seconds=dict(wall=round(wall_s, 1), train=round(train_s, 1),
                     per_iter=round(train_s / max(final_iter, 1), 3),
                     eval_untrained=round(untrained_eval_s, 1), eval_trained=round(trained_eval_s, 1)),
        picture=picture,
        work_dir=work_dir)
    with open(osp.join(work_dir, 'demo_metrics.json'), 'w') as f:
        json.dump(summary, f, indent=2)

    u, t = summary['untrained'], summary['trained']
    print('\n' + '=' * 78)
    print(f'Mask R-CNN + FPN + Swin-T ({summary["backbone"]}) on synthetic shapes, CPU, random init'
          + ('  [--quick smoke test: numbers mean nothing]' if args.quick else ''))
    print(f'  data       : {num_train} train / {num_val} held-out val images, {image_size}px, '
          f'{len(classes)} classes')
    shortened = f' (time budget: shortened from {iters})' if final_iter < iters else ''
    print(f'  training   : {final_iter} iterations x batch {summary["batch_size"]}, '
          f'{train_s:.0f} s ({summary["seconds"]["per_iter"]:.2f} s/iter, {threads} torch threads){shortened}')
    print(f'  {"":10s}   {"untrained":>10s} {"trained":>10s}')
    for key, name in (('bbox_mAP', 'bbox mAP'), ('bbox_mAP_50', 'bbox AP50'),
                      ('segm_mAP', 'mask mAP'), ('segm_mAP_50', 'mask AP50')):
        print(f'  {name:10s} : {u[key]:10.3f} {t[key]:10.3f}')
    print(f'  wall time  : {wall_s:.0f} s ({wall_s / 60:.1f} min) in all')
    print(f'  picture    : {picture}')
    print(f'  metrics    : {osp.join(work_dir, "demo_metrics.json")}')
    print('=' * 78, flush=True)
    return summary


if __name__ == '__main__':
    main()
