"""Tests of the synthetic dataset generators (vit_backbones.data.synthetic) and their CLI."""
import hashlib
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from vit_backbones.data import (DEFAULT_CLASSES, SHAPE_NAMES, ade_class_names, make_ade_like,
                                make_coco_instances, render_scene)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digest_tree(root):
    """sha256 of every file under ``root``, keyed by relative path."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope='module')
def coco_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('coco'))
    paths = make_coco_instances(root, num_train=12, num_val=6, image_size=(96, 128), seed=3)
    return root, paths


@pytest.fixture(scope='module')
def ade_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('ade'))
    paths = make_ade_like(root, num_train=8, num_val=4, image_size=(96, 112), seed=3)
    return root, paths


@pytest.mark.parametrize('maker', [make_coco_instances, make_ade_like])
def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path, maker):
    a = _digest_tree(maker(str(tmp_path / 'a'), 4, 2, image_size=(64, 80), seed=7)['root'])
    b = _digest_tree(maker(str(tmp_path / 'b'), 4, 2, image_size=(64, 80), seed=7)['root'])
    c = _digest_tree(maker(str(tmp_path / 'c'), 4, 2, image_size=(64, 80), seed=8)['root'])
    assert len(a) == (4 + 2) * (1 if maker is make_coco_instances else 2) + \
        (2 if maker is make_coco_instances else 0)
    assert a == b
    images = [k for k in a if k.endswith('.jpg')]
    assert all(a[k] != c[k] for k in images)


def test_val_images_do_not_depend_on_number_of_train_images(tmp_path):
    a = make_coco_instances(str(tmp_path / 'a'), 2, 3, image_size=(64, 64), seed=1)
    b = make_coco_instances(str(tmp_path / 'b'), 9, 3, image_size=(64, 64), seed=1)
    assert _digest_tree(a['val_img_dir']) == _digest_tree(b['val_img_dir'])


def test_coco_layout_and_pycocotools(coco_set):
    from pycocotools.coco import COCO
    root, paths = coco_set
    for rel in ('train2017', 'val2017', 'annotations/instances_train2017.json',
                'annotations/instances_val2017.json'):
        assert os.path.exists(os.path.join(root, rel)), rel
    train = COCO(paths['train_ann'])
    val = COCO(paths['val_ann'])
    assert len(train.getImgIds()) == 12 and len(val.getImgIds()) == 6
    assert not set(train.getImgIds()) & set(val.getImgIds())
    cats = train.loadCats(train.getCatIds())
    assert [c['name'] for c in cats] == list(DEFAULT_CLASSES)
    assert [c['id'] for c in cats] == [1, 2, 3]
    for img in train.loadImgs(train.getImgIds()):
        im = cv2.imread(os.path.join(paths['train_img_dir'], img['file_name']))
        assert im.shape == (96, 128, 3) == (img['height'], img['width'], 3)
        anns = train.loadAnns(train.getAnnIds(imgIds=img['id']))
        assert 1 <= len(anns) <= 4
    used = {a['category_id'] for a in train.loadAnns(train.getAnnIds())}
    assert used == {1, 2, 3}, 'a dozen images should hold every class'


def test_coco_polygons_rasterise_inside_their_boxes(coco_set):
    from pycocotools.coco import COCO
    _, paths = coco_set
    coco = COCO(paths['train_ann'])
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 12
    for ann in anns:
        assert ann['iscrowd'] == 0
        x, y, w, h = ann['bbox']
        assert w >= 8 and h >= 8, 'objects are not degenerate'
        mask = coco.annToMask(ann)
        ys, xs = np.nonzero(mask)
        assert xs.min() >= np.floor(x) and xs.max() <= np.ceil(x + w)
        assert ys.min() >= np.floor(y) and ys.max() <= np.ceil(y + h)
        # The box is tight: the mask touches (within a pixel) all four sides.
        assert xs.min() <= x + 1 and xs.max() >= x + w - 2
        assert ys.min() <= y + 1 and ys.max() >= y + h - 2
        # area is the polygon's area; the rasterised mask agrees to within the outline's pixels.
        assert abs(mask.sum() - ann['area']) <= 0.15 * ann['area'] + 4
        assert ann['area'] >= 0.2 * w * h


def test_coco_objects_do_not_overlap(coco_set):
    from pycocotools.coco import COCO
    _, paths = coco_set
    coco = COCO(paths['train_ann'])
    for img_id in coco.getImgIds():
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id))]
        assert np.sum(masks, axis=0).max() == 1


def test_render_scene_is_deterministic_and_objects_stand_out():
    scene = render_scene(np.random.default_rng(5), (96, 96))
    again = render_scene(np.random.default_rng(5), (96, 96))
    np.testing.assert_array_equal(scene.image, again.image)
    assert len(scene.masks) == len(scene.labels) == len(scene.polygons) >= 1
    # Over many scenes, the mean colour inside a shape clearly differs from a ring around it: shapes
    # are visible (the task is learnable) even though colours are random.
    diffs = []
    for seed in range(20):
        s = render_scene(np.random.default_rng(seed), (96, 96))
        for mask in s.masks:
            assert mask.sum() > 20
            ring = (cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0) & ~mask
            diffs.append(np.abs(s.image[mask].astype(float).mean(0) - s.image[ring].astype(float).mean(0)).max())
    assert len(diffs) >= 30
    assert np.median(diffs) > 25


def test_ade_layout_and_label_range(ade_set):
    root, paths = ade_set
    assert paths['classes'] == ade_class_names() == ('background',) + DEFAULT_CLASSES
    seen = set()
    for folder, prefix, count in (('training', 'ADE_train', 8), ('validation', 'ADE_val', 4)):
        imgs = sorted(os.listdir(os.path.join(root, 'images', folder)))
        anns = sorted(os.listdir(os.path.join(root, 'annotations', folder)))
        assert len(imgs) == len(anns) == count
        assert imgs[0] == f'{prefix}_00000001.jpg' and anns[0] == f'{prefix}_00000001.png'
        for im_name, ann_name in zip(imgs, anns):
            assert im_name[:-4] == ann_name[:-4]
            im = cv2.imread(os.path.join(root, 'images', folder, im_name))
            seg = cv2.imread(os.path.join(root, 'annotations', folder, ann_name), cv2.IMREAD_UNCHANGED)
            assert im.shape == (96, 112, 3)
            assert seg.shape == (96, 112) and seg.dtype == np.uint8
            values = set(np.unique(seg).tolist())
            assert values <= set(range(len(DEFAULT_CLASSES) + 2))  # 0 = other, 1 = background, 2.. shapes
            assert {0, 1} <= values and values & {2, 3, 4}
            assert (seg == 1).mean() > 0.3  # background dominates; unlabelled pixels are a thin minority
            assert 0 < (seg == 0).mean() < 0.2
            seen |= values
    assert seen == {0, 1, 2, 3, 4}


def test_ade_labels_match_coco_polygons(tmp_path):
    # The two formats draw the same scenes (same seed and split): each COCO polygon's class appears
    # inside it in the ADE map, as value class_index + 2.
    from pycocotools.coco import COCO
    coco_paths = make_coco_instances(str(tmp_path / 'c'), 3, 0, image_size=(80, 80), seed=11)
    make_ade_like(str(tmp_path / 'a'), 3, 0, image_size=(80, 80), seed=11)
    coco = COCO(coco_paths['train_ann'])
    for k, img_id in enumerate(sorted(coco.getImgIds())):
        seg = cv2.imread(str(tmp_path / 'a' / 'annotations' / 'training' / f'ADE_train_{k + 1:08d}.png'),
                         cv2.IMREAD_UNCHANGED)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            inside = seg[coco.annToMask(ann) > 0]
            values, counts = np.unique(inside, return_counts=True)
            assert values[np.argmax(counts)] == ann['category_id'] + 1


def test_custom_classes_and_bad_arguments(tmp_path):
    paths = make_coco_instances(str(tmp_path / 'x'), 6, 1, image_size=(64, 64), classes=('star', 'hexagon'))
    with open(paths['train_ann']) as f:
        doc = json.load(f)
    assert [c['name'] for c in doc['categories']] == ['star', 'hexagon']
    assert {a['category_id'] for a in doc['annotations']} <= {1, 2}
    assert set(SHAPE_NAMES) >= {'ellipse', 'rectangle', 'triangle'}
    with pytest.raises(ValueError, match='unknown shape'):
        make_coco_instances(str(tmp_path / 'y'), 1, 1, classes=('circle', 'blob'))
    with pytest.raises(ValueError, match='too small'):
        make_ade_like(str(tmp_path / 'z'), 1, 1, image_size=(16, 64))
    with pytest.raises(ValueError, match='image counts'):
        make_coco_instances(str(tmp_path / 'w'), 0, 0)


@pytest.mark.parametrize('kind', ['coco', 'ade'])
def test_cli_writes_the_requested_layout(tmp_path, kind):
    out = tmp_path / kind
    res = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, 'tools', 'make_synthetic_data.py'), '--out', str(out),
         '--kind', kind, '--num-train', '3', '--num-val', '2', '--size', '64', '96'],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert res.returncode == 0, res.stderr
    assert 'wrote' in res.stdout
    if kind == 'coco':
        with open(out / 'annotations' / 'instances_val2017.json') as f:
            doc = json.load(f)
        assert len(doc['images']) == 2 and doc['images'][0]['height'] == 64 and doc['images'][0]['width'] == 96
        assert len(os.listdir(out / 'train2017')) == 3
    else:
        assert len(os.listdir(out / 'images' / 'training')) == 3
        assert len(os.listdir(out / 'annotations' / 'validation')) == 2
        seg = cv2.imread(str(out / 'annotations' / 'validation' / 'ADE_val_00000001.png'), cv2.IMREAD_UNCHANGED)
        assert seg.shape == (64, 96)
