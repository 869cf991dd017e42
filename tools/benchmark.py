#!/usr/bin/env python
"""Speed and memory of our backbones against the anchor implementation, in one run.

    python tools/benchmark.py                       # Swin-T vs mmdet SwinTransformer, the README table
    python tools/benchmark.py --sizes 224x224x8 --repeats 3 --device cuda

For each input size (HxWxBATCH) it times, with the same weights in both models:
  * eval forward (no_grad) and train forward+backward, fp32, ours and the anchor;
  * ours under bf16 autocast (CPU: torch.autocast('cpu', bfloat16); CUDA: 'cuda'), with the output
    error against ours in fp32.
Each timing is the median of ``--repeats`` runs after ``--warmup`` runs. Peak memory is the CUDA
allocator's peak on a GPU; on the CPU it is the growth of the process' peak RSS during the timed runs,
measured in a fresh subprocess per case (peak RSS minus the RSS before the first pass), so cases do
not hide each other's peaks.
Ratios are anchor time / our time (>1: ours is faster).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

SWIN_T = dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)


def build(impl: str, model: str, drop_path: float):
    if model != 'swin':
        raise SystemExit(f'unknown --model {model!r}; available: swin')
    if impl == 'mmdet':
        from mmdet.models.backbones import SwinTransformer
        return SwinTransformer(**SWIN_T, drop_path_rate=drop_path, out_indices=(0, 1, 2, 3))
    import vit_backbones
    return vit_backbones.build_backbone('Swin', 'tiny', drop_path_rate=drop_path)


def shared_weights(model: str, drop_path: float):
    """Anchor weights (seeded) and ours converted from them: same function, two implementations."""
    torch.manual_seed(0)
    anchor = build('mmdet', model, drop_path)
    ours = build('ours', model, drop_path)
    ours.load_checkpoint(anchor.state_dict())
    return anchor, ours


def _current_rss() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_case(impl, model, mode, amp, size, repeats, warmup, device, drop_path):
    h, w, b = size
    anchor, ours = shared_weights(model, drop_path)
    net = (anchor if impl == 'mmdet' else ours).to(device)
    x = torch.randn(b, 3, h, w, device=device)
    net.train(mode == 'train')
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else None

    def step():
        if mode == 'eval':
            with torch.no_grad():
                if ctx:
                    with ctx():
                        return net(x)
                return net(x)
        net.zero_grad(set_to_none=True)
        if ctx:
            with ctx():
                outs = net(x)
        else:
            outs = net(x)
        sum(o.float().mean() for o in outs).backward()
        return outs

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # resident set before the first pass; the peak below includes warm-up passes (same work)
        base = _current_rss()
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return dict(median_ms=1000 * statistics.median(times), times_ms=[1000 * t for t in times], peak_mb=peak / 2**20)


def output_error(model, size, device, drop_path):
    """max |ours - anchor| (fp32) and max |ours bf16 - ours fp32| / max |ours fp32| (eval)."""
    h, w, b = size
    anchor, ours = shared_weights(model, drop_path)
    anchor, ours = anchor.to(device), ours.to(device)
    anchor.eval()  # mmdet backbones' train() returns None: no chaining
    ours.eval()
    x = torch.randn(b, 3, h, w, device=device)
    with torch.no_grad():
        ref, out = anchor(x), ours(x)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = ours(x)
    fp32 = max(float((a - o).abs().max()) for a, o in zip(ref, out))
    bf16 = max(float((l.float() - o).abs().max() / o.abs().max()) for l, o in zip(low, out))
    return fp32, bf16


def matmul_rate(dtype, device, n=2048, repeats=5):
    a = torch.randn(n, n, device=device).to(dtype)
    a @ a
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def run_in_subprocess(args, case):
    cmd = [sys.executable, os.path.abspath(__file__), '--_case', json.dumps(case), '--repeats', str(args.repeats),
           '--warmup', str(args.warmup), '--device', args.device, '--threads', str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f'case {case} failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='swin')
    p.add_argument('--sizes', default='224x224x8,800x1216x1', help='comma list of HxWxBATCH')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    p.add_argument('--drop-path', type=float, default=0.2)
    p.add_argument('--json', help='also write the results here')
    p.add_argument('--_case', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args._case:
        c = json.loads(args._case)
        r = time_case(c['impl'], args.model, c['mode'], c['amp'], tuple(c['size']), args.repeats, args.warmup, device,
                      args.drop_path)
        print(json.dumps(r))
        return
    sizes = [tuple(int(v) for v in s.split('x')) for s in args.sizes.split(',')]
    cases = [('mmdet', 'eval', False), ('ours', 'eval', False), ('ours', 'eval', True), ('mmdet', 'train', False),
             ('ours', 'train', False), ('ours', 'train', True)]
    results = []
    from vit_backbones.runtime import cpu_bf16_support
    bf16 = cpu_bf16_support()
    cpu_model = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?') \
        if os.path.exists('/proc/cpuinfo') else '?'
    print(f'# {args.model}: ours vs mmdet, device={device}, threads={torch.get_num_threads()}, '
          f'torch {torch.__version__}, repeats={args.repeats}', flush=True)
    print(f'# CPU: {cpu_model}; native bf16: {bf16 or "none (bf16 matmuls are emulated)"}; '
          f'matmul 2048^2: fp32 {matmul_rate(torch.float32, device):.0f} GFLOP/s, '
          f'bf16 {matmul_rate(torch.bfloat16, device):.0f} GFLOP/s', flush=True)
    for size in sizes:
        fp32_err, bf16_err = output_error(args.model, size, device, args.drop_path)
        row = dict(size=size, fp32_max_abs_diff_vs_anchor=fp32_err, bf16_rel_err_vs_fp32=bf16_err)
        for impl, mode, amp in cases:
            r = run_in_subprocess(args, dict(impl=impl, mode=mode, amp=amp, size=size))
            row[f'{impl}_{mode}{"_bf16" if amp else ""}'] = r
            print(f'  {size[0]}x{size[1]} b{size[2]} {impl:5s} {mode:5s} {"bf16" if amp else "fp32"}: '
                  f'{r["median_ms"]:8.1f} ms  peak +{r["peak_mb"]:7.1f} MB', flush=True)
        results.append(row)
    print()
    print('| input | pass | mmdet fp32 ms | ours fp32 ms | ours bf16 ms | fp32 speed-up | bf16 speed-up vs mmdet fp32 '
          '| peak MB mmdet / ours / ours bf16 |')
    print('|---|---|---|---|---|---|---|---|')
    for row in results:
        h, w, b = row['size']
        for mode in ('eval', 'train'):
            a, o, q = row[f'mmdet_{mode}'], row[f'ours_{mode}'], row[f'ours_{mode}_bf16']
            print(f'| {h}x{w} b{b} | {"forward" if mode == "eval" else "fwd+bwd"} | {a["median_ms"]:.0f} | '
                  f'{o["median_ms"]:.0f} | {q["median_ms"]:.0f} | {a["median_ms"] / o["median_ms"]:.2f}x | '
                  f'{a["median_ms"] / q["median_ms"]:.2f}x | {a["peak_mb"]:.0f} / {o["peak_mb"]:.0f} / {q["peak_mb"]:.0f} |')
    for row in results:
        h, w, b = row['size']
        print(f'{h}x{w} b{b}: max |ours - mmdet| fp32 = {row["fp32_max_abs_diff_vs_anchor"]:.2e}; '
              f'ours bf16 vs fp32 max error / max |output| = {row["bf16_rel_err_vs_fp32"]:.3f}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
