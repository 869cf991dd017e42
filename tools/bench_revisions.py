#!/usr/bin/env python
"""Eager speed of one backbone at two git revisions, paired: did a change make it slower?

    python tools/bench_revisions.py f2fe2a5 HEAD --models Swin,LeViT --modes eval,train --rounds 6

Each revision is checked out once into a temporary git worktree. Every round runs one subprocess per
revision (the order alternates between rounds), each building the backbone (class default variant unless
``--arch``), warming up and timing ``--steps`` steps (median); the printed ratio is the median over the
rounds of old time / new time (above 1.00: the new revision is faster), with min-max. Both revisions run
on the same interpreter and packages; weights are random (seeded), speed does not depend on them.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
from bench_compile import parse_arch, parse_size  # noqa: E402

_CHILD = r'''
import contextlib, ctypes, json, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[1])
import vit_backbones
case = json.loads(sys.argv[2])
if case['malloc'] == 'keep':  # what vit_backbones.runtime.memory.keep_freed_memory does (older revisions lack it)
    libc = ctypes.CDLL('libc.so.6')
    assert libc.mallopt(-3, 2**30) and libc.mallopt(-1, -1)
if case['threads']:
    torch.set_num_threads(case['threads'])
torch.manual_seed(0)
kw = {} if case['arch'] is None else dict(arch=case['arch'])
model = vit_backbones.build_backbone(case['model'], **kw).train(case['mode'] == 'train')
h, w, b = case['size']
x = torch.randn(b, 3, h, w)
ctx = (lambda: torch.autocast('cpu', dtype=torch.bfloat16)) if case['dtype'] == 'bf16' else contextlib.nullcontext
params = [p for p in model.parameters() if p.requires_grad]
def step():
    if case['mode'] == 'eval':
        with torch.no_grad(), ctx():
            model(x)
        return
    for p in params:
        p.grad = None
    with ctx():
        outs = model(x)
    sum(o.float().mean() for o in outs).backward()
step()
times = []
for _ in range(case['steps']):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
assert vit_backbones.__file__.startswith(sys.argv[1]), vit_backbones.__file__
print('RESULT', statistics.median(times) * 1e3)
'''


def time_once(tree, case):
    proc = subprocess.run([sys.executable, '-c', _CHILD, tree, json.dumps(case)], capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')), None)
    if line is None:
        raise RuntimeError(f'timing run in {tree} failed: {proc.stderr.strip()[-400:]}')
    return float(line.split()[1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('old', help='the revision before the change (any git revision, or WORKTREE)')
    p.add_argument('new', help='the revision after it (HEAD, a hash; WORKTREE: this checkout as it is, uncommitted '
                               'changes included)')
    p.add_argument('--models', default='Swin', help='comma-separated registered backbone names (default Swin)')
    p.add_argument('--arch', default=None, help='variant name or JSON dict (default: the class default)')
    p.add_argument('--modes', default='eval,train', help='eval, train or both (default both)')
    p.add_argument('--dtypes', default='fp32', help='fp32, bf16 (autocast) or both (default fp32)')
    p.add_argument('--sizes', default='224x224x8,800x1216x1', help='comma-separated HxW[xB] (default 224x224x8,800x1216x1)')
    p.add_argument('--rounds', type=int, default=6, help='paired rounds (default 6)')
    p.add_argument('--steps', type=int, default=3, help='timed steps per run after one warm-up (default 3)')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    p.add_argument('--malloc', choices=('keep', 'default'), default='keep',
                   help="keep: glibc's malloc keeps freed memory for reuse in both runs, as our tools run "
                        "(vit_backbones.runtime.memory); default: glibc as configured")
    args = p.parse_args(argv)
    args.arch = parse_arch(p, args.arch)
    sizes = [parse_size(s) for s in args.sizes.split(',')]
    root = os.path.dirname(_HERE)  # the checkout this tool is in (WORKTREE: as it is, uncommitted changes included)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still removes the worktrees (finally)
    tmp = tempfile.mkdtemp(prefix='vb_revs_')
    trees = {}
    try:
        for label, rev in (('old', args.old), ('new', args.new)):
            if rev == 'WORKTREE':
                trees[label] = root
                continue
            path = os.path.join(tmp, label)
            subprocess.run(['git', 'worktree', 'add', '--detach', path, rev], cwd=root, check=True,
                           capture_output=True)
            trees[label] = path
        sha = {k: 'working tree' if v == root else subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'], cwd=v, capture_output=True, text=True).stdout.strip()
            for k, v in trees.items()}
        print(f'old {args.old} ({sha["old"]}) vs new {args.new} ({sha["new"]}); {args.rounds} paired rounds, '
              f'median of {args.steps} steps per run, threads {args.threads or "default"}')
        print('| model | mode | dtype | size | old ms | new ms | old / new [min-max] |')
        print('|---|---|---|---|---|---|---|')
        for model in args.models.split(','):
            for mode in args.modes.split(','):
                for dtype in args.dtypes.split(','):
                    for size in sizes:
                        case = dict(model=model, arch=args.arch, mode=mode, dtype=dtype, size=size, steps=args.steps,
                                    threads=args.threads, malloc=args.malloc)
                        old, new = [], []
                        for r in range(args.rounds):
                            order = ('old', 'new') if r % 2 == 0 else ('new', 'old')
                            got = {k: time_once(trees[k], case) for k in order}
                            old.append(got['old'])
                            new.append(got['new'])
                        ratios = sorted(o / n for o, n in zip(old, new))
                        print(f'| {model} | {mode} | {dtype} | {size[0]}x{size[1]} b{size[2]} | '
                              f'{statistics.median(old):.0f} | {statistics.median(new):.0f} | '
                              f'{statistics.median(ratios):.2f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}] |', flush=True)
    finally:
        for label, path in trees.items():
            if path != root:
                subprocess.run(['git', 'worktree', 'remove', '--force', path], cwd=root, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
