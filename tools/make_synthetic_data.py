"""Write a small synthetic dataset of shapes in the COCO or ADE20K on-disk format.

Examples::

    python tools/make_synthetic_data.py --out data/synthetic_coco --kind coco
    python tools/make_synthetic_data.py --out data/synthetic_ade --kind ade --num-train 200 --size 256

The COCO set is what ``configs/demo/mask_rcnn_swin_t_synthetic.py`` reads, the ADE20K-like set what
``configs/demo/upernet_swin_t_synthetic.py`` reads. The same ``--seed`` writes byte-identical files.
"""
import argparse
import os
import sys

try:
    from vit_backbones.data import DEFAULT_CLASSES, SHAPE_NAMES, make_ade_like, make_coco_instances
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
    from vit_backbones.data import DEFAULT_CLASSES, SHAPE_NAMES, make_ade_like, make_coco_instances


def parse_args(argv=None):
    """Parse the command line.

    Args:
        argv: Arguments (``sys.argv[1:]`` when None).

    Returns:
        The parsed ``argparse.Namespace``.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='data/synthetic', help='dataset root to write')
    parser.add_argument('--kind', choices=('coco', 'ade'), default='coco',
                        help='coco: COCO 2017 instances; ade: ADE20K semantic segmentation layout')
    parser.add_argument('--num-train', type=int, default=160, help='training images')
    parser.add_argument('--num-val', type=int, default=40, help='validation images')
    parser.add_argument('--size', type=int, nargs='+', default=[192],
                        help='image size: one value (square) or H W')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--classes', nargs='+', default=list(DEFAULT_CLASSES), choices=SHAPE_NAMES,
                        help='shape classes')
    parser.add_argument('--max-objects', type=int, default=4, help='objects per image: 1..this')
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 2):
        parser.error('--size takes one value (square) or two (H W)')
    return args


def main(argv=None):
    """Generate the dataset and print where it went.

    Args:
        argv: Arguments (``sys.argv[1:]`` when None).
    """
    args = parse_args(argv)
    size = tuple(args.size) * 2 if len(args.size) == 1 else tuple(args.size)
    make = make_coco_instances if args.kind == 'coco' else make_ade_like
    paths = make(args.out, args.num_train, args.num_val, image_size=size, seed=args.seed,
                 classes=args.classes, max_objects=args.max_objects)
    print(f'wrote {args.kind} set: {args.num_train} train + {args.num_val} val images of {size[0]}x{size[1]} '
          f'under {paths["root"]}')


if __name__ == '__main__':
    main()
