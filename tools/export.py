#!/usr/bin/env python
"""Export a backbone to ONNX (and optionally a torch.export program) with dynamic batch, height and
width, then check it in onnxruntime at a second input size against the eager model.

    python tools/export.py Swin --arch tiny --out work_dirs/swin_t.onnx
    python tools/export.py PVTv2 --arch b2 --checkpoint pvt_v2_b2.pth --pt2 work_dirs/pvtv2_b2.pt2
    python tools/export.py LeViT --arch '{"base": "128s", "depths": [1, 1, 1]}' --check-size 480x640
    python tools/export.py all --check-size 224x224,256x320,333x517    # every backbone, a summary table

Steps: build the backbone (``vit_backbones.build_backbone(name, arch, checkpoint=...)``, any supported
checkpoint layout), ``torch.export.export`` it with ``Dim``s for batch, H and W (H, W from
:func:`export_min_size` to ``--max-size``), optionally save that program (``--pt2``), convert it with
``torch.onnx.export(..., dynamo=True)`` (input ``image``, outputs ``level<i>``, axes ``batch``,
``height``, ``width`` symbolic), then run the ONNX file in onnxruntime at each ``--check-size`` (default
333x517, a size no stride divides) and print the parity (max |difference| / max |eager activation|, per
level) and the eager / onnxruntime times. Exit status 0 when the parity is within ``--tol``, 1 when
not, 2 for bad arguments.

Needs the ``export`` extra (onnx, onnxruntime, onnxscript); ``--no-onnx`` writes only the ``.pt2``.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))


class ArgumentError(Exception):
    """A bad command-line argument: printed as ``error: ...``, exit status 2."""


def export_min_size(model) -> int:
    """Smallest input side the exported graph accepts (its H/W ``Dim`` minimum).

    The backbone's own minimum (``model.min_input_size``, its total stride) unless some map inside is
    reshaped while it can have a single cell: torch.export specialises such a map to more than one cell
    (its "0/1 specialisation", which ``backed_size_oblivious`` only lifts for some operations), so the
    graph starts one size later. Swin and Shuffle: the last stage's map (1x1 at 32 px); LeViT: the
    stride-64 stage (1x1 at 64 px); PVT v1/v2: the spatial-reduction map of each stage with
    ``sr_ratio`` r > 1, 1/(r * stride) of the input (at least 2 cells from ``stride * (2r - 1) + 1`` px:
    61 px for the released sr_ratios (8, 4, 2, 1)).
    """
    name = type(model).__name__
    lo = int(model.min_input_size)
    if name in ('Swin', 'ShuffleTransformer', 'LeViT'):
        return lo + 1
    if name in ('PVT', 'PVTv2'):
        if name == 'PVT':
            lo += 1  # the last stage's position embedding is resampled (a reshape) onto its grid
        if not getattr(model, 'linear', False):
            for i, r in enumerate(model.sr_ratios):
                if r > 1:
                    lo = max(lo, 4 * 2**i * (2 * r - 1) + 1)
    return lo


def dynamic_shapes(model, max_size: int = 4096, max_batch: int = 256):
    """``dynamic_shapes`` for ``torch.export.export(model, (x,), dynamic_shapes=...)`` (and
    ``torch.onnx.export(..., dynamo=True)``): batch in [1, max_batch], H and W in
    [:func:`export_min_size`, max_size]."""
    from torch.export import Dim
    lo = export_min_size(model)
    return ({0: Dim('batch', min=1, max=max_batch), 2: Dim('height', min=lo, max=max_size),
             3: Dim('width', min=lo, max=max_size)}, )


def export_program(model, example, max_size: int = 4096, max_batch: int = 256):
    """``torch.export.export`` of an eval-mode backbone with dynamic batch, H and W."""
    import torch
    return torch.export.export(model, (example, ), dynamic_shapes=dynamic_shapes(model, max_size, max_batch))


def export_onnx(model, example, path: str, max_size: int = 4096, max_batch: int = 256, opset=None,
                optimize: bool = True):
    """``torch.onnx.export(..., dynamo=True)`` with symbolic ``batch``, ``height``, ``width``; returns the
    output names and the ``ONNXProgram`` (its ``exported_program`` is the torch.export program).
    ``optimize=False`` skips the exporter's graph optimisation (faster; the same function)."""
    import torch
    with torch.no_grad():
        n_out = len(model(example))
    outputs = [f'level{i}' for i in range(n_out)]
    kwargs = {} if opset is None else dict(opset_version=opset)
    program = torch.onnx.export(model, (example, ), path, dynamo=True, input_names=['image'], output_names=outputs,
                                dynamic_shapes=dynamic_shapes(model, max_size, max_batch), verbose=False,
                                optimize=optimize, **kwargs)
    return outputs, program


