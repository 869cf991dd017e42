# Mask R-CNN + FPN with our ViT-B/16 backbone in ViTDet's form, on COCO 2017, 1x schedule.
#
# Backbone as in ViTDet (detectron2 projects/ViTDet, configs/common/models/mask_rcnn_vitdet.py): plain
# ViT-B, window attention (14x14) in every block except 2, 5, 8, 11 (global), a relative position bias in
# the windowed blocks, drop path 0.1, no final norm, the class token dropped after its position embedding,
# and the simple feature pyramid built from the last block (x4 / x2 deconvolutions, identity, max-pool:
# 192, 384, 768, 768 channels at strides 4, 8, 16, 32). Differences from ViTDet: mmdet's FPN turns the
# pyramid into 256-channel maps (ViTDet projects each level with 1x1 + 3x3 convs + LN and adds a
# max-pooled p6 -- set pyramid_channels=256 and drop the FPN for that), the bias is a Swin-style table
# (ViTDet uses decomposed h/w biases), and the schedule is mmdet's 1x with AdamW (ViTDet: LSJ 1024,
# 100 epochs, layer-wise lr decay 0.7). Published anchor: ViTDet Mask R-CNN ViT-B (MAE IN-1k
# pre-training) 51.6 box AP / 45.9 mask AP -- not comparable with this schedule and ImageNet weights.
#
# Built on mmdet's own bases (Mask R-CNN R-50 FPN model, COCO instance data, 1x schedule, default runtime);
# this file holds the backbone, the FPN inputs and the AdamW optimizer (lr 1e-4, weight decay 0.1 except
# on position embedding, class token, bias tables and norms, 1000 warmup iterations).
#
# Train:  python tools/train.py configs/mask_rcnn_vit_b_fpn.py
# Weights: an ImageNet ViT-B/16 checkpoint in timm, HF transformers or mmseg layout in checkpoints/.

_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['vit_backbones'], allow_failed_imports=False)

pretrained = 'checkpoints/vit_base_patch16_224.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='ViT',
        arch='base',
        img_size=224,
        drop_path_rate=0.1,
        pyramid='simple',
        final_norm=False,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
        rel_pos=True,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[192, 384, 768, 768]))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.1),
    paramwise_cfg=dict(
        custom_keys={
            'pos_embed': dict(decay_mult=0.0),
            'cls_token': dict(decay_mult=0.0),
            'relative_position_bias_table': dict(decay_mult=0.0),
            'norm': dict(decay_mult=0.0),
        }))

# Crash-safe checkpoints that also carry the generator states, so a killed run resumes bit-identically
# (vit_backbones.runtime.SafeCheckpointHook: mmengine's CheckpointHook arguments, atomic writes).
default_hooks = dict(checkpoint=dict(type='SafeCheckpointHook'))
# persistent_workers=False: a resumed run starts its loader workers afresh, so only workers that restart
# every epoch in the uninterrupted run too give a bit-identical resume (one worker start per epoch).
train_dataloader = dict(persistent_workers=False)
