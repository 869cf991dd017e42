"""Where one step of our backbone spends its time: torch.profiler, top ops by self CPU time with their share,
the same time grouped by kind (matmul, attention, copies, norms ...), and by the function of ours that
called them, plus the matmuls' own rate against a large matmul measured in the same run.

    python tools/bench_profile.py --model swin --size 800x1216x1 --pass eval --dtype bf16 --threads 2
    python tools/bench_profile.py --model swin --size 800x1216x1 --pass train --dtype bf16 --threads 2 --top 25

``--impl timm`` (or mmdet, hf) profiles that peer instead, built as in tools/bench_peers.py with our
weights (timm through ../shared/tools/with_timm.py), to see where the two differ.
``--model`` takes the keys of tools/bench_peers.py (swin, pvtv2, pvt, levit, vit, deit, cait, cvt); the
backbone is built as there (seeded random weights, drop path ``--drop-path``), run ``--warmup`` untimed
steps, then one profiled step (train: forward + backward of the sum of the outputs' means).
"""
import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_peers  # noqa: E402

#: op name -> kind (first matching rule wins; matched against the aten name)
KINDS = [
    ('matmul', ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm', 'aten::matmul', 'aten::linear',
                'mkldnn', 'onednn', 'aten::_mkl')),
    ('attention (fused kernel)', ('scaled_dot_product', 'flash_attention', '_efficient_attention')),
    ('convolution', ('conv', 'aten::_convolution')),
    ('softmax', ('softmax',)),
    ('norm', ('layer_norm', 'batch_norm', 'group_norm', 'native_layer_norm')),
    ('activation', ('gelu', 'hardswish', 'relu', 'silu')),
    ('dtype casts', ('aten::_to_copy', 'aten::to')),
    ('copies / layout', ('aten::copy_', 'aten::clone', 'aten::contiguous', 'aten::cat', 'aten::stack',
                         'aten::permute', 'aten::transpose', 'aten::reshape', 'aten::view', 'aten::_unsafe_view',
                         'aten::constant_pad', 'aten::pad', 'aten::roll', 'aten::narrow', 'aten::slice',
                         'aten::select')),
    ('gathers / scatters', ('index', 'gather', 'scatter', 'take', 'embedding')),
    ('fills / allocation', ('aten::empty', 'aten::zero', 'aten::fill', 'aten::zeros', 'aten::ones', 'aten::full',
                            'aten::new_')),
    ('elementwise', ('aten::add', 'aten::mul', 'aten::sub', 'aten::div', 'aten::neg', 'aten::where', 'aten::masked',
                     'aten::sum', 'aten::mean', 'aten::pow', 'aten::sqrt', 'aten::rsqrt', 'aten::exp',
                     'aten::threshold', 'aten::bernoulli', 'aten::rand', 'aten::uniform', 'aten::floor',
                     'aten::clamp')),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return 'other'


def _kind_in_context(ev) -> str:
    """kind_of, except that a copy inside a dtype conversion (autocast's casts) counts as a cast."""
    parent = getattr(ev, 'cpu_parent', None)
    while parent is not None:
        if parent.name in ('aten::_to_copy', 'aten::to'):
            return 'dtype casts'
        parent = getattr(parent, 'cpu_parent', None)
    return kind_of(ev.name)


def _is_python(ev) -> bool:
    return '.py(' in ev.name or ev.name.startswith('<built-in')


