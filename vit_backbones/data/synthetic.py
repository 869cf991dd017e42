"""Deterministic synthetic detection / segmentation datasets in real on-disk formats.

The scenes are a few filled shapes (ellipses, rotated rectangles, triangles, ...) on a textured
background. Shape colour and texture are drawn independently of the class, so a model has to learn
the *shape* to classify an object; background texture, clutter strokes and pixel noise keep the task
from being trivial. The generators write:

* :func:`make_coco_instances`: the COCO 2017 instance layout (``train2017/``, ``val2017/``,
  ``annotations/instances_{train,val}2017.json``) with polygon masks, as mmdet's ``CocoDataset``
  and pycocotools read it.
* :func:`make_ade_like`: the ADE20K (``ADEChallengeData2016``) layout, as mmseg's
  ``ADE20KDataset`` reads it: ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png`` with 0 meaning "unlabelled / other" (ignored under
  ``reduce_zero_label=True``) and 1..K the classes.

Everything is drawn from numpy's seeded ``Generator`` with one independent stream per image, so the
same seed gives byte-identical files on the same numpy / OpenCV versions, and the validation images do
not depend on how many training images were asked for. Only numpy and OpenCV are needed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = [
    'SHAPE_NAMES', 'DEFAULT_CLASSES', 'Scene', 'render_scene', 'make_coco_instances', 'make_ade_like',
    'ade_class_names',
]

#: Shapes the generator can draw (any subset, in any order, can be used as the class list).
SHAPE_NAMES = ('ellipse', 'rectangle', 'triangle', 'star', 'hexagon')
#: Classes used when none are given.
DEFAULT_CLASSES = ('ellipse', 'rectangle', 'triangle')

# Fixed-point precision used when handing float polygons to cv2.fillPoly (2**4 = 1/16 pixel).
_SHIFT = 4
# Integer identifiers that keep the random streams of the splits apart.
_SPLIT_CODE = {'train': 1, 'val': 2}
_JPEG_QUALITY = 92


@dataclass
class Scene:
    """One rendered image and its objects.

    Attributes:
        image: ``(H, W, 3)`` uint8 BGR image (OpenCV channel order).
        labels: class index (0-based, into the class list) of each object.
        polygons: ``(N_i, 2)`` float64 ``(x, y)`` vertices of each object, in pixels.
        masks: ``(H, W)`` bool mask of each object as drawn (same polygon, no anti-aliasing).
        clutter: ``(H, W)`` bool mask of background strokes that belong to no class.
    """

    image: np.ndarray
    labels: List[int] = field(default_factory=list)
    polygons: List[np.ndarray] = field(default_factory=list)
    masks: List[np.ndarray] = field(default_factory=list)
    clutter: Optional[np.ndarray] = None


# --------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------

def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _shape_polygon(name: str, rng: np.random.Generator, radius: float) -> np.ndarray:
    """Vertices of a shape centred on the origin whose farthest point is at most ``radius`` away."""
    angle = rng.uniform(0, 2 * np.pi)
    if name == 'ellipse':
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        ratio = rng.uniform(0.6, 1.0)
        pts = np.stack([radius * np.cos(t), ratio * radius * np.sin(t)], axis=1)
    elif name == 'rectangle':
        ratio = rng.uniform(0.45, 1.0)
        # Half-diagonal equals the radius, so every corner stays within it.
        half_w = radius / np.sqrt(1 + ratio ** 2)
        half_h = ratio * half_w
        pts = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
    elif name == 'triangle':
        t = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-15, 15, size=3))
        r = radius * rng.uniform(0.85, 1.0, size=3)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    elif name == 'star':
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        r = np.where(np.arange(10) % 2 == 0, radius, radius * rng.uniform(0.4, 0.5))
        pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    elif name == 'hexagon':
        t = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        pts = np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    else:
        raise ValueError(f'unknown shape {name!r}; choose from {SHAPE_NAMES}')
    return _rotate(pts, angle)


def _fill_mask(shape_hw: Tuple[int, int], polygon: np.ndarray, antialias: bool = False) -> np.ndarray:
    """Rasterise a float polygon: a uint8 mask (0/255, or 0..255 coverage with ``antialias``)."""
    mask = np.zeros(shape_hw, np.uint8)
    # Pixel centres sit at integer coordinates for OpenCV, at +0.5 in COCO's convention.
    pts = np.round((polygon - 0.5) * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_AA if antialias else cv2.LINE_8, shift=_SHIFT)
    return mask


# --------------------------------------------------------------------------------------------------
# Textures
# --------------------------------------------------------------------------------------------------

def _random_colour(rng: np.random.Generator, saturation=(0.35, 1.0), value=(0.35, 1.0)) -> np.ndarray:
    """A BGR colour (float, 0..255) from a random hue, saturation and value."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(*saturation) * 255, rng.uniform(*value) * 255]]],
                   np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 3) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    grid = rng.uniform(-1, 1, size=(cells, cells, channels)).astype(np.float32)
    out = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(out.reshape(h, w, channels), -1, 1)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = _random_colour(rng, saturation=(0.0, 0.6), value=(0.3, 0.9))
    img = np.broadcast_to(base, (h, w, 3)).astype(np.float32).copy()
    img += 45 * _smooth_noise(rng, h, w, cells=int(rng.integers(2, 6)))
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # soft stripes
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(6, 20)
        wave = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period)
        img += rng.uniform(10, 30) * wave[..., None]
    elif kind == 1:  # checker
        cell = int(rng.integers(6, 18))
        checker = (((xx // cell) + (yy // cell)) % 2) * 2 - 1
        img += rng.uniform(8, 25) * checker[..., None]
    # kind 2: smooth noise only
    return img


def _object_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    colour = _random_colour(rng)
    img = np.broadcast_to(colour, (h, w, 3)).astype(np.float32).copy()
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # stripes of a second colour
        other = _random_colour(rng)
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(4, 12)
        wave = (np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period) > 0)
        img = np.where(wave[..., None], img, other)
    elif kind == 1:  # speckle
        img += 35 * rng.standard_normal((h, w, 1)).astype(np.float32)
    elif kind == 2:  # shading gradient
        theta = rng.uniform(0, 2 * np.pi)
        ramp = (xx * np.cos(theta) + yy * np.sin(theta)) / max(h, w)
        img *= (0.75 + 0.5 * ramp)[..., None]
    # kind 3: flat colour
    return img


# --------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------

def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODE[split], int(index)]))


