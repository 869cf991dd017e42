"""The model zoo: every variant of every registered backbone, measured, against its paper.

    python tools/model_zoo.py                    # table on stdout, with CPU forward times
    python tools/model_zoo.py --no-time          # sizes and GMACs only (seconds: built on the meta device)
    python tools/model_zoo.py --markdown zoo.md  # also write the table as markdown ('-': stdout)
    python tools/model_zoo.py --models Swin PVTv2 --variants tiny b0 --repeats 5

Columns:
- ``params``: ``model.paper_param_count()``: the trunk (without the parts built only for dense prediction,
  ``cls.dense_only_prefixes``) plus the classifier parts the paper counts and the backbone does not build
  (``model.classifier_param_delta()``: the ImageNet-1k head, a final norm...), against the paper's
  (``cls.paper_table``), in millions.
- ``GMACs 224``: multiply-accumulates of one 224x224 forward of that same trunk, counted with
  ``torch.utils.flop_counter.FlopCounterMode`` (which counts FLOPs = 2 x MACs of matmuls, convolutions and
  attention; elementwise ops, norms and softmax are not counted, as in the papers' counts), minus the
  modules under ``dense_only_prefixes`` (from the counter's per-module breakdown); the classifier head's
  1-2 MMACs are not included. Against the paper's "FLOPs" (which are MACs).
- ``GMACs 800x1333``: the whole backbone as used for detection (pyramid parts included), one image.
- ``pyramid``: channels / strides of the returned levels with the default arguments.
- ``ms 224`` / ``ms 800x1333``: forward time, batch 1, fp32, eval, ``torch.inference_mode``, on this
  machine's CPU with the current thread count (median of ``--repeats`` after one warm-up; one run at
  800x1333 unless ``--repeats-large``). ``--no-time`` skips them.

Models are built on the meta device when not timed (no memory, no initialisation); a model whose forward
needs real data (e.g. Swin's window plan uses ``nonzero``) is counted on the CPU with uninitialised
weights instead (counts do not depend on values).
"""
import argparse
import os.path as osp
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import vit_backbones  # noqa: E402
from vit_backbones import get_backbone_class, list_backbones  # noqa: E402

LARGE = (800, 1333)


def variants(name: str) -> List[str]:
    cls = get_backbone_class(name)
    zoo = getattr(cls, 'arch_zoo', None)
    return list(zoo) if zoo else [None]


def build(name: str, arch: Optional[str], device='meta'):
    cls = get_backbone_class(name)
    kw = {} if arch is None else dict(arch=arch)
    with torch.device(device):
        model = cls(**kw)
    return model.eval()


def _module_prefix_match(rel: str, prefixes: Sequence[str]) -> bool:
    return any((rel + '.').startswith(p) or rel.startswith(p) for p in prefixes)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU fused attention kernel (torch's counter has no formula for it): QK^T and AV."""
    *batch, s_q, d = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    n = 1
    for b in batch:
        n *= b
    return 2 * n * s_q * s_k * d + 2 * n * s_q * s_k * d_v


def _flop_counter() -> FlopCounterMode:
    custom = {}
    cpu_sdpa = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', None)
    if cpu_sdpa is not None:
        custom[cpu_sdpa] = _cpu_sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=custom)


def count_gmacs(model, hw, exclude_prefixes: Sequence[str] = ()) -> float:
    """GMACs of one (1, 3, *hw) forward, without the modules whose names start with ``exclude_prefixes``
    (parameter-name prefixes such as ``'pyramid.'``). Runs on the model's device; a meta-device model
    whose forward cannot run on meta tensors is moved to the CPU (uninitialised) and counted there."""
    device = next(iter(model.parameters())).device
    counter = _flop_counter()
    try:
        with counter, torch.no_grad():
            model(torch.zeros(1, 3, *hw, device=device))
    except (NotImplementedError, RuntimeError):
        if device.type != 'meta':
            raise
        return count_gmacs(model.to_empty(device='cpu'), hw, exclude_prefixes)
    total = counter.get_total_flops()
    root = type(model).__name__
    excluded = 0
    if exclude_prefixes:
        names = [k[len(root) + 1:] for k in counter.get_flop_counts() if k.startswith(root + '.')]
        matched = [n for n in names if _module_prefix_match(n, exclude_prefixes)]
        # count each excluded subtree once: keep the outermost matched module names
        outer = [n for n in matched if not any(n != m and n.startswith(m + '.') for m in matched)]
        counts = counter.get_flop_counts()
        excluded = sum(sum(counts[f'{root}.{n}'].values()) for n in outer)
    return (total - excluded) / 2e9


