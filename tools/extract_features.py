"""Extract a backbone's feature pyramid for images: one output file per image.

    python tools/extract_features.py photos/ --model Swin --arch tiny --checkpoint swin_tiny.pth --out-dir feats/
    python tools/extract_features.py 'data/*.jpg' a.png --model PVTv2 --arch b2 --out-dir feats/ \\
        --format pt npz --short-side 800 --max-size 1333 --batch-size 4 --visualize

Inputs are image files, folders (searched recursively for image files) or glob patterns. For each image
``<out-dir>/<relative path without extension>.pt`` (``torch.load``-able dict) and/or ``.npz`` (numpy,
for users outside PyTorch) holds:

- ``levels`` / ``level_<i>``: every requested pyramid level, float32 (C, H, W),
- ``strides``, ``channels``, ``level_indices``: per level,
- ``model``, ``arch``, ``image``, ``image_size`` (H, W read), ``input_size`` (H, W fed to the model),
  ``mean``, ``std``.

Preprocessing: the checkpoint's normalisation (``vit_backbones.data_config``); resize policy
``--short-side`` (default: none, the image size is kept; ``N``: short side to N keeping the aspect ratio,
``--max-size`` caps the long side; ``pretrain``: the pre-training square size). Images are batched only
with images of the same input size (no padding, so a feature never sees padding that its image did not
have); ``--batch-size`` caps a batch.

Resumable: an image whose outputs all exist already is skipped (outputs are written to a temporary name and
renamed, so an interrupted run leaves no partial file). An unreadable image (or one the model refuses,
e.g. smaller than its total stride) is reported and skipped; the others are processed; the exit code is
1 if any image failed.

``--visualize`` also writes ``<name>.png``: the input beside each level's map, shown as the first three
principal components of its channels as RGB, each panel labelled with its stride, channels and size.
"""
import argparse
import glob
import os
import os.path as osp
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from vit_backbones.features import (IMAGE_EXTENSIONS, FeatureExtractor, image_size, parse_arch,  # noqa: E402
                                    pca_rgb, pyramid_to_dict, read_image)

PANEL = 256  # visualisation: panel width in pixels
LABEL_H = 40  # visualisation: label strip height
GAP = 6


