"""Test helpers: tiny synthetic datasets, tiny mmdet/mmseg configs, a recording hook, a tool runner.

This module imports with torch, mmengine, numpy and opencv only, so subprocesses can import it
(``custom_imports=dict(imports=['helpers'])`` with ``tests/`` on ``PYTHONPATH``) to register
:class:`RecordTrainingHook`.
"""
import json
import os
import os.path as osp
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TESTS_DIR = osp.join(REPO_ROOT, 'tests')
CLASSES = ('square', 'disk')


# --------------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------------


def _draw_sample(rng: np.random.Generator, size: int):
    """A noisy image with 1-2 filled squares/disks; returns (image BGR, [(x, y, w, h, label)], seg map)."""
    img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
    seg = np.zeros((size, size), np.uint8)
    objects = []
    for _ in range(int(rng.integers(1, 3))):
        label = int(rng.integers(0, 2))
        w = h = int(rng.integers(size // 4, size // 2))
        x = int(rng.integers(0, size - w))
        y = int(rng.integers(0, size - h))
        color = tuple(int(c) for c in rng.integers(120, 255, 3))
        if label == 0:
            cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), color, -1)
            cv2.rectangle(seg, (x, y), (x + w - 1, y + h - 1), 1, -1)
        else:
            cv2.circle(img, (x + w // 2, y + h // 2), w // 2, color, -1)
            cv2.circle(seg, (x + w // 2, y + h // 2), w // 2, 2, -1)
        objects.append((x, y, w, h, label))
    return img, objects, seg


def make_tiny_coco(root: str, num_train: int = 4, num_val: int = 2, size: int = 64, seed: int = 0) -> str:
    """Write a COCO-format detection set: ``root/{train,val}/*.jpg`` and ``root/{train,val}.json``.

    Returns:
        ``root``.
    """
    rng = np.random.default_rng(seed)
    for split, count in (('train', num_train), ('val', num_val)):
        os.makedirs(osp.join(root, split), exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            img, objects, _ = _draw_sample(rng, size)
            name = f'{split}_{i:03d}.png'  # png: lossless, so every process reads identical pixels
            cv2.imwrite(osp.join(root, split, name), img)
            images.append(dict(id=i + 1, file_name=name, width=size, height=size))
            for x, y, w, h, label in objects:
                annotations.append(
                    dict(id=len(annotations) + 1, image_id=i + 1, category_id=label + 1, bbox=[x, y, w, h],
                         area=float(w * h), iscrowd=0, segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]]))
        categories = [dict(id=k + 1, name=name) for k, name in enumerate(CLASSES)]
        with open(osp.join(root, f'{split}.json'), 'w') as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    return root


def make_tiny_seg(root: str, num_train: int = 4, num_val: int = 2, size: int = 64, seed: int = 0) -> str:
    """Write an ADE-like segmentation set: ``root/images/{training,validation}/*.png`` and
    ``root/annotations/{training,validation}/*.png`` (labels 0 background, 1 square, 2 disk).

    Returns:
        ``root``.
    """
    rng = np.random.default_rng(seed)
    for split, count in (('training', num_train), ('validation', num_val)):
        os.makedirs(osp.join(root, 'images', split), exist_ok=True)
        os.makedirs(osp.join(root, 'annotations', split), exist_ok=True)
        for i in range(count):
            img, _, seg = _draw_sample(rng, size)
            cv2.imwrite(osp.join(root, 'images', split, f'{i:03d}.png'), img)
            cv2.imwrite(osp.join(root, 'annotations', split, f'{i:03d}.png'), seg)
    return root


# --------------------------------------------------------------------------------------------------
# Tiny configs
# --------------------------------------------------------------------------------------------------


def _common_runtime(max_iters: int, ckpt_interval: int, record_dir: Optional[str]) -> dict:
    cfg = dict(
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=10**6),
        optim_wrapper=dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05)),
        param_scheduler=[dict(type='LinearLR', start_factor=0.3, by_epoch=False, begin=0, end=max_iters)],
        default_hooks=dict(
            timer=dict(type='IterTimerHook'),
            logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False),
            param_scheduler=dict(type='ParamSchedulerHook'),
            checkpoint=dict(type='CheckpointHook', interval=ckpt_interval, by_epoch=False, max_keep_ckpts=-1),
            sampler_seed=dict(type='DistSamplerSeedHook'),
        ),
        log_processor=dict(type='LogProcessor', window_size=1, by_epoch=False),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
                     dist_cfg=dict(backend='nccl')),
        randomness=dict(seed=0, deterministic=True),
        log_level='INFO',
        load_from=None,
        resume=False,
    )
    if record_dir is not None:
        cfg['custom_imports'] = dict(imports=['helpers'], allow_failed_imports=False)
        cfg['custom_hooks'] = [dict(type='RecordTrainingHook', out_dir=record_dir)]
    return cfg