def onnx_input_dims(path: str):
    """The input's dims in the ONNX file: names (symbolic) or ints."""
    import onnx
    graph = onnx.load(path, load_external_data=False).graph
    return [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]


def relative_error(ref, out) -> float:
    """max |out - ref| over all levels / max |ref| over all levels."""
    import numpy as np
    scale = max(float(np.abs(np.asarray(r)).max()) for r in ref)
    return max(float(np.abs(np.asarray(r) - np.asarray(o)).max()) for r, o in zip(ref, out)) / max(scale, 1e-30)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _size(text: str, what: str):
    parts = text.lower().split('x')
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ArgumentError(f'{what} must be HxW with positive integers (e.g. 333x517), got {text!r}')
    return int(parts[0]), int(parts[1])


def _arch(text: str):
    if text is None:
        return None
    if text.lstrip().startswith('{'):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ArgumentError(f'--arch looks like JSON but does not parse: {e}') from None
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('backbone', help='registered backbone name (python -c "import vit_backbones; '
                                    'print(vit_backbones.list_backbones())"), or all: every class-default '
                                    'variant, with a summary table')
    p.add_argument('--arch', help='variant name or a JSON dict of hyper-parameters (default: the class default)')
    p.add_argument('--checkpoint', help='weights in any supported layout (official, timm, HF, mmdet/mmseg, ours)')
    p.add_argument('--out', help='ONNX file to write (default work_dirs/export/<backbone>.onnx)')
    p.add_argument('--pt2', help='also save the torch.export program here (torch.export.save)')
    p.add_argument('--no-onnx', action='store_true', help='write only the --pt2 program (no onnx packages needed)')
    p.add_argument('--export-size', default='224x224', help='example input size for tracing (default 224x224)')
    p.add_argument('--check-size', default='333x517',
                   help='onnxruntime check input size(s), comma-separated HxW (default 333x517)')
    p.add_argument('--batch', type=int, default=1, help='batch of the check run (default 1)')
    p.add_argument('--max-size', type=int, default=4096, help='largest H/W the graph accepts (default 4096)')
    p.add_argument('--max-batch', type=int, default=256, help='largest batch the graph accepts (default 256)')
    p.add_argument('--opset', type=int, default=None, help='ONNX opset (default: the exporter\'s)')
    p.add_argument('--repeats', type=int, default=5, help='timed runs for eager / onnxruntime (default 5)')
    p.add_argument('--tol', type=float, default=1e-4, help='largest accepted relative parity (default 1e-4)')
    p.add_argument('--threads', type=int, default=0, help='torch and onnxruntime threads (0: their defaults)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ArgumentError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


def _check_sizes(text: str):
    return [_size(part, '--check-size') for part in text.split(',')]


def run(args) -> int:
    export_hw = _size(args.export_size, '--export-size')
    check_sizes = _check_sizes(args.check_size)
    if args.batch < 1 or args.max_batch < args.batch:
        raise ArgumentError(f'--batch must be in [1, --max-batch={args.max_batch}], got {args.batch}')
    if args.repeats < 1:
        raise ArgumentError(f'--repeats must be at least 1, got {args.repeats}')
    if args.checkpoint is not None and not os.path.exists(args.checkpoint):
        raise ArgumentError(f'--checkpoint {args.checkpoint!r} does not exist')
    if not args.no_onnx:
        missing = [m for m in ('onnx', 'onnxruntime', 'onnxscript') if not _importable(m)]
        if missing:
            raise ArgumentError(f'ONNX export needs {", ".join(missing)}: pip install -e ".[export]" '
                                '(or pass --no-onnx --pt2 FILE for a torch.export program only)')
    elif not args.pt2:
        raise ArgumentError('--no-onnx writes nothing without --pt2 FILE')

    import torch
    import vit_backbones
    if args.threads:
        torch.set_num_threads(args.threads)
    names = vit_backbones.list_backbones()
    if args.backbone.lower() == 'all':
        if args.checkpoint or args.arch or args.pt2 or args.out:
            raise ArgumentError('all: one class-default variant per backbone; --arch, --checkpoint, --out and --pt2 '
                                'are for a single backbone')
        return run_all(args, names, export_hw, check_sizes)
    name = next((n for n in names if n.lower() == args.backbone.lower()), None)
    if name is None:
        raise ArgumentError(f'unknown backbone {args.backbone!r}; choose one of {", ".join(names)} (or all)')
    return 0 if export_and_check(args, name, export_hw, check_sizes)['ok'] else 1


def build_model(args, name):
    import vit_backbones
    kwargs = {} if args.arch is None else dict(arch=_arch(args.arch))
    try:
        model = vit_backbones.build_backbone(name, checkpoint=args.checkpoint, **kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise ArgumentError(f'cannot build {name} (arch={args.arch!r}): {e}') from None
    except Exception as e:  # a checkpoint of another model, an unreadable file ...
        if args.checkpoint is None:
            raise
        raise ArgumentError(f'cannot load --checkpoint {args.checkpoint!r} into {name}: {e}') from None
    return model.eval()


def export_and_check(args, name, export_hw, check_sizes) -> dict:
    """Export one backbone and check it; prints as it goes, returns a summary (``ok``: parity within --tol)."""
    import torch
    model = build_model(args, name)
    lo = export_min_size(model)
    for what, (h, w) in [('--export-size', export_hw)] + [('--check-size', hw) for hw in check_sizes]:
        if min(h, w) < lo or max(h, w) > args.max_size:
            raise ArgumentError(f'{what} {h}x{w} is outside the exported range [{lo}, {args.max_size}] of {name} '
                                f'(see export_min_size in tools/export.py)')
    if args.max_size < lo:
        raise ArgumentError(f'--max-size {args.max_size} is below the smallest exportable size {lo}')
    report = getattr(model, 'load_report', None)
    if report is not None:
        print(f'loaded {args.checkpoint}: {report}')
    torch.manual_seed(0)
    # batch 2: torch.export specialises an example dimension of size 1 to a constant (its 0/1 rule)
    example = torch.randn(2, 3, *export_hw)
    arch = getattr(model, 'arch_name', None) or args.arch
    summary = dict(name=name, arch=arch, min_size=lo, ok=True, parity={}, times={})
    print(f'{name} ({arch}): dynamic batch [1, {args.max_batch}], H and W [{lo}, {args.max_size}], traced at '
          f'2x3x{export_hw[0]}x{export_hw[1]}', flush=True)

    if args.pt2:
        t = time.perf_counter()
        program = export_program(model, example, args.max_size, args.max_batch)
        os.makedirs(os.path.dirname(os.path.abspath(args.pt2)), exist_ok=True)
        torch.export.save(program, args.pt2)
        print(f'torch.export program: {args.pt2} ({time.perf_counter() - t:.1f} s)')
        for hw in check_sizes:
            x = torch.randn(args.batch, 3, *hw)
            with torch.no_grad():
                err = relative_error([r.numpy() for r in model(x)], [o.numpy() for o in program.module()(x)])
            print(f'torch.export program at {hw[0]}x{hw[1]} (batch {args.batch}): relative error {err:.2e}')
            summary['ok'] &= err <= args.tol
    if args.no_onnx:
        return summary

    import onnxruntime as ort
    out = args.out or os.path.join('work_dirs', 'export', f'{name}.onnx')
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    t = time.perf_counter()
    outputs = export_onnx(model, example, out, args.max_size, args.max_batch, args.opset)[0]
    summary['export_s'] = time.perf_counter() - t
    files = [f for f in (out, out + '.data') if os.path.exists(f)]  # weights in a side file (external data)
    size = sum(os.path.getsize(f) for f in files) / 2**20
    summary['dims'] = onnx_input_dims(out)
    print(f'ONNX: {" + ".join(files)} ({size:.1f} MiB, {summary["export_s"]:.1f} s), input image '
          f'{summary["dims"]}, outputs {", ".join(outputs)}', flush=True)

    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(out, options, providers=['CPUExecutionProvider'])
    for hw in check_sizes:
        x = torch.randn(args.batch, 3, *hw)
        feed = {session.get_inputs()[0].name: x.numpy()}
        with torch.no_grad():
            ref = [r.numpy() for r in model(x)]
        got = session.run(None, feed)
        if [r.shape for r in ref] != [g.shape for g in got]:
            print(f'onnxruntime output shapes {[g.shape for g in got]} differ from eager {[r.shape for r in ref]} '
                  f'at {hw[0]}x{hw[1]}')
            summary['ok'] = False
            summary['parity'][hw] = float('inf')
            continue
        err = relative_error(ref, got)
        summary['parity'][hw] = err
        summary['ok'] &= err <= args.tol
        scale = max(float(abs(r).max()) for r in ref)
        levels = ', '.join(f'{o}: {float(abs(r - g).max()) / scale:.1e}' for o, r, g in zip(outputs, ref, got))
        print(f'parity at {hw[0]}x{hw[1]} (batch {args.batch}): max |onnxruntime - eager| / max |eager| = '
              f'{err:.2e} ({levels})')
        with torch.no_grad():
            t_eager = _median_time(lambda: model(x), args.repeats)
        t_ort = _median_time(lambda: session.run(None, feed), args.repeats)
        summary['times'][hw] = (t_eager, t_ort)
        print(f'time per forward at {hw[0]}x{hw[1]} (median of {args.repeats}): eager {t_eager * 1e3:.1f} ms, '
              f'onnxruntime {t_ort * 1e3:.1f} ms ({t_eager / t_ort:.2f}x)', flush=True)
        if err > args.tol:
            print(f'parity {err:.2e} exceeds --tol {args.tol:g}')
    return summary


def jit_trace_behaviour(model, export_hw, check_hw) -> str:
    """What ``torch.jit.trace`` at ``export_hw`` does: refuses (StaticTraceError) or its error at ``check_hw``."""
    import torch
    from vit_backbones.layers.tracing import StaticTraceError
    try:
        traced = torch.jit.trace(model, torch.randn(1, 3, *export_hw), check_trace=False)
    except StaticTraceError:
        return 'refuses'
    x = torch.randn(1, 3, *check_hw)
    with torch.no_grad():
        err = relative_error([r.numpy() for r in model(x)], [o.numpy() for o in traced(x)])
    return f'right at {check_hw[0]}x{check_hw[1]} ({err:.0e})'


def run_all(args, names, export_hw, check_sizes) -> int:
    """``all``: every backbone's class-default variant; a markdown table at the end."""
    import warnings
    rows, ok = [], True
    for name in names:
        args.out = os.path.join('work_dirs', 'export', f'{name}.onnx')
        summary = export_and_check(args, name, export_hw, check_sizes)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the tracer's warnings about Python values
            summary['jit'] = jit_trace_behaviour(build_model(args, name), export_hw, check_sizes[-1])
        args.out = None
        rows.append(summary)
        ok &= summary['ok']
    sizes = ', '.join(f'{h}x{w}' for h, w in check_sizes)
    print(f'\n| backbone | H, W range | ONNX export s | ORT parity at {sizes} | eager / ORT ms at {sizes} | '
          'jit.trace at 224 |')
    print('|---|---|---|---|---|---|')
    for r in rows:
        parity = ' / '.join(f'{r["parity"][hw]:.1e}' for hw in check_sizes)
        times = ' / '.join(f'{r["times"][hw][0] * 1e3:.0f}:{r["times"][hw][1] * 1e3:.0f}' for hw in check_sizes
                           if hw in r['times'])
        print(f'| {r["name"]} {r["arch"]} | [{r["min_size"]}, {args.max_size}] | {r["export_s"]:.0f} | {parity} | '
              f'{times} | {r["jit"]} |')
    return 0 if ok else 1


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


if __name__ == '__main__':
    sys.exit(main())