def render_scene(rng: np.random.Generator,
                 image_size: Tuple[int, int],
                 classes: Sequence[str] = DEFAULT_CLASSES,
                 max_objects: int = 4) -> Scene:
    """Draw one scene: 1..``max_objects`` non-overlapping shapes on a textured background.

    Args:
        rng: The random generator to draw from (it is advanced).
        image_size: ``(H, W)`` in pixels; the shorter side should be at least 32.
        classes: Shape names (from :data:`SHAPE_NAMES`); an object's label indexes this sequence.
        max_objects: Upper bound on the number of objects.

    Returns:
        The :class:`Scene`. Objects never overlap and lie fully inside the image, so each polygon is
        also the object's visible outline.
    """
    h, w = int(image_size[0]), int(image_size[1])
    if min(h, w) < 32:
        raise ValueError(f'image_size {image_size} is too small: use at least 32 pixels per side')
    for name in classes:
        if name not in SHAPE_NAMES:
            raise ValueError(f'unknown shape class {name!r}; choose from {SHAPE_NAMES}')
    img = _background(rng, h, w)

    # Clutter: a few thin strokes and small blobs that belong to no class.
    clutter = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(clutter, p0, p1, 255, thickness=int(rng.integers(1, 3)), lineType=cv2.LINE_8)
    stroke_colour = _random_colour(rng)
    img = np.where(clutter[..., None] > 0, stroke_colour, img)

    scene = Scene(image=img, clutter=clutter > 0)
    side = min(h, w)
    num = int(rng.integers(1, max_objects + 1))
    placed: List[Tuple[float, float, float]] = []
    for _ in range(num):
        for _attempt in range(50):
            radius = side * rng.uniform(0.10, 0.24)
            cx = rng.uniform(radius + 2, w - radius - 2)
            cy = rng.uniform(radius + 2, h - radius - 2)
            if all(np.hypot(cx - x, cy - y) > radius + r + 3 for x, y, r in placed):
                break
        else:
            continue  # no room for another object
        placed.append((cx, cy, radius))
        label = int(rng.integers(len(classes)))
        polygon = _shape_polygon(classes[label], rng, radius) + np.array([cx, cy])
        alpha = _fill_mask((h, w), polygon, antialias=True).astype(np.float32)[..., None] / 255.0
        texture = _object_texture(rng, h, w)
        img = img * (1 - alpha) + texture * alpha
        scene.labels.append(label)
        scene.polygons.append(polygon)
        scene.masks.append(_fill_mask((h, w), polygon) > 0)

    img = img + 6 * rng.standard_normal((h, w, 3)).astype(np.float32)
    scene.image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return scene


