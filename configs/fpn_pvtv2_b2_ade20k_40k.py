# Semantic FPN with our PVT v2-b2 backbone on ADE20K, 512x512 crops, 40k iterations.
#
# mmseg 1.x config on mmseg's own bases (Semantic FPN R-50 model, ADE20K data, default runtime, 40k
# schedule); this file holds only what differs. The recipe is the PVT papers' (whai362/PVT
# segmentation/configs/sem_fpn/PVT/fpn_pvt_*_ade20k_40k.py): mmseg's Semantic FPN (FPN neck to 256
# channels, FPNHead with 128 channels), AdamW lr 2e-4, weight decay 1e-4, poly decay (power 0.9) to 0 over
# 40k iterations, 8 GPUs x 4 images, random resize (ratio 0.5-2.0 of 2048x512) + 512x512 crop + flip +
# photometric distortion; drop path 0.1.
# Published anchor: 45.2 mIoU for PVT v2-b2 (PVT v2 paper, table of Semantic FPN results; not in a README).
# The official test pipeline resizes to a multiple of 32 (AlignResize); our backbone takes any size, so the
# test pipeline is mmseg's plain keep-ratio resize.
# The mmseg bases also bring their test-time-augmentation names (tta_model, tta_pipeline, img_ratios) and
# an unused top-level SGD `optimizer`, which a child config cannot remove (tests/test_config_inheritance.py).
#
# Train:  python tools/train.py configs/fpn_pvtv2_b2_ade20k_40k.py
# The ImageNet-1k weights (pvt_v2_b2.pth from whai362/PVT releases) go in checkpoints/.

_base_ = [
    'mmseg::_base_/models/fpn_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_40k.py',
]
custom_imports = dict(imports=['vit_backbones'], allow_failed_imports=False)

crop_size = (512, 512)
num_classes = 150
pretrained = 'checkpoints/pvt_v2_b2.pth'
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='PVTv2',
        arch='b2',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 320, 512]),
    decode_head=dict(num_classes=num_classes))

# ade20k.py's batch of 4 per GPU is the recipe's (8 GPUs: 32 images per step)
max_iters = 40000
optim_wrapper = dict(
    _delete_=True,  # the base's SGD wrapper also sets clip_grad=None
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0002, weight_decay=0.0001))
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False)]
auto_scale_lr = dict(enable=False, base_batch_size=32)

# Crash-safe checkpoints that also carry the generator states, so a killed run resumes bit-identically
# (vit_backbones.runtime.SafeCheckpointHook: mmengine's CheckpointHook arguments, atomic writes).
default_hooks = dict(checkpoint=dict(type='SafeCheckpointHook'))
