"""tools/demo.py --quick runs end to end: data, untrained eval, training, eval, picture, metrics json."""
import json
import math
import os
import subprocess
import sys

import cv2

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_quick_end_to_end(tmp_path):
    work = tmp_path / 'demo'
    res = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, 'tools', 'demo.py'), '--quick', '--work-dir', str(work)],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]

    # the synthetic data went into the work dir, in the COCO layout
    data = work / 'data' / 'synthetic_coco'
    assert len(os.listdir(data / 'train2017')) == 8 and len(os.listdir(data / 'val2017')) == 4
    assert (data / 'annotations' / 'instances_val2017.json').exists()

    with open(work / 'demo_metrics.json') as f:
        summary = json.load(f)
    assert summary['quick'] is True
    assert summary['iterations'] == 4
    assert summary['backbone'] == 'Swin'
    assert summary['num_val_images'] == 4
    for stage in ('untrained', 'trained'):
        for key in ('bbox_mAP', 'bbox_mAP_50', 'segm_mAP', 'segm_mAP_50'):
            value = summary[stage][key]
            assert not math.isnan(value) and 0.0 <= value <= 1.0, (stage, key, value)
    assert summary['seconds']['train'] > 0 and summary['seconds']['wall'] >= summary['seconds']['train']

    # the picture: header, one row per val image (ground truth | untrained | trained), footer
    assert summary['picture'] == str(work / 'predictions.png')
    img = cv2.imread(summary['picture'])
    assert img is not None
    panel = 2 * summary['image_size']
    assert img.shape == (28 + 4 * (panel + 6) + 24, 3 * panel + 12, 3)
    assert img.std() > 20  # an actual picture, not a blank canvas

    # the printed summary reports the numbers that went into the json
    assert 'bbox mAP' in res.stdout and 'mask mAP' in res.stdout
    assert f'{summary["trained"]["bbox_mAP"]:10.3f}' in res.stdout
    assert 'evaluating the UNTRAINED model' in res.stdout


