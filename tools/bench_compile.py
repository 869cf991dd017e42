#!/usr/bin/env python
"""torch.compile(dynamic=True) against eager for every backbone: compile time, graphs, speed.

    python tools/bench_compile.py --threads 2                          # all twelve, eval, fp32 + bf16
    python tools/bench_compile.py --models Swin,PVTv2,ViT --modes train --dtypes fp32
    python tools/bench_compile.py --models Swin --backend inductor --size 800x1216x1 --pairs 4

Every case compiles cold (an empty inductor cache of its own) unless ``--warm-cache``.
Each (backbone, mode, dtype) runs in a fresh subprocess: build the class default variant (Swin-T,
PVT v2-b2, ViT-B ...), wrap it in ``torch.compile(model, dynamic=True, backend=...)``, time the first
call at 2x3x256x320 (the compile; a non-square first size, so that dynamo does not assume H == W), call it
at three more sizes (224x224, 97x131, 72x66), count the graphs dynamo produced (1 = no recompilation)
and its graph breaks, then time eager and compiled alternately at ``--size`` (``--pairs`` rounds after a
warm-up; the ratio column is the median of the per-round ratios eager / compiled, with min-max) and, in
eval, the largest difference of the outputs relative to the largest eager activation. ``bf16`` runs
both under ``torch.autocast('cpu', torch.bfloat16)``. Training steps are forward + backward of the mean
of every output (drop path as configured; the weights are not updated).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: sizes after the first call (the recompilation check)
OTHER_SIZES = [(224, 224), (97, 131), (72, 66)]
FIRST = (2, 256, 320)


def parse_arch(parser, text):
    """--arch: a variant name, or a JSON dict of hyper-parameters (a parse error exits through ``parser``)."""
    if not text or not text.lstrip().startswith('{'):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        parser.error(f'--arch looks like JSON but does not parse: {e}')


def parse_size(text):
    """'HxW' or 'HxWxB' -> (H, W, B) (B defaults to 1)."""
    parts = [int(p) for p in text.lower().split('x')]
    if len(parts) == 2:
        parts.append(1)
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f'size must be HxW or HxWxB, got {text!r}')
    return tuple(parts)


def one_case(model_name, arch, mode, dtype, size, pairs, backend, threads):
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    import vit_backbones
    from bench_peers import make_step, ratio_stats, run_cell
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    kwargs = {} if arch is None else dict(arch=arch)
    model = vit_backbones.build_backbone(model_name, **kwargs).train(mode == 'train')
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, dynamic=True, backend=backend)
    device = torch.device('cpu')

    def call(net, b, h, w):
        make_step(net, mode, dtype, torch.randn(b, 3, h, w), device)()

    t = time.perf_counter()
    call(compiled, *FIRST)
    compile_s = time.perf_counter() - t
    later = []
    for h, w in OTHER_SIZES:
        t = time.perf_counter()
        call(compiled, 2, h, w)
        later.append(time.perf_counter() - t)
    graphs = int(counters['stats']['unique_graphs'])
    breaks = sum(counters['graph_break'].values())
    h, w, b = size
    call(compiled, b, h, w)  # the timing size: no new graph expected, warm
    graphs_after = int(counters['stats']['unique_graphs'])
    res = run_cell({'eager': model, 'compiled': compiled}, mode, dtype, size, pairs, 1, device)
    out = dict(model=model_name, arch=getattr(model, 'arch_name', arch), mode=mode, dtype=dtype, backend=backend,
               compile_s=compile_s, later_s=later, graphs=graphs, graphs_after_timing_size=graphs_after,
               breaks=breaks, eager_ms=res['eager'].get('median_ms'), compiled_ms=res['compiled'].get('median_ms'),
               error=res['compiled'].get('error') or res['eager'].get('error'))
    if 'times_ms' in res['compiled'] and 'times_ms' in res['eager']:
        out['ratio'] = ratio_stats(res['eager'], res['compiled'])
    if mode == 'eval':
        x = torch.randn(b, 3, h, w)
        ctx = torch.autocast('cpu', dtype=torch.bfloat16) if dtype == 'bf16' else torch.autocast('cpu', enabled=False)
        with torch.no_grad(), ctx:
            ref, got = model(x), compiled(x)
        scale = max(float(r.float().abs().max()) for r in ref)
        out['rel_diff'] = max(float((r.float() - g.float()).abs().max()) for r, g in zip(ref, got)) / scale
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', default='all', help='comma-separated registered names (default: all twelve)')
    p.add_argument('--arch', default=None, help='variant name or JSON dict, for a single --models entry (default: the class default)')
    p.add_argument('--modes', default='eval', help='eval, train or eval,train (default eval)')
    p.add_argument('--dtypes', default='fp32,bf16', help='fp32, bf16 (autocast) or both (default both)')
    p.add_argument('--size', type=parse_size, default=(224, 224, 2), help='timing size HxW[xB] (default 224x224x2)')
    p.add_argument('--pairs', type=int, default=5, help='timed eager/compiled rounds (default 5)')
    p.add_argument('--backend', default='inductor', help='torch.compile backend (default inductor)')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    p.add_argument('--warm-cache', action='store_true',
                   help="keep inductor's on-disk cache between cases and runs (default: a fresh, empty cache "
                        'for every case, so the first call is a cold compile)')
    p.add_argument('--json', help='also write the rows to this JSON file')
    p.add_argument('--one', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.arch = parse_arch(p, args.arch)
    if args.one:
        case = json.loads(args.one)
        print('RESULT ' + json.dumps(one_case(**case)))
        return 0

    import vit_backbones
    from bench_peers import cpu_description
    names = vit_backbones.list_backbones() if args.models == 'all' else [m.strip() for m in args.models.split(',')]
    unknown = [n for n in names if n not in vit_backbones.list_backbones()]
    if unknown:
        p.error(f'unknown backbone(s) {unknown}; choose from {vit_backbones.list_backbones()}')
    if args.arch and len(names) != 1:
        p.error('--arch needs exactly one --models entry')
    model, flags = cpu_description()
    import torch
    print(f'CPU: {model} ({", ".join(flags)}), torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}, '
          f'backend {args.backend}, timing size {args.size[0]}x{args.size[1]} batch {args.size[2]}')
    header = ('| backbone | mode | dtype | first call (compile) s | graphs / breaks (4 sizes) | eager ms | compiled ms '
              '| eager / compiled [min-max] | rel. diff |')
    print(header)
    print('|' + '---|' * (header.count('|') - 1))
    rows = []
    for name in names:
        for mode in args.modes.split(','):
            for dtype in args.dtypes.split(','):
                case = dict(model_name=name, arch=args.arch, mode=mode, dtype=dtype, size=args.size, pairs=args.pairs,
                            backend=args.backend, threads=args.threads)
                t = time.perf_counter()
                with tempfile.TemporaryDirectory(prefix='vb_inductor_') as cache:
                    env = dict(os.environ) if args.warm_cache else dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
                    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--one', json.dumps(case)],
                                          capture_output=True, text=True, env=env)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')), None)
                if line is None:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']
                    print(f'| {name} | {mode} | {dtype} | failed after {time.perf_counter() - t:.0f} s: {tail[0][:200]} |',
                          flush=True)
                    rows.append(dict(case, error=tail[0]))
                    continue
                r = json.loads(line[7:])
                rows.append(r)
                ratio = r.get('ratio')
                ratio_text = f'{ratio["median"]:.2f}x [{ratio["min"]:.2f}-{ratio["max"]:.2f}]' if ratio else r.get('error')
                diff = f'{r["rel_diff"]:.1e}' if 'rel_diff' in r else '-'
                graphs = r['graphs'] if r['graphs_after_timing_size'] == r['graphs'] else \
                    f'{r["graphs"]} (+{r["graphs_after_timing_size"] - r["graphs"]} at the timing size)'
                print(f'| {name} {r["arch"]} | {mode} | {dtype} | {r["compile_s"]:.1f} | {graphs} / {r["breaks"]} | '
                      f'{r["eager_ms"]:.0f} | {r["compiled_ms"]:.0f} | {ratio_text} | {diff} |', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
