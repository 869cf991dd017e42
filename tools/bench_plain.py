"""Forward-time growth of a plain backbone from one input size to another, with global attention in every
block and with ViTDet's windowed attention (window in most blocks, global in a few).

    python tools/bench_plain.py --model ViT --arch base --sizes 512 1024
    python tools/bench_plain.py --arch tiny --window-size 14 --global-attn 2 5 8 11 --repeats 3

Prints one line per (setting, size) with the fastest and the median forward time (the fastest is the
least disturbed by other processes on a shared machine) and the forward FLOPs (counted with
``torch.utils.flop_counter`` on the meta device: exact and noise-free), and the growth factors between
the first and last size. Attention over N tokens costs O(N^2) globally but O(N * w^2) in windows, so the
growth from 512 to 1024 (4x the tokens) tends to 16x for global attention and 4x for windows once
attention dominates.
"""
import argparse
import os.path as osp
import statistics
import sys
import time

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import vit_backbones  # noqa: E402


def time_forward(model, size, repeats, warmup, device, batch):
    x = torch.randn(batch, 3, size, size, device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def count_flops(build, size):
    """Forward FLOPs (matmuls, convolutions, attention) of a model built on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device('meta'):
        model = build().eval()
        x = torch.randn(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='ViT')
    p.add_argument('--arch', default='base')
    p.add_argument('--sizes', type=int, nargs='+', default=[512, 1024])
    p.add_argument('--window-size', type=int, default=14)
    p.add_argument('--global-attn', type=int, nargs='*', default=[2, 5, 8, 11])
    p.add_argument('--no-rel-pos', action='store_true', help='windows without the relative position bias')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: leave the default)')
    p.add_argument('--half', action='store_true', help='fp16 on CUDA')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = {
        'global': dict(),
        f'window{args.window_size}': dict(window_size=args.window_size, global_attn_indexes=tuple(args.global_attn),
                                          rel_pos=not args.no_rel_pos),
    }
    print(f'{args.model}-{args.arch}, pyramid=simple, batch {args.batch}, device {device}, '
          f'threads {torch.get_num_threads()}, global blocks in windowed model: {tuple(args.global_attn)}')
    for name, kw in settings.items():
        build = lambda: vit_backbones.build_backbone(args.model, args.arch, pyramid='simple', drop_path_rate=0., **kw)  # noqa: E731
        flops = [count_flops(build, s) for s in args.sizes]
        model = build().eval().to(device)
        if args.half and device.type == 'cuda':
            model = model.half()
        results = []
        for s, f in zip(args.sizes, flops):
            best, med = time_forward(model, s, args.repeats, args.warmup, device, args.batch)
            results.append(best)
            print(f'  {name:>9} {s:>5}x{s:<5} best {best * 1000:9.1f} ms  median {med * 1000:9.1f} ms  '
                  f'{f / 1e9:8.1f} GFLOPs')
        print(f'  {name:>9} growth {args.sizes[0]} -> {args.sizes[-1]}: time x{results[-1] / results[0]:.2f}, '
              f'FLOPs x{flops[-1] / flops[0]:.2f}')
        del model


if __name__ == '__main__':
    main()