def _load_demo_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location('vit_demo', os.path.join(REPO_ROOT, 'tools', 'demo.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakeLoop:
    """A train loop whose length is fixed (no attribute but ``stop_training`` can be set)."""
    __slots__ = ('stop_training', '_length')

    def __init__(self, max_iters):
        self._length = max_iters
        self.stop_training = False

    @property
    def max_iters(self):
        return self._length


class _FakeValLoop:
    def __init__(self):
        self.runs = 0

    def run(self):
        self.runs += 1


class _FakeRunner:
    """What the demo hook's time budget reads and writes on a Runner."""

    def __init__(self, max_iters, schedulers):
        self.iter = 0
        self.train_loop = _FakeLoop(max_iters)
        self.val_loop = _FakeValLoop()
        self.param_schedulers = schedulers

    @property
    def max_iters(self):
        return self.train_loop.max_iters


def _schedule(max_iters=600, warmup=40, lr=4e-4):
    import torch
    from mmengine.optim.scheduler import CosineAnnealingLR, LinearLR
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    warm = LinearLR(opt, start_factor=0.01, by_epoch=False, begin=0, end=warmup)
    cos = CosineAnnealingLR(opt, T_max=max_iters - warmup, eta_min=lr * 0.05, by_epoch=False, begin=warmup,
                            end=max_iters)
    return opt, warm, cos


class _Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def _drive(hook, clock, runner, opt, schedulers, seconds_per_iter, upto):
    """Run the train loop's hook calls for iterations 0..upto-1 on a fake clock, stepping the schedulers,
    as mmengine's ``IterBasedTrainLoop`` does (it stops at ``max_iters`` or when ``stop_training`` is set),
    then ``after_train``.

    ``seconds_per_iter(i)`` is how long iteration ``i`` takes. Returns the lr used by each iteration.
    """
    lrs = []
    for i in range(upto):
        runner.iter = i
        if i >= runner.max_iters or runner.train_loop.stop_training:
            break
        hook.before_train_iter(runner, i)
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        for s in schedulers:
            s.step()
        clock.now += seconds_per_iter(i)
        hook.after_train_iter(runner, i)
    runner.iter = len(lrs)
    hook.after_train(runner)
    return lrs


def _non_increasing(values):
    return all(a >= b - 1e-12 for a, b in zip(values, values[1:]))


def test_time_budget_shortens_the_run_and_refits_the_decay():
    demo = _load_demo_module()
    opt, warm, cos = _schedule()
    runner = _FakeRunner(600, [warm, cos])
    # 100 s spent before training, 2 s per iteration, 300 s budget: 600 iterations cannot fit
    clock = _Clock(100.0)
    hook = demo.make_demo_hook([], t_start=0.0, budget_s=300.0, clock=clock)
    lrs = _drive(hook, clock, runner, opt, [warm, cos], lambda i: 2.0, 600)
    expected = 20 + int(0.9 * (300.0 - (100.0 + 20 * 2.0) - 20.0) / 2.0)
    assert hook.stop_at == expected == hook.planned[1] and hook.planned[0] == 600
    # stopped through the loop's public flag after the planned iterations; the loop itself is unchanged
    assert runner.train_loop.stop_training and runner.max_iters == 600
    assert runner.val_loop.runs == 1  # the final validation, which the loop runs only at its own end
    assert (warm.begin, warm.end) == (0, 40)  # the warmup is left alone
    assert (cos.begin, cos.end, cos.T_max) == (40, expected, expected - 40)
    assert len(lrs) == expected
    assert abs(lrs[40] - 4e-4) < 1e-9  # warmup reached the base lr
    assert lrs[-1] < 0.1 * 4e-4  # the cosine annealed to near eta_min (2e-5) within the shortened run
    assert _non_increasing(lrs[40:])
    # the run it planned does fit: 100 s before + iterations + 20 s kept for the end <= budget
    assert 100.0 + 2.0 * expected + 20.0 <= 300.0


def test_time_budget_shortens_again_when_the_machine_slows_down():
    demo = _load_demo_module()
    opt, warm, cos = _schedule()
    runner = _FakeRunner(600, [warm, cos])
    clock = _Clock(100.0)
    hook = demo.make_demo_hook([], t_start=0.0, budget_s=400.0, clock=clock)
    # 2 s per iteration until iteration 50, then 6 s: the first plan no longer fits
    lrs = _drive(hook, clock, runner, opt, [warm, cos], lambda i: 2.0 if i < 50 else 6.0, 600)
    first = 20 + int(0.9 * (400.0 - (100.0 + 20 * 2.0) - 20.0) / 2.0)
    assert len(lrs) == hook.stop_at < first and runner.train_loop.stop_training
    assert clock.now + 20.0 <= 400.0 + 6.0, 'the run ended within the budget (one iteration of slack)'
    assert (cos.end, cos.T_max) == (hook.stop_at, hook.stop_at - 40)
    assert _non_increasing(lrs[40:])
    assert lrs[-1] < 0.25 * 4e-4


def test_time_budget_leaves_a_run_that_fits_alone():
    demo = _load_demo_module()
    opt, warm, cos = _schedule(max_iters=100)
    runner = _FakeRunner(100, [warm, cos])
    clock = _Clock(10.0)
    hook = demo.make_demo_hook([], t_start=0.0, budget_s=3600.0, clock=clock)
    lrs = _drive(hook, clock, runner, opt, [warm, cos], lambda i: 1.0, 100)
    assert len(lrs) == 100 and not runner.train_loop.stop_training and (cos.end, cos.T_max) == (100, 60)
    assert hook.planned is None  # nothing was decided: the run fits
    assert runner.val_loop.runs == 0  # the loop validates at its own end


def test_choose_threads():
    demo = _load_demo_module()
    assert demo.choose_threads(3) == (3, 'as requested')
    threads, reason = demo.choose_threads(None)
    assert 1 <= threads <= (os.cpu_count() or 1)
    assert 'cores' in reason
