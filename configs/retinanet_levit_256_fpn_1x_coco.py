# RetinaNet + FPN with our LeViT-256 backbone on COCO 2017, 1x schedule (12 epochs, lr steps at 8 and 11).
#
# Self-contained mmdet 3.x config. No LeViT detection recipe has been published (the official repo is
# classification-only; LeViT#25 discusses detection without results), so this is the standard RetinaNet
# 1x recipe used for transformer backbones (PVT v2 / mmdet): AdamW lr 1e-4, weight decay 1e-4, 500-iteration
# linear warmup, 8 GPUs x 2 images, single-scale 1333x800 training with flips. No weight decay on the
# attention bias tables (as the official LeViT training) nor on norms.
# Backbone levels: strides 4 (stem), 8 (stem), 16, 32, 64 (stages); the FPN starts at stride 8 and adds one
# extra level (stride 128) from the stride-64 map, giving RetinaNet's P3-P7. Every backbone parameter is
# used (level 0 is a stem activation without parameters of its own).
# BatchNorm: every linear layer of LeViT has one; with 2 images per GPU the statistics stay the ImageNet ones
# (norm_eval=True, as mmdet does for BN backbones); the BN affine parameters still train.
# Full attention at stride 16 on 800x1333 inputs (~4200 tokens) is memory-hungry; with_cp=True trades
# compute for memory. Published anchor: none.
#
# Train:  python tools/train.py configs/retinanet_levit_256_fpn_1x_coco.py
# The ImageNet-1k weights (LeViT-256-13b5763e.pth from facebookresearch/LeViT releases, official format;
# timm and HF transformers layouts load too) go in checkpoints/.

custom_imports = dict(imports=['vit_backbones'], allow_failed_imports=False)
default_scope = 'mmdet'

data_root = 'data/coco/'
dataset_type = 'CocoDataset'
backend_args = None
pretrained = 'checkpoints/LeViT-256-13b5763e.pth'

# ------------------------------------------------------------------------------------------------ model
model = dict(
    type='RetinaNet',
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=32),
    backbone=dict(
        type='LeViT',
        arch='256',
        img_size=224,
        drop_path_rate=0.0,
        out_indices=(0, 1, 2, 3, 4),
        frozen_stages=-1,
        norm_eval=True,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(
        type='FPN',
        in_channels=[64, 128, 256, 384, 512],
        out_channels=256,
        start_level=1,
        add_extra_convs='on_input',
        num_outs=5),
    bbox_head=dict(
        type='RetinaHead',
        num_classes=80,
        in_channels=256,
        stacked_convs=4,
        feat_channels=256,
        anchor_generator=dict(
            type='AnchorGenerator',
            octave_base_scale=4,
            scales_per_octave=3,
            ratios=[0.5, 1.0, 2.0],
            strides=[8, 16, 32, 64, 128]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder', target_means=[0.0, 0.0, 0.0, 0.0], target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    train_cfg=dict(
        assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0, ignore_iof_thr=-1),
        sampler=dict(type='PseudoSampler'),
        allowed_border=-1,
        pos_weight=-1,
        debug=False),
    test_cfg=dict(
        nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))

# ------------------------------------------------------------------------------------------------- data
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2,  # per GPU; the recipe uses 8 GPUs (16 images per step)
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        pipeline=train_pipeline,
        backend_args=backend_args))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = val_dataloader
val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val2017.json',
    metric='bbox',
    format_only=False,
    backend_args=backend_args)
test_evaluator = val_evaluator

# ------------------------------------------------------------------------------------------- schedule
max_epochs = 12
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, weight_decay=0.0001),
    paramwise_cfg=dict(norm_decay_mult=0.0, custom_keys={'attention_biases': dict(decay_mult=0.0)}))
# lr 1e-4 is for 16 images per step; `tools/train.py --auto-scale-lr` rescales it for other totals.
auto_scale_lr = dict(enable=False, base_batch_size=16)

# -------------------------------------------------------------------------------------------- runtime
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='DetVisualizationHook'))
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=True)
log_level = 'INFO'
load_from = None
resume = False
