# UperNet with our Shuffle-T backbone on ADE20K, 512x512 crops, 160k iterations.
#
# The Shuffle Transformer paper follows Swin's segmentation recipe
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

_base_ = ['upernet_swin_t_ade20k.py']  # the Swin-T UperNet 160k recipe; backbone and decay keys replaced

pretrained = 'checkpoints/shuffle_vit_tiny_patch4_window7_224.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='ShuffleTransformer',
        arch='tiny',
        window_size=7,
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_eval=True,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),)
optim_wrapper = dict(
    paramwise_cfg=dict(
        norm_decay_mult=0.0,  # every BatchNorm (blocks, patch merging, stem)
        custom_keys=dict(_delete_=True, relative_position_bias_table=dict(decay_mult=0.0))))
