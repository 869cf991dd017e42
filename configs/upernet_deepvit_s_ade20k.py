# UperNet with our DeepViT-S backbone on ADE20K, 512x512 crops, 160k iterations.
#
# The recipe of configs/upernet_vit_b16_ade20k.py (mmseg's ViT/DeiT UperNet recipe: AdamW lr 6e-5,
# weight decay 0.01 except position embedding / class token / norms -- here also the re-attention
# BatchNorms, whose names contain 'norm' --, 1500 warm-up iterations then poly decay, auxiliary FCN head
# on the last level, 8 GPUs x 2 images) with DeepViT-S (official deepvit_S: 396 wide, conv patch
# embedding, re-attention in the last 5 of 16 blocks, scale_adjustment 0.5): taps at blocks 3, 7, 11, 15
# through our deconvolution pyramid, drop path 0.1. Inputs normalised with mean = std = 0.5 (x 255), as
# the official models were trained. The 224 checkpoint's 14x14 position embedding is resampled to 32x32.
# Weights: the official DeepViT-S checkpoint (README "DeepViT-16, FC + BN", Google Drive; save it as
# checkpoints/deepvit_s_224.pth -- the file name is ours).
# Published reference point: none found for DeepViT on ADE20K.
#
# Train:  python tools/train.py configs/upernet_deepvit_s_ade20k.py

_base_ = ['./upernet_vit_b16_ade20k.py']

pretrained = 'checkpoints/deepvit_s_224.pth'

model = dict(
    data_preprocessor=dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5]),
    backbone=dict(type='DeepViT', arch='s', drop_path_rate=0.1, block_indices=(3, 7, 11, 15),
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[396, 396, 396, 396]),
    auxiliary_head=dict(in_channels=396))
