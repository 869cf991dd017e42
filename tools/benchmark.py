#!/usr/bin/env python
"""Speed and memory of our backbones against the anchor implementation, in one run.

    python tools/benchmark.py                       # Swin-T vs mmdet SwinTransformer, the README table
    python tools/benchmark.py --model pvtv2         # PVT v2-b2 vs mmdet PyramidVisionTransformerV2 (also: pvt)
    python tools/benchmark.py --model vit           # ViT-B/16 at 512 vs mmseg VisionTransformer (also: deit)
    python tools/benchmark.py --model CvT --arch 13 # any registered backbone alone (no anchor)
    python tools/benchmark.py --sizes 224x224x8 --repeats 3 --device cuda
    python tools/benchmark.py --peers all --models swin,pvtv2,levit,vit --threads 2   # every peer, interleaved
    python ../shared/tools/with_timm.py tools/benchmark.py --peers mmdet,timm,hf --models swin   # timm importable

With ``--peers`` (or ``--models``) it compares ours against every implementation users would pick
(mmdet/mmseg, timm, HF transformers), interleaved in one process, per cell (size x train/eval x
fp32/bf16): see tools/bench_peers.py. Without them it runs the original mmdet/mmseg comparison below.

For each input size (HxWxBATCH) it times, with the same weights in both models:
  * eval forward (no_grad) and train forward+backward, fp32, ours and the anchor;
  * ours under bf16 autocast (CPU: torch.autocast('cpu', bfloat16); CUDA: 'cuda'), with the output
    error against ours in fp32.
Each timing is the median of ``--repeats`` runs after ``--warmup`` runs. Peak memory is the CUDA
allocator's peak on a GPU; on the CPU it is the growth of the process' peak RSS during the timed runs,
measured in a fresh subprocess per case (peak RSS minus the RSS before the first pass), so cases do
not hide each other's peaks.
Ratios are anchor time / our time (>1: ours is faster). With ``--pairs N`` (default 6) each input size
and pass is also timed *paired*: both models in one process, N alternating single steps, and the
median of the N per-step ratios (with its min and max) is reported; on a shared machine whose speed
drifts, that ratio is the steadier one. For ViT/DeiT the anchor is mmseg's recipe
(VisionTransformer + Feature2Pyramid neck) against our backbone with its built-in deconvolution pyramid;
the output check compares the trunks (the necks' weights are not transferred).
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
DET_SIZES = '224x224x8,800x1216x1'
SEG_SIZES = '512x512x2'

#: --model -> (our backbone name, arch, extra kwargs, anchor, default sizes). The anchor is the OpenMMLab
#: implementation users would otherwise take; any other registered backbone name runs ours alone.
SPECS = {
    'swin': ('Swin', 'tiny', {}, 'mmdet SwinTransformer (Swin-T)', DET_SIZES),
    'pvt': ('PVT', 'small', {}, 'mmdet PyramidVisionTransformer (PVT-Small)', DET_SIZES),
    'pvtv2': ('PVTv2', 'b2', {}, 'mmdet PyramidVisionTransformerV2 (b2)', DET_SIZES),
    'vit': ('ViT', 'base', dict(img_size=512), 'mmseg VisionTransformer (ViT-B/16) + Feature2Pyramid', SEG_SIZES),
    'deit': ('DeiT', 'small', dict(img_size=512), 'mmseg VisionTransformer (DeiT-S/16) + Feature2Pyramid', SEG_SIZES),
}


class _PlainAnchor(torch.nn.Module):
    """mmseg's ViT recipe: VisionTransformer (blocks 2/5/8/11) then the Feature2Pyramid neck (BN on CPU)."""

    def __init__(self, embed_dims, num_heads, drop_path):
        super().__init__()
        from mmseg.models.backbones import VisionTransformer
        from mmseg.models.necks import Feature2Pyramid
        self.backbone = VisionTransformer(img_size=512, patch_size=16, embed_dims=embed_dims, num_layers=12,
                                          num_heads=num_heads, mlp_ratio=4, out_indices=(2, 5, 8, 11), qkv_bias=True,
                                          drop_path_rate=drop_path, norm_cfg=dict(type='LN', eps=1e-6),
                                          final_norm=True, interpolate_mode='bicubic')
        self.neck = Feature2Pyramid(embed_dims, rescales=[4, 2, 1, 0.5], norm_cfg=dict(type='BN', requires_grad=True))

    def forward(self, x):
        return tuple(self.neck(self.backbone(x)))