def _loader(dataset: dict, batch_size: int, train: bool) -> dict:
    sampler = dict(type='InfiniteSampler', shuffle=True) if train else dict(type='DefaultSampler', shuffle=False)
    return dict(batch_size=batch_size, num_workers=0, persistent_workers=False, sampler=sampler, dataset=dataset)


def tiny_det_config(data_root: str, max_iters: int = 4, ckpt_interval: int = 2, batch_size: int = 2,
                    record_dir: Optional[str] = None, backbone: Optional[dict] = None,
                    backbone_channels: Sequence[int] = (32, 64)) -> Config:
    """A two-level RetinaNet with an 8-channel-wide ResNet-18 on :func:`make_tiny_coco` data.

    Deterministic: no random augmentation, no dropout, fixed seed, ``deterministic=True``.
    """
    backbone = backbone or dict(type='ResNet', depth=18, base_channels=8, num_stages=4, out_indices=(2, 3),
                                frozen_stages=-1, norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False,
                                style='pytorch', init_cfg=None)
    model = dict(
        type='RetinaNet',
        data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                               bgr_to_rgb=True, pad_size_divisor=32),
        backbone=backbone,
        neck=dict(type='FPN', in_channels=list(backbone_channels), out_channels=16, start_level=0,
                  num_outs=len(backbone_channels)),
        bbox_head=dict(
            type='RetinaHead', num_classes=len(CLASSES), in_channels=16, stacked_convs=1, feat_channels=16,
            anchor_generator=dict(type='AnchorGenerator', octave_base_scale=2, scales_per_octave=1,
                                  ratios=[0.5, 1.0, 2.0], strides=[16, 32][:len(backbone_channels)]),
            bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        train_cfg=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.4, neg_iou_thr=0.3, min_pos_iou=0,
                                     ignore_iof_thr=-1),
                       sampler=dict(type='PseudoSampler'), allowed_border=-1, pos_weight=-1, debug=False),
        test_cfg=dict(nms_pre=100, min_bbox_size=0, score_thr=0.0, nms=dict(type='nms', iou_threshold=0.5),
                      max_per_img=10))
    train_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True),
        dict(type='Resize', scale=(64, 64), keep_ratio=True),
        dict(type='PackDetInputs'),
    ]
    test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(64, 64), keep_ratio=True),
        dict(type='LoadAnnotations', with_bbox=True),
        dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
    ]
    metainfo = dict(classes=CLASSES)
    train_set = dict(type='CocoDataset', data_root=data_root, ann_file='train.json', data_prefix=dict(img='train/'),
                     metainfo=metainfo, filter_cfg=dict(filter_empty_gt=True, min_size=0), pipeline=train_pipeline)
    val_set = dict(type='CocoDataset', data_root=data_root, ann_file='val.json', data_prefix=dict(img='val/'),
                   metainfo=metainfo, test_mode=True, pipeline=test_pipeline)
    evaluator = dict(type='CocoMetric', ann_file=osp.join(data_root, 'val.json'), metric='bbox', format_only=False)
    cfg = dict(
        default_scope='mmdet',
        model=model,
        train_dataloader=_loader(train_set, batch_size, train=True),
        test_dataloader=_loader(val_set, 1, train=False),
        test_evaluator=evaluator,
        test_cfg=dict(type='TestLoop'),
        visualizer=dict(type='DetLocalVisualizer', vis_backends=[dict(type='LocalVisBackend')], name='visualizer'),
        **_common_runtime(max_iters, ckpt_interval, record_dir))
    cfg['default_hooks']['visualization'] = dict(type='DetVisualizationHook')
    return Config(cfg)


