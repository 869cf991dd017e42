# Mask R-CNN + FPN with our CeiT-S backbone in ViTDet's form, on COCO 2017, 1x schedule.
#
# Same detector as configs/mask_rcnn_vit_b_fpn.py / mask_rcnn_deit_s_fpn.py (ViTDet windows 14 with global
# blocks 2, 5, 8, 11, relative position bias, simple feature pyramid from the last block: 96, 192, 384, 384
# channels at strides 4..32, mmdet FPN), with CeiT-S: image-to-tokens stem (conv 7x7/2 + BN + max-pool, 4x4
# patches: stride 16) and locally-enhanced feed-forward (LeFF, BatchNorm inside) in every block. The LCA
# classifier block is not built; windowed models have no class token (as ViTDet), so the checkpoint's
# cls_token is dropped on load; the 14x14 position embedding is resampled (bicubic) to each input's grid.
# BatchNorm statistics train with the detector (batch 2 per GPU: set norm_eval=True to freeze them).
# Weights: the official CeiT-S ImageNet checkpoint (coeusguo/ceit release) renamed to the path below.
# No published CeiT detection number was found.
#
# Train:  python tools/train.py configs/mask_rcnn_ceit_s_fpn.py

_base_ = ['./mask_rcnn_vit_b_fpn.py']

pretrained = 'checkpoints/ceit_small_patch16_224.pth'

model = dict(
    backbone=dict(type='CeiT', arch='small', init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 384]))
