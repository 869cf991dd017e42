# Mask R-CNN + FPN with our CaiT-S24 backbone in ViTDet's form, on COCO 2017, 1x schedule.
#
# Same detector as configs/mask_rcnn_vit_b_fpn.py (ViTDet recipe: windowed attention, 14x14, with a
# relative position bias, global attention in the last block of each quarter -- blocks 5, 11, 17, 23 of
# 24 --, drop path 0.1, no final norm, simple feature pyramid from the last block: 96, 192, 384, 384
# channels at strides 4..32, mmdet FPN, AdamW 1x). The backbone is CaiT's self-attention stage (talking
# heads, LayerScale); its class-attention layers are classification-only and not built (the checkpoint's
# class token, class-attention layers and head are dropped with a reason when loading). Stochastic depth
# is constant over the blocks, as CaiT trains. The talking-heads mixing is applied inside each window, on
# the logits plus the relative position bias.
# Weights: the official CaiT-S24 224 checkpoint (https://dl.fbaipublicfiles.com/deit/S24_224.pth, the
# facebookresearch/deit layout; timm's cait_s24_224 layout works too).
# Published reference point: none found for CaiT in Mask R-CNN.
#
# Train:  python tools/train.py configs/mask_rcnn_cait_s24_fpn.py

_base_ = ['./mask_rcnn_vit_b_fpn.py']

pretrained = 'checkpoints/S24_224.pth'

model = dict(
    backbone=dict(type='CaiT', arch='s24', img_size=224, drop_path_rate=0.1, global_attn_indexes=(5, 11, 17, 23),
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 384]))
