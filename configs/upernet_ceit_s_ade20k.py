# UperNet with our CeiT-S backbone on ADE20K, 512x512 crops, 160k iterations.
#
# The DeiT-S recipe of configs/upernet_deit_s16_ade20k.py (mmseg's vit_deit-s16 UperNet: blocks 2, 5, 8, 11
# through our deconvolution pyramid, drop path 0.1, AdamW lr 6e-5, poly decay, position embedding for a
# 512 input resampled from the checkpoint's 14x14 grid) with CeiT-S: image-to-tokens stem and LeFF blocks
# (BatchNorm inside; the LCA classifier block is not built). Weights: the official CeiT-S ImageNet
# checkpoint (coeusguo/ceit release) renamed to the path below. No published CeiT ADE20K number was found.
#
# Train:  python tools/train.py configs/upernet_ceit_s_ade20k.py

_base_ = ['./upernet_vit_b16_ade20k.py']

pretrained = 'checkpoints/ceit_small_patch16_224.pth'

model = dict(
    backbone=dict(type='CeiT', arch='small', drop_path_rate=0.1,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[384, 384, 384, 384]),
    auxiliary_head=dict(in_channels=384))