def tiny_seg_config(data_root: str, max_iters: int = 2, ckpt_interval: int = 2, batch_size: int = 2,
                    record_dir: Optional[str] = None, backbone: Optional[dict] = None,
                    backbone_channels: int = 64) -> Config:
    """An FCN head on one backbone level (default: an 8-channel-wide ResNetV1c-18, stride 32) on
    :func:`make_tiny_seg` data (mmseg)."""
    backbone = backbone or dict(type='ResNetV1c', depth=18, stem_channels=8, base_channels=8, num_stages=4,
                                out_indices=(3, ), norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False,
                                contract_dilation=True, style='pytorch')
    model = dict(
        type='EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                               bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=(64, 64)),
        backbone=backbone,
        decode_head=dict(type='FCNHead', in_channels=backbone_channels, in_index=0, channels=16, num_convs=1,
                         concat_input=False, dropout_ratio=0.0, num_classes=3, norm_cfg=dict(type='BN', requires_grad=True),
                         align_corners=False,
                         loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
        train_cfg=dict(),
        test_cfg=dict(mode='whole'))
    train_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', reduce_zero_label=False),
        dict(type='PackSegInputs'),
    ]
    test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', reduce_zero_label=False),
        dict(type='PackSegInputs'),
    ]
    metainfo = dict(classes=('background', ) + CLASSES, palette=[[0, 0, 0], [255, 0, 0], [0, 0, 255]])
    common = dict(type='BaseSegDataset', data_root=data_root, img_suffix='.png', seg_map_suffix='.png',
                  metainfo=metainfo, reduce_zero_label=False)
    train_set = dict(data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
                     pipeline=train_pipeline, **common)
    val_set = dict(data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
                   pipeline=test_pipeline, **common)
    evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
    cfg = dict(
        default_scope='mmseg',
        model=model,
        train_dataloader=_loader(train_set, batch_size, train=True),
        test_dataloader=_loader(val_set, 1, train=False),
        test_evaluator=evaluator,
        test_cfg=dict(type='TestLoop'),
        visualizer=dict(type='SegLocalVisualizer', vis_backends=[dict(type='LocalVisBackend')], name='visualizer'),
        **_common_runtime(max_iters, ckpt_interval, record_dir))
    cfg['default_hooks']['visualization'] = dict(type='SegVisualizationHook')
    return Config(cfg)


def write_config(cfg: Config, path: str) -> str:
    """Dump ``cfg`` as a Python config file at ``path`` and return the path."""
    cfg.dump(path)
    return path


# --------------------------------------------------------------------------------------------------
# A hook that records what happened in each process
# --------------------------------------------------------------------------------------------------


def _unwrap(model):
    return model.module if hasattr(model, 'module') else model


@HOOKS.register_module(force=True)
class RecordTrainingHook(Hook):
    """Writes, per rank, what the tests need to check a run from outside the process.

    * ``rank{r}_init.pth`` / ``rank{r}_final.pth``: ``dict(params=..., buffers=...)`` of the model at
      ``before_train`` (after ``load_from`` / resume) and ``after_train``.
    * ``rank{r}.json``: the image ids (or paths) each iteration trained on, the iterations run,
      and the dtype of the first conv/linear layer's output during training (autocast check).

    The environment variable ``VB_TEST_STOP_AT_ITER=k`` makes the process die right after
    iteration k (after the checkpoint hook has saved), to simulate a crash.
    """

    priority = 'LOWEST'  # after CheckpointHook (VERY_LOW), so a checkpoint is written before a crash

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.record: Dict[str, List] = dict(samples=[], iters=[], forward_dtypes=[])
        self._handle = None

    def _path(self, runner, name: str) -> str:
        os.makedirs(self.out_dir, exist_ok=True)
        return osp.join(self.out_dir, f'rank{runner.rank}{name}')

    @staticmethod
    def _snapshot(model) -> dict:
        return dict(params={k: v.detach().cpu().clone() for k, v in model.named_parameters()},
                    buffers={k: v.detach().cpu().clone() for k, v in model.named_buffers()})

    def before_train(self, runner) -> None:
        model = _unwrap(runner.model)
        torch.save(self._snapshot(model), self._path(runner, '_init.pth'))
        first = next(m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))

        def _dtype_hook(module, inputs, output):
            if module.training:
                self.record['forward_dtypes'].append(str(output.dtype))

        self._handle = first.register_forward_hook(_dtype_hook)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        ids = []
        for sample in (data_batch or {}).get('data_samples', []):
            ids.append(sample.metainfo.get('img_id', sample.metainfo.get('img_path')))
        self.record['samples'].append(ids)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self.record['iters'].append(runner.iter + 1)
        self._dump(runner)
        stop = os.environ.get('VB_TEST_STOP_AT_ITER')
        if stop is not None and runner.iter + 1 == int(stop):
            raise SystemExit(f'VB_TEST_STOP_AT_ITER={stop}: simulated crash')

    def after_train(self, runner) -> None:
        if self._handle is not None:
            self._handle.remove()
        torch.save(self._snapshot(_unwrap(runner.model)), self._path(runner, '_final.pth'))
        self._dump(runner)

    def _dump(self, runner) -> None:
        with open(self._path(runner, '.json'), 'w') as f:
            json.dump(self.record, f)


