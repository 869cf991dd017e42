# Mask R-CNN + FPN with our Swin-T backbone on COCO 2017, 1x schedule (12 epochs, lr steps at 8 and 11).
#
# mmdet 3.x config on mmdet's own bases: its Mask R-CNN R-50 FPN model, COCO instance data (8 GPUs x 2
# images, 1333x800, flips), 1x schedule and default runtime; this file holds only what differs. The
# recipe is the Swin paper's / mmdet's (configs/swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py): AdamW lr 1e-4,
# weight decay 0.05 except on relative position bias tables, absolute position embeddings and norms,
# 1000 warmup iterations; drop path 0.2. lr 1e-4 is for 16 images per step; `tools/train.py
# --auto-scale-lr` rescales it for other totals. Published anchors: 43.7 box AP / 39.8 mask AP (official
# repo), 42.7 / 39.3 (mmdet).
#
# Train:  python tools/train.py configs/mask_rcnn_swin_t.py
# The ImageNet-1k Swin-T weights (swin_tiny_patch4_window7_224.pth, official format) go in checkpoints/.

_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['vit_backbones'], allow_failed_imports=False)

pretrained = 'checkpoints/swin_tiny_patch4_window7_224.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='Swin',
        arch='tiny',
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.0),
            'relative_position_bias_table': dict(decay_mult=0.0),
            'norm': dict(decay_mult=0.0),
        }))

# Crash-safe checkpoints that also carry the generator states, so a killed run resumes bit-identically
# (vit_backbones.runtime.SafeCheckpointHook: mmengine's CheckpointHook arguments, atomic writes).
default_hooks = dict(checkpoint=dict(type='SafeCheckpointHook'))
# persistent_workers=False: a resumed run starts its loader workers afresh, so only workers that restart
# every epoch in the uninterrupted run too give a bit-identical resume (one worker start per epoch).
train_dataloader = dict(persistent_workers=False)
