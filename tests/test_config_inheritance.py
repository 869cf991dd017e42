"""The configs in configs/ inherit mmdet's and mmseg's own recipes through ``mmdet::`` / ``mmseg::`` bases
and still resolve, key by key, to what they resolved to when they were self-contained
(tests/data/resolved_configs/, dumped at commit db10a37 with :func:`helpers.canonical_config`); and
mmengine reads such bases on this install (it finds the libraries through pkg_resources)."""
import copy
import glob
import json
import os
from typing import Dict, Optional

import pytest
from mmengine.config import Config

from helpers import REPO_ROOT, canonical_config  # tests/ is on sys.path under pytest

CONFIG_DIR = os.path.join(REPO_ROOT, 'configs')
REFERENCE_DIR = os.path.join(REPO_ROOT, 'tests', 'data', 'resolved_configs')
CONFIGS = sorted(os.path.relpath(p, CONFIG_DIR).replace(os.sep, '/') for p in
                 glob.glob(os.path.join(CONFIG_DIR, '*.py')) + glob.glob(os.path.join(CONFIG_DIR, 'demo', '*.py')))

# Deliberate changes of a resolved config since the reference dump, applied to the reference before the
# comparison: config name (its path below configs/, e.g. 'mask_rcnn_swin_t.py' or
# 'demo/mask_rcnn_swin_t_synthetic.py') -> {dotted key path: new value}; a list item is named by its
# index ('param_scheduler.0.end'). A path that is not in the reference is added.
INTENDED_CHANGES: Dict[str, Dict[str, object]] = {}
# Since the dump: our crash-safe checkpoint hook in every config (issue #11) ...
for _name in CONFIGS:
    INTENDED_CHANGES.setdefault(_name, {})['default_hooks.checkpoint.type'] = 'SafeCheckpointHook'
# ... and, in the epoch-based mmdet recipes, train loader workers that restart every epoch (a resumed
# run restarts them, so only then is the resume bit-identical).
for _name in CONFIGS:
    if not _name.startswith('demo/') and (_name.startswith('mask_rcnn') or _name.startswith('retinanet')):
        INTENDED_CHANGES[_name]['train_dataloader.persistent_workers'] = False

# Top-level names a library base defines besides the recipe. mmengine cannot delete an inherited
# top-level name, and nothing in the runner or in tools/ reads these, so they are left out of the
# comparison when the reference does not have them.
LIBRARY_EXTRAS = {
    'mmseg': {
        'tta_model': "default_runtime.py: the wrapper of mmseg's own tools/test.py --tta",
        'tta_pipeline': 'datasets/ade20k.py: the pipeline of that test-time augmentation',
        'img_ratios': 'datasets/ade20k.py: its scales',
        'optimizer': "schedules/schedule_*.py: the SGD dict its optim_wrapper is written with (the runner "
                     "reads optim_wrapper only, which our configs replace)",
        'backbone_norm_cfg': "models/upernet_swin.py: the norm of mmseg's own Swin, which our configs replace",
    },
}


def reference_path(name: str) -> str:
    """tests/data/resolved_configs/<name>.json; a demo config's is demo__<name>.json."""
    return os.path.join(REFERENCE_DIR, name[:-len('.py')].replace('/', '__') + '.json')


def resolve(name: str) -> dict:
    return canonical_config(Config.fromfile(os.path.join(CONFIG_DIR, name), import_custom_modules=False).to_dict())


def without_scope_stamps(value, scope: str):
    """``value`` without the ``_scope_`` keys equal to ``scope``.

    mmengine stamps ``_scope_=<library>`` on the outermost dicts with a ``type`` of every base read
    through ``<library>::`` (the model, each hook, the loops, samplers, datasets, evaluators, ...), and a
    child config cannot remove a key. With the config's own ``default_scope`` as value the stamp builds
    the same objects; any other ``_scope_`` is kept, so it shows up as a difference.
    """
    if isinstance(value, dict):
        return {k: without_scope_stamps(v, scope) for k, v in value.items() if not (k == '_scope_' and v == scope)}
    if isinstance(value, list):
        return [without_scope_stamps(v, scope) for v in value]
    return value


def apply_changes(reference: dict, changes: Dict[str, object]) -> dict:
    """A copy of ``reference`` with each ``dotted.path: value`` of ``changes`` set (``value`` canonicalised)."""
    out = copy.deepcopy(reference)
    for dotted, value in changes.items():
        *parents, last = dotted.split('.')
        node = out
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = canonical_config(value)
        else:
            node[last] = canonical_config(value)
    return out


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 200 else text[:200] + '...'