def _write_jpg(path: str, image: np.ndarray) -> None:
    ok, buf = cv2.imencode('.jpg', image, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f'could not encode {path}')
    with open(path, 'wb') as f:
        f.write(buf.tobytes())


def _write_png(path: str, image: np.ndarray) -> None:
    ok, buf = cv2.imencode('.png', image, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise RuntimeError(f'could not encode {path}')
    with open(path, 'wb') as f:
        f.write(buf.tobytes())


def _check_counts(num_train: int, num_val: int) -> None:
    if num_train < 0 or num_val < 0 or num_train + num_val == 0:
        raise ValueError(f'need non-negative image counts with at least one image, got '
                         f'num_train={num_train}, num_val={num_val}')


# --------------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------------

def _polygon_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def make_coco_instances(out_dir: str,
                        num_train: int,
                        num_val: int,
                        image_size: Tuple[int, int] = (256, 256),
                        seed: int = 0,
                        classes: Sequence[str] = DEFAULT_CLASSES,
                        max_objects: int = 4) -> Dict[str, str]:
    """Write a COCO 2017-format instance segmentation set of synthetic shapes.

    Layout::

        out_dir/train2017/000000000001.jpg ...
        out_dir/val2017/000001000001.jpg ...
        out_dir/annotations/instances_train2017.json
        out_dir/annotations/instances_val2017.json

    Each annotation has a one-polygon ``segmentation``, ``bbox`` (``[x, y, w, h]``, the polygon's
    extent), ``area`` (the polygon's area), ``iscrowd=0`` and a 1-based ``category_id``; categories
    are named after ``classes``. Image ids are unique across the two splits.

    Args:
        out_dir: Dataset root (created if missing).
        num_train: Number of training images.
        num_val: Number of validation images.
        image_size: ``(H, W)`` of every image.
        seed: Seed of all randomness: the same seed writes byte-identical files.
        classes: Shape names from :data:`SHAPE_NAMES`, in category-id order.
        max_objects: Each image holds 1..``max_objects`` objects.

    Returns:
        Paths: ``root``, ``train_ann``, ``val_ann``, ``train_img_dir``, ``val_img_dir``.
    """
    _check_counts(num_train, num_val)
    classes = tuple(classes)
    h, w = int(image_size[0]), int(image_size[1])
    os.makedirs(os.path.join(out_dir, 'annotations'), exist_ok=True)
    categories = [dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(classes)]
    paths = dict(root=out_dir)
    for split, count, id_offset in (('train', num_train, 0), ('val', num_val, 1_000_000)):
        img_dir = os.path.join(out_dir, f'{split}2017')
        os.makedirs(img_dir, exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            scene = render_scene(_image_rng(seed, split, index), (h, w), classes, max_objects)
            image_id = id_offset + index + 1
            file_name = f'{image_id:012d}.jpg'
            _write_jpg(os.path.join(img_dir, file_name), scene.image)
            images.append(dict(id=image_id, file_name=file_name, height=h, width=w, license=1))
            for label, polygon in zip(scene.labels, scene.polygons):
                x0, y0 = polygon.min(axis=0)
                x1, y1 = polygon.max(axis=0)
                annotations.append(dict(
                    id=len(annotations) + 1 + id_offset,
                    image_id=image_id,
                    category_id=label + 1,
                    segmentation=[[round(float(v), 2) for v in polygon.reshape(-1)]],
                    area=round(_polygon_area(polygon), 2),
                    bbox=[round(float(x0), 2), round(float(y0), 2),
                          round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                    iscrowd=0))
        doc = dict(
            info=dict(description=f'synthetic shapes ({split}), vit_backbones.data.synthetic', version='1.0',
                      year=2017, contributor='vit_backbones', date_created='2017-01-01', seed=int(seed)),
            licenses=[dict(id=1, name='CC0', url='')],
            images=images, annotations=annotations, categories=categories)
        ann_path = os.path.join(out_dir, 'annotations', f'instances_{split}2017.json')
        with open(ann_path, 'w') as f:
            json.dump(doc, f)
        paths[f'{split}_ann'] = ann_path
        paths[f'{split}_img_dir'] = img_dir
    return paths


# --------------------------------------------------------------------------------------------------
# ADE20K
# --------------------------------------------------------------------------------------------------

def ade_class_names(classes: Sequence[str] = DEFAULT_CLASSES) -> Tuple[str, ...]:
    """Class names of :func:`make_ade_like`'s labels 1..K, i.e. after ``reduce_zero_label``.

    The background texture is a class of its own (``'background'``, stored label 1); stored label 0
    marks clutter strokes and a thin band along every object outline (ADE20K's "other / unlabelled").
    """
    return ('background',) + tuple(classes)


def make_ade_like(out_dir: str,
                  num_train: int,
                  num_val: int,
                  image_size: Tuple[int, int] = (256, 256),
                  seed: int = 0,
                  classes: Sequence[str] = DEFAULT_CLASSES,
                  max_objects: int = 4) -> Dict[str, object]:
    """Write an ADE20K-layout semantic segmentation set of synthetic shapes.

    Layout (what mmseg's ``ADE20KDataset`` / ``BaseSegDataset`` with ``img_suffix='.jpg'``,
    ``seg_map_suffix='.png'`` expect)::

        out_dir/images/training/ADE_train_00000001.jpg      out_dir/annotations/training/ADE_train_00000001.png
        out_dir/images/validation/ADE_val_00000001.jpg      out_dir/annotations/validation/ADE_val_00000001.png

    Annotations are single-channel uint8 PNGs. As in ADE20K, stored value 0 means "other / unlabelled"
    (clutter strokes and a 1-pixel band along object outlines) and is ignored under
    ``reduce_zero_label=True``; value 1 is the background texture and values ``2..K`` are the shapes, so
    after ``reduce_zero_label`` the labels index :func:`ade_class_names`.

    Args:
        out_dir: Dataset root (the ``ADEChallengeData2016`` folder; created if missing).
        num_train: Number of training images.
        num_val: Number of validation images.
        image_size: ``(H, W)`` of every image.
        seed: Seed of all randomness: the same seed writes byte-identical files.
        classes: Shape names from :data:`SHAPE_NAMES`.
        max_objects: Each image holds 1..``max_objects`` objects.

    Returns:
        ``root``, the image and annotation folders of each split, and ``classes`` (the names of the
        reduced labels 0..K-1).
    """
    _check_counts(num_train, num_val)
    classes = tuple(classes)
    h, w = int(image_size[0]), int(image_size[1])
    kernel = np.ones((3, 3), np.uint8)
    paths: Dict[str, object] = dict(root=out_dir, classes=ade_class_names(classes))
    for split, folder, prefix, count in (('train', 'training', 'ADE_train', num_train),
                                         ('val', 'validation', 'ADE_val', num_val)):
        img_dir = os.path.join(out_dir, 'images', folder)
        ann_dir = os.path.join(out_dir, 'annotations', folder)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for index in range(count):
            scene = render_scene(_image_rng(seed, split, index), (h, w), classes, max_objects)
            seg = np.ones((h, w), np.uint8)
            seg[scene.clutter] = 0
            for label, mask in zip(scene.labels, scene.masks):
                m = mask.astype(np.uint8)
                seg[mask] = label + 2
                band = (cv2.dilate(m, kernel) > 0) & ~(cv2.erode(m, kernel) > 0)
                seg[band] = 0
            name = f'{prefix}_{index + 1:08d}'
            _write_jpg(os.path.join(img_dir, name + '.jpg'), scene.image)
            _write_png(os.path.join(ann_dir, name + '.png'), seg)
        paths[f'{split}_img_dir'] = img_dir
        paths[f'{split}_ann_dir'] = ann_dir
    return paths
