# UperNet with our ViT-B/16 backbone on ADE20K, 512x512 crops, 160k iterations.
#
# The recipe of mmseg's ViT configs (configs/vit/vit_vit-b16_mln_upernet_8xb2-*_ade20k-512x512.py):
# position embedding for a 512 input (the 224 checkpoint's 14x14 grid is resampled to 32x32 on load,
# bicubic), outputs of blocks 2, 5, 8, 11, no final norm, drop path 0, AdamW lr 6e-5, weight decay 0.01
# except on the position embedding, class token and norms, 1500 warm-up iterations then poly decay,
# auxiliary FCN head on the last level, 8 GPUs x 2 images. Where mmseg's MultiLevelNeck interpolates the
# four stride-16 maps (bilinear) to strides 4..32, our backbone returns them already rescaled with
# BEiT's Feature2Pyramid recipe (deconvolutions x4 / x2, identity, max-pool), so there is no neck.
# Published anchors (mmseg metafile, single-scale mIoU): ViT-B16 + MLN 80k 47.71, + LN + MLN 160k 47.73.
#
# Built on mmseg's own bases (UperNet R-50 model, ADE20K data, default runtime, 160k schedule); this file
# holds the backbone, the head inputs and the AdamW schedule. Not on mmseg's upernet_vit-b16_ln_mln.py:
# a child config cannot remove its MultiLevelNeck.
# The mmseg bases also bring their test-time-augmentation names (tta_model, tta_pipeline, img_ratios) and
# an unused top-level SGD `optimizer`, which a child config cannot remove (tests/test_config_inheritance.py).
#
# Train:  python tools/train.py configs/upernet_vit_b16_ade20k.py
# Weights: an ImageNet ViT-B/16 checkpoint (timm, HF transformers or mmseg layout) in checkpoints/.

_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['vit_backbones'], allow_failed_imports=False)

crop_size = (512, 512)
num_classes = 150
pretrained = 'checkpoints/vit_base_patch16_224.pth'
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='ViT',
        arch='base',
        img_size=512,
        drop_path_rate=0.0,
        pyramid='deconv',
        block_indices=(2, 5, 8, 11),
        final_norm=False,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[768, 768, 768, 768], num_classes=num_classes),
    auxiliary_head=dict(
        in_channels=768,
        in_index=3,  # the stride-32 level, as mmseg's ViT configs
        num_classes=num_classes))

train_dataloader = dict(batch_size=2)  # per GPU; the recipe uses 8 GPUs (16 images per step)

max_iters = 160000
warmup_iters = 1500
optim_wrapper = dict(
    _delete_=True,  # the base's SGD wrapper also sets clip_grad=None
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            'pos_embed': dict(decay_mult=0.0),
            'cls_token': dict(decay_mult=0.0),
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