def _split(model: str):
    if model in SPECS:
        return SPECS[model]
    import vit_backbones
    name = next((n for n in vit_backbones.list_backbones() if n.lower() == model.lower()), None)
    if name is None:
        raise SystemExit(f'unknown --model {model!r}; available: {", ".join(list(SPECS) + vit_backbones.list_backbones())}')
    return name, None, {}, None, DET_SIZES


def build(impl: str, model: str, drop_path: float, arch=None):
    name, default_arch, extra, anchor, _ = _split(model)
    if impl == 'mmdet':  # the anchor, whichever library it comes from
        if model == 'swin':
            from mmdet.models.backbones import SwinTransformer
            return SwinTransformer(**SWIN_T, drop_path_rate=drop_path, out_indices=(0, 1, 2, 3))
        if model in ('pvt', 'pvtv2'):
            from mmdet.models.backbones import PyramidVisionTransformer, PyramidVisionTransformerV2
            cls = PyramidVisionTransformerV2 if model == 'pvtv2' else PyramidVisionTransformer
            return cls(drop_path_rate=drop_path)  # mmdet's defaults are PVT-Small / PVT v2-b2
        if model in ('vit', 'deit'):
            return _PlainAnchor(768, 12, drop_path) if model == 'vit' else _PlainAnchor(384, 6, drop_path)
        raise SystemExit(f'--model {model} has no anchor implementation')
    import vit_backbones
    return vit_backbones.build_backbone(name, arch or default_arch or next(iter(
        vit_backbones.get_backbone_class(name).arch_zoo)), drop_path_rate=drop_path, **extra)


def has_anchor(model: str) -> bool:
    return _split(model)[3] is not None


def shared_weights(model: str, drop_path: float, arch=None):
    """Anchor weights (seeded) and ours converted from them: same function, two implementations.
    Without an anchor: (None, ours) with seeded weights."""
    torch.manual_seed(0)
    if not has_anchor(model):
        return None, build('ours', model, drop_path, arch)
    anchor = build('mmdet', model, drop_path)
    ours = build('ours', model, drop_path)
    if isinstance(anchor, _PlainAnchor):  # trunk weights as an mmseg segmentor checkpoint; necks differ
        sd = {'backbone.' + k: v for k, v in anchor.backbone.state_dict().items()}
        ours.load_checkpoint({'state_dict': sd, 'meta': {}})
    else:
        ours.load_checkpoint(anchor.state_dict())
    return anchor, ours


def _current_rss() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_case(impl, model, mode, amp, size, repeats, warmup, device, drop_path, arch=None):
    h, w, b = size
    anchor, ours = shared_weights(model, drop_path, arch)
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


def time_pairs(model, mode, size, pairs, warmup, device, drop_path, arch=None):
    """Anchor and ours in one process, alternating single steps (anchor first on even pairs, ours first on
    odd ones): machine-speed drifts longer than one pair hit both sides, so the per-pair ratios are
    much steadier than the ratio of separately timed medians on a shared machine."""
    h, w, b = size
    anchor, ours = shared_weights(model, drop_path, arch)
    anchor, ours = anchor.to(device), ours.to(device)
    x = torch.randn(b, 3, h, w, device=device)
    for net in (anchor, ours):
        net.train(mode == 'train')

    def step(net):
        _sync(device)
        t0 = time.perf_counter()
        if mode == 'eval':
            with torch.no_grad():
                net(x)
        else:
            net.zero_grad(set_to_none=True)
            sum(o.float().mean() for o in net(x)).backward()
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(warmup):
        step(anchor), step(ours)
    ta, to = [], []
    for i in range(pairs):
        if i % 2 == 0:
            ta.append(step(anchor))
            to.append(step(ours))
        else:
            to.append(step(ours))
            ta.append(step(anchor))
    ratios = sorted(a / o for a, o in zip(ta, to))
    return dict(anchor_ms=1000 * statistics.median(ta), ours_ms=1000 * statistics.median(to),
                ratio_median=statistics.median(ratios), ratio_min=ratios[0], ratio_max=ratios[-1], pairs=pairs)


def _trunk_outputs(net, x):
    """What both implementations compute with the same weights: for the plain models the trunk's tapped
    blocks as maps (the pyramid necks have different, untransferred weights), else the outputs."""
    if isinstance(net, _PlainAnchor):
        return list(net.backbone(x))
    if hasattr(net, 'forward_features') and hasattr(net, 'runtime_prefix_tokens'):
        feats, hw = net.forward_features(x)
        p = net.runtime_prefix_tokens
        return [f[:, p:].transpose(1, 2).reshape(x.shape[0], -1, *hw) for f in feats]
    return list(net(x))


