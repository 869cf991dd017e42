"""Convert a checkpoint of any supported layout to a plain state dict in vit_backbones' names.

    python tools/convert_checkpoint.py swin_tiny_patch4_window7_224.pth swin_t.pth --model Swin --arch tiny
    python tools/convert_checkpoint.py hf_vit/pytorch_model.bin vit_b.safetensors --model ViT --arch base
    python tools/convert_checkpoint.py deit_384.pth deit_b384.pth --model DeiT --arch base --model-args img_size=384

The source may be the official repository's checkpoint, timm's, HuggingFace transformers' (a
``state_dict`` saved with ``torch.save`` or a ``.safetensors`` file), an mmdet / mmseg checkpoint (its
``backbone.`` part), or ours. The backbone recognises the layout, renames the keys and resizes tensors
whose shape depends on the input or window size (position embeddings, relative position tables) to the
model built from ``--model``/``--arch``/``--model-args``. A report lists what was mapped, resized and
dropped (with the reason: classification head, buffers...) and which of our parameters the checkpoint
does not provide (they are not written; a model loading DST keeps its initialisation there, e.g. the
per-level output norms).

No code from the file is ever run (vit_backbones.checkpoint.read_checkpoint): training checkpoints
that carry ``args`` (argparse.Namespace) or a yacs config load, those objects kept as inert records and
listed in the report; a file that would call any other function is refused. A missing, empty, damaged
or foreign file, a checkpoint of another model or another variant, integer tensors where the model has
float weights, and NaN / inf values (unless --allow-nonfinite) are refused with one ``error:`` line
naming the file, the problem and the fix, exit code 2.
DST is a plain ``{name: tensor}`` dict (``torch.save``), or a safetensors file if DST ends in
``.safetensors``.
"""
import argparse
import ast
import os
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from vit_backbones import get_backbone_class  # noqa: E402
from vit_backbones.features import parse_arch  # noqa: E402
from vit_backbones.checkpoint import CheckpointError, CheckpointMismatchError, load_pretrained  # noqa: E402


def _parse_kv(items):
    out = {}
    for item in items or ():
        if '=' not in item:
            raise ValueError(f'--model-args entries are KEY=VALUE, got {item!r}')
        k, v = item.split('=', 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def convert(src, model_name: str, arch=None, model_args=None, verbose: bool = True, allow_nonfinite: bool = False):
    """Build the backbone, load ``src`` (path or state dict) into it; returns (state dict of the loaded
    tensors in our names, LoadReport, model)."""
    cls = get_backbone_class(model_name)
    kwargs = dict(model_args or {})
    if arch is not None:
        kwargs['arch'] = arch
    model = cls(**kwargs)
    report = load_pretrained(model, src, strict=False, allow_nonfinite=allow_nonfinite)
    own = model.state_dict()
    out = {k: own[k].detach().clone().contiguous() for k in report.loaded}
    return out, report, model


def save_state_dict(sd, dst: str, meta=None):
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    if dst.endswith('.safetensors'):
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise SystemExit('error: writing .safetensors needs the safetensors package (pip install safetensors); '
                             'or give DST a .pth extension')
        save_file(sd, dst, metadata={k: str(v) for k, v in (meta or {}).items()})
    else:
        torch.save(sd, dst)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('src', help='source checkpoint (.pth/.pt/.bin/.ckpt or .safetensors)')
    p.add_argument('dst', help='output path (.pth, or .safetensors)')
    p.add_argument('--model', required=True, help='backbone name (vit_backbones.list_backbones())')
    p.add_argument('--arch', default=None, help="variant name or a JSON dict of hyper-parameters (default: the backbone's default)")
    p.add_argument('--model-args', nargs='*', default=[], metavar='KEY=VALUE',
                   help='other construction arguments, e.g. img_size=384 window_size=12')
    p.add_argument('--allow-nonfinite', action='store_true', help='load NaN / inf weights instead of refusing them')
    p.add_argument('--quiet', action='store_true', help='print only the summary line')
    args = p.parse_args(argv)
    try:
        model_args = _parse_kv(args.model_args)
        arch = parse_arch(args.arch)
        sd, report, model = convert(args.src, args.model, arch, model_args, allow_nonfinite=args.allow_nonfinite)
    except KeyError as e:  # unknown backbone name
        print(f'error: {e.args[0]}', file=sys.stderr)
        return 2
    except CheckpointMismatchError as e:
        print(f'error: refusing: {e}' if args.src in str(e) else f'error: refusing {args.src}: {e}', file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, TypeError) as e:  # CheckpointError: unreadable / unsafe / bad values
        print(f'error: {e}', file=sys.stderr)
        return 2
    arch_name = getattr(model, 'arch_name', arch)
    if args.quiet:
        print(report.summary().splitlines()[0])
    else:
        print(f'{args.model}(arch={arch_name}) <- {args.src}')
        print(report.summary())
        mapped = [k for k in report.loaded if k not in report.resized]
        print(f'  mapped   {len(mapped)} tensors unchanged in shape')
    if not sd:
        print('error: nothing was converted', file=sys.stderr)
        return 2
    save_state_dict(sd, args.dst, meta=dict(model=args.model, arch=arch_name, source_format=report.source_format))
    n = sum(v.numel() for v in sd.values())
    print(f'wrote {args.dst}: {len(sd)} tensors, {n / 1e6:.2f}M values ({report.source_format} -> vit_backbones)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
