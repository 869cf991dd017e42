# UperNet with our Swin-T backbone on ADE20K, 512x512 crops, 160k iterations.
#
# mmseg 1.x config on mmseg's own bases, as mmseg's Swin configs are (UperNet Swin model, ADE20K data,
# default runtime, 160k schedule); this file holds only what differs. The recipe is the Swin paper's /
# mmseg's (configs/swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py): AdamW lr 6e-5,
# weight decay 0.01 except on position tables and norms, linear warmup over 1500 iterations then poly
# decay (power 1), drop path 0.3, auxiliary FCN head on stage 3, 8 GPUs x 2 images.
# Published anchors (single-scale mIoU): 44.51 (official repo), 44.41 (mmseg).
# The mmseg bases also bring their test-time-augmentation names (tta_model, tta_pipeline, img_ratios), an
# unused top-level SGD `optimizer` and the norm of mmseg's Swin (backbone_norm_cfg), which a child config
# cannot remove (see tests/test_config_inheritance.py).
#
# Train:  python tools/train.py configs/upernet_swin_t_ade20k.py
# The ImageNet-1k Swin-T weights (swin_tiny_patch4_window7_224.pth, official format) go in checkpoints/.

_base_ = [
    'mmseg::_base_/models/upernet_swin.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['vit_backbones'], allow_failed_imports=False)

crop_size = (512, 512)
num_classes = 150
pretrained = 'checkpoints/swin_tiny_patch4_window7_224.pth'
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        _delete_=True,
        type='Swin',
        arch='tiny',
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(num_classes=num_classes),
    auxiliary_head=dict(num_classes=num_classes))  # on stage 3 (in_index 2, stride 16), as the base has it

train_dataloader = dict(batch_size=2)  # per GPU; the recipe uses 8 GPUs (16 images per step)

max_iters = 160000
warmup_iters = 1500
optim_wrapper = dict(
    _delete_=True,  # the base's SGD wrapper also sets clip_grad=None
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.0),
            'relative_position_bias_table': dict(decay_mult=0.0),
            'norm': dict(decay_mult=0.0),
        }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=warmup_iters, end=max_iters, by_epoch=False),
]
auto_scale_lr = dict(enable=False, base_batch_size=16)

# Crash-safe checkpoints that also carry the generator states, so a killed run resumes bit-identically
# (vit_backbones.runtime.SafeCheckpointHook: mmengine's CheckpointHook arguments, atomic writes).
default_hooks = dict(checkpoint=dict(type='SafeCheckpointHook'))