def _our_caller(ev) -> str:
    """The innermost Python frame of ours (vit_backbones/...py: function) above an op in the profiler's
    tree; ops of the backward pass run in the autograd engine, without Python frames."""
    parent, seen_python = getattr(ev, 'cpu_parent', None), False
    while parent is not None:
        if parent.name.startswith('autograd::engine::evaluate_function: ') and not seen_python:
            return 'backward of ' + parent.name.split(': ', 1)[1]  # a built-in autograd node (no frame of ours)
        if 'vit_backbones' + os.sep in parent.name:
            path, _, rest = parent.name.partition('(')
            func = rest.split(':', 1)[-1].strip() if ':' in rest else '?'
            return f'{path[path.index("vit_backbones" + os.sep):]}:{func}'
        seen_python = seen_python or _is_python(parent)
        parent = getattr(parent, 'cpu_parent', None)
    return 'elsewhere (torch / Python frames outside vit_backbones)' if seen_python else 'backward (autograd engine)'


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='swin', help=', '.join(bench_peers.MODELS))
    p.add_argument('--size', default='800x1216x1', help='HxWxBATCH')
    p.add_argument('--pass', dest='mode', default='eval', choices=('train', 'eval'))
    p.add_argument('--dtype', default='bf16', choices=('fp32', 'bf16'))
    p.add_argument('--threads', type=int, default=0)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--drop-path', type=float, default=0.2)
    p.add_argument('--top', type=int, default=20)
    p.add_argument('--no-stack', action='store_true', help='skip the attribution to our functions (less overhead)')
    p.add_argument('--peak-n', type=int, default=2048)
    p.add_argument('--impl', default='ours', choices=('ours',) + bench_peers.PEERS,
                   help='profile this implementation (a peer: built as in tools/bench_peers.py, our weights)')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from vit_backbones.runtime.memory import keep_freed_memory
    print(f'# {keep_freed_memory()}', flush=True)
    device = torch.device('cpu')
    size = tuple(int(v) for v in args.size.split('x'))
    spec, arch, cfg = bench_peers.resolve(args.model)
    torch.manual_seed(0)
    ours = bench_peers.build_ours(spec, arch, cfg, size, args.drop_path)
    net = bench_peers.OursTrunk(ours) if spec.get('plain') else ours
    if args.impl != 'ours':
        torch.manual_seed(0)
        net, desc = spec['build'](args.impl, cfg, size, args.drop_path)
        print(f'# profiling {args.impl}: {desc}: {bench_peers.share_weights(ours, net)}')
    flops = bench_peers.forward_flops(net, size, device) * (3 if args.mode == 'train' else 1)
    net.train(args.mode == 'train')
    x = torch.randn(size[2], 3, size[0], size[1])
    step = bench_peers.make_step(net, args.mode, args.dtype, x, device)
    for _ in range(args.warmup):
        step()
    tdtype = torch.bfloat16 if args.dtype == 'bf16' else torch.float32
    peak0 = bench_peers.matmul_rate(tdtype, device, args.peak_n)
    t_plain = bench_peers.timed(step, device)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], with_stack=not args.no_stack) as prof:
        t0 = time.perf_counter()
        step()
        t_prof = time.perf_counter() - t0
    peak1 = bench_peers.matmul_rate(tdtype, device, args.peak_n)
    peak = max(peak0, peak1)
    cpu, flags = bench_peers.cpu_description()
    print(f'# {args.impl} {spec["label"]} {size[0]}x{size[1]} b{size[2]} {args.mode} {args.dtype}; CPU {cpu} ({" ".join(flags)}); '
          f'threads {torch.get_num_threads()}; torch {torch.__version__}')
    rate = flops / t_plain / 1e9
    print(f'# step {1000 * t_plain:.0f} ms unprofiled, {1000 * t_prof:.0f} ms profiled; {flops / 1e9:.1f} GFLOP '
          f'(train: 3x forward) = {rate:.0f} GFLOP/s = {100 * rate / peak:.0f}% of the {args.dtype} matmul peak '
          f'({peak:.0f} GFLOP/s; {peak0:.0f} before, {peak1:.0f} after)')
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f'\n## top {args.top} ops by self CPU time (total {total / 1e3:.0f} ms)')
    print('| op | kind | calls | self CPU ms | share |')
    print('|---|---|---|---|---|')
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f'| {e.key} | {kind_of(e.key)} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | '
              f'{100 * e.self_cpu_time_total / total:.1f}% |')
    kinds = collections.Counter()
    for ev in prof.events():
        kinds[_kind_in_context(ev)] += ev.self_cpu_time_total
    print('\n## self CPU time by kind')
    print('| kind | ms | share |')
    print('|---|---|---|')
    for kind, t in kinds.most_common():
        print(f'| {kind} | {t / 1e3:.1f} | {100 * t / total:.1f}% |')
    mm = kinds['matmul']
    if mm:
        mm_rate = flops / (mm / 1e6) / 1e9
        print(f'\nmatmul time {mm / 1e3:.0f} ms ({100 * mm / total:.0f}% of the step): if every counted FLOP ran in '
              f'these matmuls they ran at {mm_rate:.0f} GFLOP/s = {100 * mm_rate / peak:.0f}% '
              f'of the {args.dtype} peak (the counted FLOPs also include convolutions and fused attention)')
    if not args.no_stack:
        ours_t, ops_of = collections.Counter(), collections.defaultdict(collections.Counter)
        copies_from = collections.Counter()
        for ev in prof.events():
            if _is_python(ev):
                continue  # the Python frames' own time (interpreter overhead) is counted under 'other' above
            frame = _our_caller(ev)
            ours_t[frame] += ev.self_cpu_time_total
            ops_of[frame][_kind_in_context(ev)] += ev.self_cpu_time_total
            if ev.name == 'aten::copy_':
                parent = getattr(ev, 'cpu_parent', None)
                copies_from[(frame, parent.name if parent is not None else '-')] += ev.self_cpu_time_total
        print('\n## self CPU time by the function of ours that called the op (innermost vit_backbones frame)')
        print('| function | ms | share | main kinds |')
        print('|---|---|---|---|')
        for frame, t in ours_t.most_common(args.top):
            main = ', '.join(f'{k} {100 * v / t:.0f}%' for k, v in ops_of[frame].most_common(3) if t)
            print(f'| {frame} | {t / 1e3:.1f} | {100 * t / total:.1f}% | {main} |')
        print('\n## aten::copy_ by caller and the op that asked for the copy')
        print('| function | via | ms | share |')
        print('|---|---|---|---|')
        for (frame, via), t in copies_from.most_common(12):
            print(f'| {frame} | {via} | {t / 1e3:.1f} | {100 * t / total:.1f}% |')


if __name__ == '__main__':
    main()