def first_difference(expected, actual, path: str = '') -> Optional[str]:
    """Where ``actual`` first differs from ``expected`` (keys in sorted order), as ``'dotted.path: ...'``;
    ``None`` when they are equal. Types count: ``0`` is not ``0.0`` and ``True`` is not ``1``."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in sorted(set(expected) | set(actual)):
            sub = f'{path}.{key}' if path else key
            if key not in actual:
                return f'{sub}: missing; the reference has {_short(expected[key])}'
            if key not in expected:
                return f'{sub}: not in the reference; resolves to {_short(actual[key])}'
            found = first_difference(expected[key], actual[key], sub)
            if found:
                return found
        return None
    if isinstance(expected, list) and isinstance(actual, list):
        for i, (e, a) in enumerate(zip(expected, actual)):
            found = first_difference(e, a, f'{path}.{i}')
            if found:
                return found
        if len(expected) != len(actual):
            return f'{path}: {len(actual)} items; the reference has {len(expected)}'
        return None
    if type(expected) is not type(actual) or expected != actual:
        return f'{path}: resolves to {_short(actual)}; the reference has {_short(expected)}'
    return None


def test_every_config_has_a_reference():
    references = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REFERENCE_DIR, '*.json')))
    assert references == sorted(os.path.basename(reference_path(n)) for n in CONFIGS), (
        'each config in configs/ and configs/demo/ needs its resolution in tests/data/resolved_configs/ '
        '(json.dump(canonical_config(Config.fromfile(path, import_custom_modules=False).to_dict()), f, '
        'indent=1, sort_keys=True)), and each file there a config')
    unknown = set(INTENDED_CHANGES) - set(CONFIGS)
    assert not unknown, f'INTENDED_CHANGES names configs that do not exist: {sorted(unknown)}'


@pytest.mark.parametrize('name', CONFIGS)
def test_resolved_config_is_unchanged(name):
    with open(reference_path(name)) as f:
        expected = apply_changes(json.load(f), INTENDED_CHANGES.get(name, {}))
    resolved = resolve(name)
    scope = resolved.get('default_scope')
    assert scope in ('mmdet', 'mmseg')
    actual = without_scope_stamps(resolved, scope)
    for key in LIBRARY_EXTRAS.get(scope, {}):
        if key not in expected:
            actual.pop(key, None)
    difference = first_difference(expected, actual)
    reference = os.path.relpath(reference_path(name), REPO_ROOT)
    assert difference is None, f'{name} resolves differently from {reference} (+ INTENDED_CHANGES): {difference}'


def test_comparison_helpers():
    ref = {'a': {'b': [1, {'c': 0.0}], 't': {'__tuple__': [0, 1]}}, 'z': None}
    assert first_difference(ref, copy.deepcopy(ref)) is None
    assert first_difference(ref, {'a': {'b': [1, {'c': 0}], 't': {'__tuple__': [0, 1]}}, 'z': None}) \
        == 'a.b.1.c: resolves to 0; the reference has 0.0'
    as_list = {'a': {'b': [1, {'c': 0.0}], 't': [0, 1]}, 'z': None}
    assert first_difference(ref, as_list).startswith('a.t: resolves to [0, 1]')
    assert first_difference(ref, {'a': ref['a']}) == 'z: missing; the reference has null'
    assert first_difference({'a': [1]}, {'a': [1, 2]}) == 'a: 2 items; the reference has 1'
    changed = apply_changes(ref, {'a.b.1.c': 0.5, 'a.t': (2, 3), 'new.key': 'x'})
    assert changed['a'] == {'b': [1, {'c': 0.5}], 't': {'__tuple__': [2, 3]}} and changed['new'] == {'key': 'x'}
    assert ref['a']['b'][1]['c'] == 0.0  # the reference itself is not changed
    stamped = {'_scope_': 'mmdet', 'model': {'_scope_': 'mmdet', 'x': [{'_scope_': 'mmseg'}]}}
    assert without_scope_stamps(stamped, 'mmdet') == {'model': {'x': [{'_scope_': 'mmseg'}]}}


def _write(tmp_path, text: str) -> str:
    path = tmp_path / 'child.py'
    path.write_text(text)
    return str(path)


def test_mmdet_base_is_read(tmp_path):
    cfg = Config.fromfile(_write(tmp_path, "_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py']\n"
                                           "model = dict(roi_head=dict(bbox_head=dict(num_classes=3)))\n"))
    assert cfg.default_scope == 'mmdet'
    assert cfg.model.type == 'MaskRCNN' and cfg.model._scope_ == 'mmdet'  # the stamp the comparison ignores
    assert (cfg.model.backbone.type, cfg.model.backbone.depth) == ('ResNet', 50)
    assert cfg.model.neck.in_channels == [256, 512, 1024, 2048]
    assert cfg.model.roi_head.bbox_head.num_classes == 3 and cfg.model.roi_head.mask_head.num_classes == 80
    assert (cfg.optim_wrapper.optimizer.type, cfg.optim_wrapper.optimizer.lr) == ('SGD', 0.02)
    assert cfg.train_cfg.max_epochs == 12 and cfg.val_evaluator.metric == ['bbox', 'segm']


def test_mmseg_base_is_read(tmp_path):
    cfg = Config.fromfile(_write(
        tmp_path, "_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']\n"
                  "train_dataloader = dict(batch_size=1)\n"))
    assert cfg.default_scope == 'mmseg'
    assert cfg.model.type == 'EncoderDecoder' and cfg.model._scope_ == 'mmseg'
    assert cfg.model.backbone.type == 'SwinTransformer' and cfg.model.backbone.drop_path_rate == 0.3
    assert cfg.model.decode_head.type == 'UPerHead' and cfg.model.decode_head.num_classes == 150
    assert cfg.model.data_preprocessor.size == (512, 512)
    assert (cfg.optim_wrapper.optimizer.type, cfg.optim_wrapper.optimizer.lr) == ('AdamW', 6e-5)
    assert [s.type for s in cfg.param_scheduler] == ['LinearLR', 'PolyLR'] and cfg.param_scheduler[1].end == 160000
    assert cfg.train_dataloader.batch_size == 1 and cfg.train_dataloader.dataset.type == 'ADE20KDataset'
    assert set(LIBRARY_EXTRAS['mmseg']) <= set(cfg.keys())  # the names the comparison leaves out, from the bases