def output_error(model, size, device, drop_path, arch=None):
    """max |ours - anchor| (fp32; nan without an anchor) and max |ours bf16 - ours fp32| / max |ours fp32| (eval)."""
    h, w, b = size
    anchor, ours = shared_weights(model, drop_path, arch)
    ours = ours.to(device)
    ours.eval()  # mmdet backbones' train() returns None: no chaining
    x = torch.randn(b, 3, h, w, device=device)
    fp32 = float('nan')
    with torch.no_grad():
        out = ours(x)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = ours(x)
        if anchor is not None:
            anchor = anchor.to(device)
            anchor.eval()
            fp32 = max(float((a - o).abs().max()) for a, o in zip(_trunk_outputs(anchor, x), _trunk_outputs(ours, x)))
    bf16 = max(float((l.float() - o).abs().max() / o.abs().max()) for l, o in zip(low, out))
    return fp32, bf16


def matmul_rate(dtype, device, n=2048, repeats=5):
    """GFLOP/s of an n x n matmul (tools/bench_peers.py measures it; imported here when first needed)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_peers
    return bench_peers.matmul_rate(dtype, device, n, repeats)


def run_in_subprocess(args, case):
    cmd = [sys.executable, os.path.abspath(__file__), '--_case', json.dumps(case), '--repeats', str(args.repeats),
           '--pairs', str(args.pairs),
           '--warmup', str(args.warmup), '--device', args.device, '--threads', str(args.threads), '--model', args.model,
           '--drop-path', str(args.drop_path)] + (['--arch', args.arch] if args.arch else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f'case {case} failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ms(r):
    return f'{r["median_ms"]:.0f}' if r else '-'


def _ratio(a, b):
    return f'{a["median_ms"] / b["median_ms"]:.2f}x' if a and b else '-'


def _mb(r):
    return f'{r["peak_mb"]:.0f}' if r else '-'


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='swin',
                   help=f'{", ".join(SPECS)} (against their anchors), or any registered backbone name (ours alone)')
    p.add_argument('--arch', help='variant for a backbone without an anchor (default: its first variant); with '
                   '--peers a variant or a JSON dict of hyper-parameter overrides for ours and every peer, or a dict '
                   'of such dicts by --models key')
    p.add_argument('--sizes', help=f'comma list of HxWxBATCH (default {DET_SIZES}; vit/deit {SEG_SIZES})')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    p.add_argument('--drop-path', type=float, default=0.2)
    p.add_argument('--no-bf16', action='store_true', help='skip the bf16 autocast cases')
    p.add_argument('--pairs', type=int, default=6,
                   help='also time anchor and ours alternately in one process, this many pairs per pass (0: skip)')
    p.add_argument('--json', help='also write the results here')
    g = p.add_argument_group('every peer, interleaved (tools/bench_peers.py)')
    g.add_argument('--peers', help='comma list of mmdet (mmdet/mmseg), timm, hf, or all: run the interleaved '
                   'comparison against these peers (--models alone implies all)')
    g.add_argument('--models', help='comma list of swin, pvtv2, pvt, levit, vit, deit, cait, cvt (default: --model)')
    g.add_argument('--passes', default='train,eval', help='with --peers: train (fwd+bwd) and/or eval')
    g.add_argument('--dtypes', default='fp32,bf16', help='with --peers: fp32 and/or bf16 (autocast); --no-bf16: fp32')
    g.add_argument('--cell-budget', type=float, default=0.,
                   help='with --peers: more rounds per cell while they fit in this many seconds (0: exactly --pairs)')
    g.add_argument('--max-pairs', type=int, default=30, help='with --peers and --cell-budget: at most this many rounds')
    g.add_argument('--peak-n', type=int, default=2048, help='with --peers: side of the matmul that measures the peak')
    g.add_argument('--big-pairs', type=int, help='with --peers: rounds for inputs above 224x224x8 (default --pairs)')
    p.add_argument('--_case', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from vit_backbones.runtime.memory import keep_freed_memory
    memory = keep_freed_memory()  # as tools/train.py and tools/test.py run (the same for every implementation)
    if not args._case:
        print(f'# {memory}', flush=True)
    device = torch.device(args.device)
    if (args.peers or args.models) and not args._case:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_peers
        if args.big_pairs is None:
            args.big_pairs = args.pairs
        bench_peers.run(args)
        return
    if args._case:
        c = json.loads(args._case)
        if c.get('paired'):
            print(json.dumps(time_pairs(args.model, c['mode'], tuple(c['size']), args.pairs, args.warmup, device,
                                        args.drop_path, args.arch)))
            return
        r = time_case(c['impl'], args.model, c['mode'], c['amp'], tuple(c['size']), args.repeats, args.warmup, device,
                      args.drop_path, args.arch)
        print(json.dumps(r))
        return
    name, arch, _, anchor_name, default_sizes = _split(args.model)
    anchor = anchor_name is not None
    sizes = [tuple(int(v) for v in s.split('x')) for s in (args.sizes or default_sizes).split(',')]
    cases = [(impl, mode, amp) for mode in ('eval', 'train') for impl, amp in
             (('mmdet', False), ('ours', False), ('ours', True))
             if (impl == 'ours' or anchor) and not (amp and args.no_bf16)]
    results = []
    from vit_backbones.runtime import cpu_bf16_support
    bf16 = cpu_bf16_support()
    cpu_model = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?') \
        if os.path.exists('/proc/cpuinfo') else '?'
    print(f'# ours {name} {args.arch or arch or ""} vs {anchor_name or "no anchor"}; device={device}, '
          f'threads={torch.get_num_threads()}, torch {torch.__version__}, repeats={args.repeats}', flush=True)
    print(f'# CPU: {cpu_model}; native bf16: {bf16 or "none (bf16 matmuls are emulated)"}; '
          f'matmul 2048^2: fp32 {matmul_rate(torch.float32, device):.0f} GFLOP/s, '
          f'bf16 {matmul_rate(torch.bfloat16, device):.0f} GFLOP/s', flush=True)
    for size in sizes:
        fp32_err, bf16_err = output_error(args.model, size, device, args.drop_path, args.arch)
        row = dict(size=size, fp32_max_abs_diff_vs_anchor=fp32_err, bf16_rel_err_vs_fp32=bf16_err)
        for impl, mode, amp in cases:
            r = run_in_subprocess(args, dict(impl=impl, mode=mode, amp=amp, size=size))
            row[f'{impl}_{mode}{"_bf16" if amp else ""}'] = r
            label = 'anchor' if impl == 'mmdet' else 'ours'
            print(f'  {size[0]}x{size[1]} b{size[2]} {label:6s} {mode:5s} {"bf16" if amp else "fp32"}: '
                  f'{r["median_ms"]:8.1f} ms  peak +{r["peak_mb"]:7.1f} MB', flush=True)
        for mode in ('eval', 'train') if anchor and args.pairs > 0 else ():
            r = run_in_subprocess(args, dict(paired=True, mode=mode, size=size))
            row[f'paired_{mode}'] = r
            print(f'  {size[0]}x{size[1]} b{size[2]} paired {mode:5s} fp32: anchor {r["anchor_ms"]:.1f} ms, ours '
                  f'{r["ours_ms"]:.1f} ms, speed-up {r["ratio_median"]:.2f}x (min {r["ratio_min"]:.2f}, max '
                  f'{r["ratio_max"]:.2f}, {r["pairs"]} pairs)', flush=True)
        results.append(row)
    print()
    print('| input | pass | anchor fp32 ms | ours fp32 ms | ours bf16 ms | fp32 speed-up | paired fp32 speed-up '
          '[min-max] | bf16 speed-up vs anchor fp32 | peak MB anchor / ours / ours bf16 |')
    print('|---|---|---|---|---|---|---|---|---|')
    for row in results:
        h, w, b = row['size']
        for mode in ('eval', 'train'):
            a, o, q = row.get(f'mmdet_{mode}'), row[f'ours_{mode}'], row.get(f'ours_{mode}_bf16')
            pr = row.get(f'paired_{mode}')
            paired = f'{pr["ratio_median"]:.2f}x [{pr["ratio_min"]:.2f}-{pr["ratio_max"]:.2f}]' if pr else '-'
            print(f'| {h}x{w} b{b} | {"forward" if mode == "eval" else "fwd+bwd"} | {_ms(a)} | {_ms(o)} | {_ms(q)} | '
                  f'{_ratio(a, o)} | {paired} | {_ratio(a, q)} | {_mb(a)} / {_mb(o)} / {_mb(q)} |')
    for row in results:
        h, w, b = row['size']
        print(f'{h}x{w} b{b}: max |ours - anchor| fp32 = {row["fp32_max_abs_diff_vs_anchor"]:.2e}; '
              f'ours bf16 vs fp32 max error / max |output| = {row["bf16_rel_err_vs_fp32"]:.3f}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