# --------------------------------------------------------------------------------------------------
# Running the tools
# --------------------------------------------------------------------------------------------------


def tool_env(extra: Optional[dict] = None) -> dict:
    """Environment for a tool subprocess: tests/ importable (for ``helpers``), one thread per process."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([TESTS_DIR, REPO_ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
    env.setdefault('OMP_NUM_THREADS', '1')
    env.pop('VB_TEST_STOP_AT_ITER', None)
    env.update(extra or {})
    return env


def run_tool(args: Sequence[str], env_extra: Optional[dict] = None, timeout: float = 300,
             check: bool = True, prefix: Optional[Sequence[str]] = None) -> subprocess.CompletedProcess:
    """Run ``python [prefix] args`` from the repository root; on ``check``, fail with the output."""
    cmd = [sys.executable] + list(prefix or []) + list(args)
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=tool_env(env_extra), capture_output=True, text=True,
                          timeout=timeout)
    proc.elapsed = time.time() - start
    if check and proc.returncode != 0:
        raise AssertionError(f'command failed ({proc.returncode}): {" ".join(cmd)}\n'
                             f'--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}')
    return proc


def load_ckpt(path: str) -> dict:
    """Load a runner checkpoint the safe way (weights_only=True plus the mmengine allow-list)."""
    from vit_backbones.runtime import allow_mmengine_checkpoints
    allow_mmengine_checkpoints()
    return torch.load(path, map_location='cpu', weights_only=True)


# --------------------------------------------------------------------------------------------------
# Resolved configs as plain data
# --------------------------------------------------------------------------------------------------


def canonical_config(value):
    """A resolved config (``Config.to_dict()``) as JSON-ready data that keeps tuples apart from lists.

    Dicts get string keys, a tuple becomes ``{'__tuple__': [...]}``, lists stay lists, and ``None``,
    bools, ints, floats and strings are kept as they are; ``json.dump(..., indent=1, sort_keys=True)``
    of the result is the form of tests/data/resolved_configs/.

    Raises:
        TypeError: For any other value (a config that holds an object, a function or a class).
    """
    if isinstance(value, dict):
        return {str(k): canonical_config(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return {'__tuple__': [canonical_config(v) for v in value]}
    if isinstance(value, list):
        return [canonical_config(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f'a config value of type {type(value).__name__} has no canonical form: {value!r}')


# --------------------------------------------------------------------------------------------------
# Model weights for tests
# --------------------------------------------------------------------------------------------------


def randomize(module, seed: int = 0, scale: float = 0.1):
    """Random values in every parameter (norm weights, biases, tokens, tables: ``scale`` * N(0, 1)) and
    BatchNorm statistic (means N(0, 0.01), variances in [0.5, 1.5)), so that no checkpoint mapping can hide
    behind a default initialisation. Returns ``module``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        for name, b in module.named_buffers():
            if name.endswith('running_mean'):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith('running_var'):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return module
