# Semantic FPN with our LeViT-256 backbone on ADE20K, 512x512 crops, 40k iterations.
#
# No LeViT segmentation recipe has been published; this is the PVT papers'
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

_base_ = ['fpn_pvtv2_b2_ade20k_40k.py']  # the PVT v2 Semantic FPN 40k recipe; backbone, five levels, decay

pretrained = 'checkpoints/LeViT-256-13b5763e.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='LeViT',
        arch='256',
        img_size=224,
        drop_path_rate=0.0,
        out_indices=(0, 1, 2, 3, 4),
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 256, 384, 512], num_outs=5),
    decode_head=dict(in_channels=[256, 256, 256, 256, 256], in_index=[0, 1, 2, 3, 4],
                     feature_strides=[4, 8, 16, 32, 64]))
optim_wrapper = dict(
    paramwise_cfg=dict(norm_decay_mult=0.0, custom_keys={'attention_biases': dict(decay_mult=0.0)}))
