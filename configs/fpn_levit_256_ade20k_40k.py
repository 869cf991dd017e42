# Semantic FPN with our LeViT-256 backbone on ADE20K, 512x512 crops, 40k iterations.
#
# Self-contained mmseg 1.x config. No LeViT segmentation recipe has been published; this is the PVT papers'
# Semantic FPN recipe (whai362/PVT segmentation/configs/sem_fpn): FPN neck to 256 channels, FPNHead with
# 128 channels, AdamW lr 2e-4, weight decay 1e-4, poly decay (power 0.9) to 0 over 40k iterations,
# 8 GPUs x 4 images, random resize (ratio 0.5-2.0 of 2048x512) + 512x512 crop + flip + photometric distortion.
# No weight decay on the attention bias tables (as the official LeViT training) nor on norms.
# Difference from the usual 4-level Semantic FPN: LeViT's levels are strides 4, 8 (stem), 16, 32, 64
# (stages), and all five go through the FPN and into the FPNHead (feature_strides 4..64), so every parameter
# of backbone, neck and head takes part in the loss (no unused parameters under DDP).
# BatchNorm in the backbone trains (4 images x thousands of tokens per GPU; norm_eval=False).
# Published anchor: none.
#
# Train:  python tools/train.py configs/fpn_levit_256_ade20k_40k.py
# The ImageNet-1k weights (LeViT-256-13b5763e.pth from facebookresearch/LeViT releases) go in checkpoints/.

custom_imports = dict(imports=['vit_backbones'], allow_failed_imports=False)
default_scope = 'mmseg'

data_root = 'data/ade/ADEChallengeData2016'
dataset_type = 'ADE20KDataset'
crop_size = (512, 512)
num_classes = 150
pretrained = 'checkpoints/LeViT-256-13b5763e.pth'
norm_cfg = dict(type='SyncBN', requires_grad=True)

# ------------------------------------------------------------------------------------------------ model
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='LeViT',
        arch='256',
        img_size=224,
        drop_path_rate=0.0,
        out_indices=(0, 1, 2, 3, 4),
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(type='FPN', in_channels=[64, 128, 256, 384, 512], out_channels=256, num_outs=5),
    decode_head=dict(
        type='FPNHead',
        in_channels=[256, 256, 256, 256, 256],
        in_index=[0, 1, 2, 3, 4],
        feature_strides=[4, 8, 16, 32, 64],
        channels=128,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

# ------------------------------------------------------------------------------------------------- data
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4,  # per GPU; the recipe uses 8 GPUs (32 images per step)
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

# ------------------------------------------------------------------------------------------- schedule
max_iters = 40000
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=4000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0002, weight_decay=0.0001),
    paramwise_cfg=dict(norm_decay_mult=0.0, custom_keys={'attention_biases': dict(decay_mult=0.0)}))
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False)]
auto_scale_lr = dict(enable=False, base_batch_size=32)

# -------------------------------------------------------------------------------------------- runtime
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=4000),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
