# UperNet with our Shuffle-T backbone on ADE20K, 512x512 crops, 160k iterations.
#
# Self-contained mmseg 1.x config. The Shuffle Transformer paper follows Swin's segmentation recipe
# (UperNet, 160k iterations); no official segmentation code is released ("in progress" in its README), so
# this is the Swin-T recipe (configs/upernet_swin_t_ade20k.py, mmseg's
# swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py) with the Shuffle-T backbone:
# AdamW lr 6e-5, weight decay 0.01 except on relative position bias tables and norm layers, linear warmup
# over 1500 iterations then poly decay (power 1), drop path 0.3, auxiliary FCN head on stage 3,
# 8 GPUs x 2 images. 512 = 16 x 32 is not a multiple of 32 x 7, so stages 3 and 4 (32 x 32, 16 x 16 maps)
# run on windows padded at the bottom/right (masked; see vit_backbones/models/shuffle.py).
# BatchNorm: with 2 images per GPU the backbone's BatchNorm statistics are kept from ImageNet
# (norm_eval=True; affine parameters still train). Our choice, not the paper's (it does not say).
# Published anchor: 47.6 mIoU for Shuffle-T UperNet (papers-with-code; not from a released log).
#
# Train:  python tools/train.py configs/upernet_shuffle_t_ade20k.py
# The ImageNet-1k Shuffle-T weights (official repository, Google Drive link in its README; official format)
# go in checkpoints/shuffle_vit_tiny_patch4_window7_224.pth.

custom_imports = dict(imports=['vit_backbones'], allow_failed_imports=False)
default_scope = 'mmseg'

data_root = 'data/ade/ADEChallengeData2016'
dataset_type = 'ADE20KDataset'
crop_size = (512, 512)
num_classes = 150
pretrained = 'checkpoints/shuffle_vit_tiny_patch4_window7_224.pth'
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
        type='ShuffleTransformer',
        arch='tiny',
        window_size=7,
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_eval=True,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(
        type='UPerHead',
        in_channels=[96, 192, 384, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=384,
        in_index=2,  # stage 3 (stride 16)
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
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
    batch_size=2,  # per GPU; the recipe uses 8 GPUs (16 images per step)
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
max_iters = 160000
warmup_iters = 1500
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=16000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,  # every BatchNorm (blocks, patch merging, stem)
        custom_keys={'relative_position_bias_table': dict(decay_mult=0.0)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=warmup_iters, end=max_iters, by_epoch=False),
]
auto_scale_lr = dict(enable=False, base_batch_size=16)

# -------------------------------------------------------------------------------------------- runtime
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=16000),
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