def collect_images(inputs: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Files, folders and globs -> (image files, inputs that matched nothing). A file named explicitly
    is kept whatever its extension (if it is not an image, it is reported as unreadable later)."""
    files, unmatched = [], []
    for item in inputs:
        if osp.isdir(item):
            found = sorted(osp.join(d, f) for d, _, names in os.walk(item) for f in names
                           if f.lower().endswith(IMAGE_EXTENSIONS))
        elif osp.isfile(item):
            found = [item]
        else:
            found = sorted(f for f in glob.glob(item, recursive=True) if osp.isfile(f))
        if not found:
            unmatched.append(item)
        files.extend(found)
    seen, out = set(), []
    for f in files:
        a = osp.abspath(f)
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out, unmatched


def output_stems(files: Sequence[str], out_dir: str) -> Dict[str, str]:
    """Output path without extension for each file: its path relative to the inputs' common folder."""
    if not files:
        return {}
    root = osp.commonpath([osp.dirname(f) for f in files])
    return {f: osp.join(out_dir, osp.splitext(osp.relpath(f, root))[0]) for f in files}


def _atomic(path: str, write):
    os.makedirs(osp.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def save_outputs(stem: str, record: dict, formats: Sequence[str]):
    if 'pt' in formats:
        _atomic(stem + '.pt', lambda p: torch.save(record, p))
    if 'npz' in formats:
        arrays = {f'level_{i}': t.numpy() for i, t in enumerate(record['levels'])}
        arrays.update(strides=np.asarray(record['strides'], np.int64), channels=np.asarray(record['channels'], np.int64),
                      level_indices=np.asarray(record['level_indices'], np.int64),
                      image_size=np.asarray(record['image_size'], np.int64),
                      input_size=np.asarray(record['input_size'], np.int64),
                      mean=np.asarray(record['mean'], np.float32), std=np.asarray(record['std'], np.float32),
                      model=np.asarray(record['model']), arch=np.asarray(record['arch']), image=np.asarray(record['image']))

        def write(p):
            with open(p, 'wb') as fh:  # a file object: np.savez would append .npz to the temporary name
                np.savez(fh, **arrays)
        _atomic(stem + '.npz', write)


# ---------------------------------------------------------------------------- visualisation
def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def visualize(image: np.ndarray, record: dict, path: str, title: str):
    """Input beside each level's PCA map; every panel PANEL px wide, height by the input's aspect ratio."""
    from PIL import Image, ImageDraw
    h, w = image.shape[:2]
    ph = max(1, int(round(PANEL * h / w)))
    ih, iw = record.get('input_size', (h, w))
    label = f'input {w}x{h}' + ('' if (ih, iw) == (h, w) else f' -> {iw}x{ih}')  # file size -> size fed (W x H)
    panels = [(Image.fromarray(image).resize((PANEL, ph), Image.BICUBIC), label, title)]
    for t, s, c in zip(record['levels'], record['strides'], record['channels']):
        rgb = (pca_rgb(t) * 255).round().byte().permute(1, 2, 0).numpy()
        # nearest upsampling keeps the cells visible; each cell covers `stride` input pixels
        panels.append((Image.fromarray(rgb).resize((PANEL, ph), Image.NEAREST), f'stride {s}, {c} ch',
                       f'{t.shape[-1]}x{t.shape[-2]} cells, PCA 1-3'))
    width = len(panels) * PANEL + (len(panels) + 1) * GAP
    canvas = Image.new('RGB', (width, ph + LABEL_H + 2 * GAP), 'white')
    draw = ImageDraw.Draw(canvas)
    big, small = _font(15), _font(12)
    for i, (im, line1, line2) in enumerate(panels):
        x0 = GAP + i * (PANEL + GAP)
        draw.text((x0, GAP), line1, fill='black', font=big)
        draw.text((x0, GAP + 19), line2, fill=(70, 70, 70), font=small)
        canvas.paste(im, (x0, GAP + LABEL_H))
    _atomic(path, lambda p: canvas.save(p, format='PNG'))


def expected_png_size(h: int, w: int, num_levels: int) -> Tuple[int, int]:
    """(width, height) of the picture written for an h x w image with ``num_levels`` levels."""
    n = num_levels + 1
    return n * PANEL + (n + 1) * GAP, max(1, int(round(PANEL * h / w))) + LABEL_H + 2 * GAP


# ---------------------------------------------------------------------------- main loop
def _progress(total: int):
    try:
        from tqdm import tqdm
        return tqdm(total=total, unit='img', file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm comes with transformers here
        from mmengine.utils import ProgressBar

        class _Bar(ProgressBar):
            def close(self):
                self.file.write('\n')
        return _Bar(total, file=sys.stderr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('inputs', nargs='+', help='image files, folders or glob patterns (quote globs)')
    p.add_argument('--model', required=True, help='backbone name (vit_backbones.list_backbones())')
    p.add_argument('--arch', default=None, help="variant name or a JSON dict of hyper-parameters (default: the backbone's default)")
    p.add_argument('--checkpoint', default=None, help='weights in any supported layout')
    p.add_argument('--out-dir', required=True)
    p.add_argument('--format', nargs='+', choices=('pt', 'npz'), default=['pt'], help='output file format(s)')
    p.add_argument('--out-indices', type=int, nargs='+', default=None, help='levels to keep (default: all)')
    p.add_argument('--short-side', default=None,
                   help="resize policy: none (default), N (short side to N, aspect kept) or 'pretrain'")
    p.add_argument('--max-size', type=int, default=None, help='cap of the long side with --short-side N')
    p.add_argument('--batch-size', type=int, default=4, help='images per forward (same input size only)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--visualize', action='store_true', help='also write <name>.png (input + PCA of each level)')
    p.add_argument('--overwrite', action='store_true', help='recompute images whose outputs exist')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from vit_backbones.runtime.memory import keep_freed_memory
    print(keep_freed_memory(), file=sys.stderr, flush=True)
    if args.batch_size < 1:
        print('error: --batch-size must be >= 1', file=sys.stderr)
        return 2
    short = args.short_side
    if short is not None and short.isdigit():
        short = int(short)
    kwargs = {} if args.out_indices is None else dict(out_indices=tuple(args.out_indices))
    try:
        arch = parse_arch(args.arch)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    try:
        ex = FeatureExtractor(args.model, arch, args.checkpoint, short, args.max_size, args.device, **kwargs)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as e:
        print(f'error: {e.args[0] if isinstance(e, KeyError) else e}', file=sys.stderr)
        return 2
    if ex.load_report is not None:
        print(ex.load_report.summary())
    files, unmatched = collect_images(args.inputs)
    failures: 'OrderedDict[str, str]' = OrderedDict((u, 'no such file, folder or matching pattern') for u in unmatched)
    stems = output_stems(files, args.out_dir)
    exts = list(args.format) + (['png'] if args.visualize else [])
    todo = [f for f in files if args.overwrite or not all(osp.exists(f'{stems[f]}.{e}') for e in exts)]
    skipped = len(files) - len(todo)

    # group by input size (header only) so a batch never mixes sizes
    groups: 'OrderedDict[Tuple[int, int], List[str]]' = OrderedDict()
    for f in todo:
        try:
            groups.setdefault(ex.target_size(image_size(f)), []).append(f)
        except ValueError as e:
            failures[f] = str(e)
    cfg = ex.data_config
    done = 0
    t0 = time.time()
    bar = _progress(len(todo))
    if len(todo) - sum(len(v) for v in groups.values()):
        bar.update(len(todo) - sum(len(v) for v in groups.values()))
    for size, group in groups.items():
        for b in range(0, len(group), args.batch_size):
            batch = group[b:b + args.batch_size]
            images, tensors, ok = [], [], []
            for f in batch:
                try:
                    img = read_image(f)
                    tensors.append(ex.preprocess(img))
                    images.append(img)
                    ok.append(f)
                except (ValueError, OSError) as e:
                    failures[f] = str(e)
                    bar.update(1)
            if not ok:
                continue
            try:
                levels = ex.forward_normalized(torch.cat(tensors))
            except (ValueError, TypeError, RuntimeError) as e:
                for f in ok:
                    failures[f] = f'{ex.name} refused the input of size {size[0]}x{size[1]}: {e}'
                bar.update(len(ok))
                continue
            for i, (f, img) in enumerate(zip(ok, images)):
                rec = pyramid_to_dict(levels, i)
                rec.update(model=ex.name, arch=ex.arch_name, image=f, image_size=list(img.shape[:2]),
                           input_size=list(size), mean=list(cfg['mean']), std=list(cfg['std']))
                try:
                    save_outputs(stems[f], rec, args.format)
                    if args.visualize:
                        visualize(img, rec, stems[f] + '.png', f'{ex.name}-{ex.arch_name}'
                                  + ('' if args.checkpoint else ' (random init)'))
                    done += 1
                except OSError as e:
                    failures[f] = f'cannot write outputs for it: {e}'
                bar.update(1)
    bar.close()
    print(f'{done} image(s) written to {args.out_dir}, {skipped} skipped (outputs exist), {len(failures)} failed '
          f'[{time.time() - t0:.1f} s; levels: strides {ex.strides}, channels {ex.channels}]')
    if failures:
        print('failed:', file=sys.stderr)
        for f, why in failures.items():
            print(f'  {f}: {why}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
