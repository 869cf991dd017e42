# Mask R-CNN + FPN with our DeepViT-S backbone in ViTDet's form, on COCO 2017, 1x schedule.
#
# Same detector as configs/mask_rcnn_vit_b_fpn.py (ViTDet recipe: windowed attention, 14x14, with a
# relative position bias, global attention in blocks 3, 7, 11, 15 of 16, drop path 0.1, no final norm,
# the class token dropped after its position embedding, simple feature pyramid from the last block: 99,
# 198, 396, 396 channels at strides 4..32, mmdet FPN, AdamW 1x). DeepViT-S as the official deepvit_S:
# 396 wide, 12 heads, MLP ratio 3, convolutional patch embedding, re-attention (1x1 conv over the heads +
# BatchNorm over the heads, times the score scale) in the last 5 blocks, scale_adjustment 0.5. Inside a
# window the re-attention mixes that window's attention maps. The official models normalise inputs with
# mean = std = 0.5 (x 255), so does this config.
# Weights: the official DeepViT-S checkpoint (README "DeepViT-16, FC + BN, 82.3", Google Drive; save it as
# checkpoints/deepvit_s_224.pth -- the file name is ours, the layout is the official one).
# Published reference point: none found for DeepViT in Mask R-CNN.
#
# Train:  python tools/train.py configs/mask_rcnn_deepvit_s_fpn.py

_base_ = ['./mask_rcnn_vit_b_fpn.py']

pretrained = 'checkpoints/deepvit_s_224.pth'

model = dict(
    data_preprocessor=dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5]),
    backbone=dict(type='DeepViT', arch='s', img_size=224, drop_path_rate=0.1, global_attn_indexes=(3, 7, 11, 15),
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[99, 198, 396, 396]))
