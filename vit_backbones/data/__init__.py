"""Data utilities: deterministic synthetic datasets in the COCO and ADE20K on-disk formats.

Needs numpy and OpenCV only (no mmdet / mmseg at import).
"""
from .synthetic import (DEFAULT_CLASSES, SHAPE_NAMES, Scene, ade_class_names, make_ade_like,
                        make_coco_instances, render_scene)

__all__ = ['DEFAULT_CLASSES', 'SHAPE_NAMES', 'Scene', 'ade_class_names', 'make_ade_like',
           'make_coco_instances', 'render_scene']