def time_forward(model, hw, repeats: int) -> float:
    """Median milliseconds of a batch-1 fp32 forward after one warm-up run."""
    x = torch.randn(1, 3, *hw)
    with torch.inference_mode():
        model(x)
        times = []
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def zoo_row(name: str, arch: Optional[str], timed: bool = False, repeats: int = 3, repeats_large: int = 1,
            large: bool = True) -> Dict:
    """Measure one variant; returns a dict of the table's columns (numbers, None where not available)."""
    cls = get_backbone_class(name)
    model = build(name, arch, 'cpu' if timed else 'meta')
    arch_name = getattr(model, 'arch_name', arch)
    paper = dict(getattr(cls, 'paper_table', {}) or {}).get(arch_name, {})
    row = dict(model=name, arch=arch_name, params=model.paper_param_count() / 1e6,
               params_total=sum(p.numel() for p in model.parameters()) / 1e6,
               paper_params=paper.get('params'), paper_gmacs=paper.get('gmacs'), source=paper.get('source'),
               channels=list(model.out_channels), strides=list(model.out_strides),
               dense_only=tuple(model.dense_only_prefixes))
    row['gmacs'] = count_gmacs(model, (224, 224), row['dense_only'])
    row['gmacs_large'] = count_gmacs(model, LARGE) if large else None
    row['ms'] = row['ms_large'] = None
    if timed:
        row['ms'] = time_forward(model, (224, 224), repeats)
        row['ms_large'] = time_forward(model, LARGE, repeats_large) if large else None
    return row


def _pct(ours, paper):
    return '' if paper in (None, 0) else f'{(ours / paper - 1) * 100:+.1f}%'


def _fmt(v, spec):
    return '–' if v is None else format(v, spec)


HEADERS = ['model', 'arch', 'params (M)', 'paper', 'Δ', 'GMACs 224', 'paper', 'Δ', 'GMACs 800x1333',
           'channels', 'strides', 'ms 224', 'ms 800x1333']


def row_cells(r: Dict) -> List[str]:
    return [r['model'], r['arch'], f"{r['params']:.2f}", _fmt(r['paper_params'], 'g'),
            _pct(r['params'], r['paper_params']), f"{r['gmacs']:.2f}", _fmt(r['paper_gmacs'], 'g'),
            _pct(r['gmacs'], r['paper_gmacs']), _fmt(r['gmacs_large'], '.1f'),
            '/'.join(map(str, r['channels'])), '/'.join(map(str, r['strides'])),
            _fmt(r['ms'], '.0f'), _fmt(r['ms_large'], '.0f')]


def format_table(rows: Sequence[Dict], markdown: bool) -> str:
    cells = [row_cells(r) for r in rows]
    headers = HEADERS
    if not any(r['ms'] is not None for r in rows):  # --no-time: leave out the empty timing columns
        headers, cells = headers[:-2], [c[:-2] for c in cells]
    if markdown:
        lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
        lines += ['| ' + ' | '.join(c) + ' |' for c in cells]
        return '\n'.join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    fmt = '  '.join(f'{{:{"<" if i < 2 else ">"}{w}}}' for i, w in enumerate(widths))
    return '\n'.join([fmt.format(*headers), fmt.format(*('-' * w for w in widths))] + [fmt.format(*c) for c in cells])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--models', nargs='+', default=None, help='backbone names (default: every registered one)')
    p.add_argument('--variants', nargs='+', default=None, help='only these variant names')
    p.add_argument('--no-time', action='store_true', help='skip the CPU timings (build on the meta device)')
    p.add_argument('--no-large', action='store_true', help='skip the 800x1333 columns')
    p.add_argument('--repeats', type=int, default=3, help='timed runs at 224 (median)')
    p.add_argument('--repeats-large', type=int, default=1, help='timed runs at 800x1333 (median)')
    p.add_argument('--markdown', nargs='?', const='-', default=None, metavar='FILE',
                   help="write the table as markdown to FILE ('-' or no FILE: print markdown instead)")
    args = p.parse_args(argv)
    names = args.models or list_backbones()
    unknown = [n for n in names if n not in list_backbones()]
    if unknown:
        print(f'error: unknown backbone(s) {unknown}; registered: {", ".join(list_backbones())}', file=sys.stderr)
        return 2
    rows, missing = [], []
    for name in names:
        cls = get_backbone_class(name)
        for arch in variants(name):
            if args.variants and arch not in args.variants:
                continue
            row = zoo_row(name, arch, timed=not args.no_time, repeats=args.repeats,
                          repeats_large=args.repeats_large, large=not args.no_large)
            rows.append(row)
            if not getattr(cls, 'paper_table', None) or arch not in cls.paper_table:
                missing.append(f'{name}/{arch}')
            if args.markdown != '-':
                print(f'  measured {name} {row["arch"]}', file=sys.stderr)
    notes = ['params: trunk without dense-only parts + the paper classifier\'s extra parts (head, final norm...); '
             'GMACs 224: the same trunk, FlopCounterMode / 2 (matmul, conv, attention); GMACs 800x1333: whole '
             'backbone incl. pyramid' + ('.' if args.no_time else '; ms: batch-1 fp32 CPU forward, '
                                         f'{torch.get_num_threads()} thread(s), torch {torch.__version__}.')]
    if missing:
        notes.append(f'no paper_table entry: {", ".join(missing)}')
    if args.markdown == '-':
        print(format_table(rows, markdown=True))
        print()
        print('\n'.join(f'_{n}_' for n in notes))
        return 0
    print(format_table(rows, markdown=False))
    print('\n'.join(notes))
    if args.markdown:
        with open(args.markdown, 'w') as fh:
            fh.write(format_table(rows, markdown=True) + '\n\n' + '\n'.join(f'_{n}_' for n in notes) + '\n')
        print(f'markdown written to {args.markdown}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
