# Mask R-CNN + FPN with our Shuffle-T backbone on COCO 2017, 1x schedule (12 epochs, lr steps at 8 and 11).
#
# The Shuffle Transformer paper follows Swin's detection recipes (Mask R-CNN
# 1x / 3x); no official detection code or config is released, so this is the Swin-T recipe
# (configs/mask_rcnn_swin_t.py, mmdet's mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py) with the Shuffle-T backbone:
# AdamW lr 1e-4, weight decay 0.05 except on relative position bias tables and norm layers (BatchNorm here),
# drop path 0.2 (scheduled per stage, as the official code does), 8 GPUs x 2 images.
# BatchNorm: with 2 images per GPU the backbone's BatchNorm statistics are kept from ImageNet
# (norm_eval=True; their affine parameters still train), as mmdet does for BN backbones. Our choice, not
# the paper's (it does not say).
# Published anchors: none found for Shuffle-T Mask R-CNN 1x (see docs/backbones.md section 2).
#
# Train:  python tools/train.py configs/mask_rcnn_shuffle_t_fpn_1x_coco.py
# The ImageNet-1k Shuffle-T weights (official repository, Google Drive link in its README; official format)
# go in checkpoints/shuffle_vit_tiny_patch4_window7_224.pth.

_base_ = ['mask_rcnn_swin_t.py']  # the Swin-T Mask R-CNN 1x recipe; backbone and decay keys replaced

pretrained = 'checkpoints/shuffle_vit_tiny_patch4_window7_224.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='ShuffleTransformer',
        arch='tiny',
        window_size=7,
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_eval=True,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),)
optim_wrapper = dict(
    paramwise_cfg=dict(
        norm_decay_mult=0.0,  # every BatchNorm (blocks, patch merging, stem)
        custom_keys=dict(_delete_=True, relative_position_bias_table=dict(decay_mult=0.0))))
