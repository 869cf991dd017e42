# Mask R-CNN + FPN with our DeiT-S/16 backbone in ViTDet's form, on COCO 2017, 1x schedule.
#
# Same detector as configs/mask_rcnn_vit_b_fpn.py (ViTDet windows 14 with global blocks 2, 5, 8, 11,
# relative position bias, simple feature pyramid from the last block: 96, 192, 384, 384 channels at
# strides 4..32, mmdet FPN), with the ImageNet DeiT-S weights (deit_small_patch16_224-cd65a155.pth, the
# official layout). For a distilled checkpoint use arch='small-distilled' (two prefix tokens).
# Published reference point: ViT-Adapter reports Mask R-CNN 3x+MS with DeiT-S at 48.2 box / 42.8 mask
# AP *with* its adapter; no plain-DeiT-S 1x number was found.
#
# Train:  python tools/train.py configs/mask_rcnn_deit_s_fpn.py

_base_ = ['./mask_rcnn_vit_b_fpn.py']

pretrained = 'checkpoints/deit_small_patch16_224-cd65a155.pth'

model = dict(
    backbone=dict(type='DeiT', arch='small', init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 384]))
