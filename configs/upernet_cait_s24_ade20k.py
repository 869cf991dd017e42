# UperNet with our CaiT-S24 backbone on ADE20K, 512x512 crops, 160k iterations.
#
# The recipe of configs/upernet_vit_b16_ade20k.py (mmseg's ViT/DeiT UperNet recipe: AdamW lr 6e-5,
# weight decay 0.01 except position embedding / norms, 1500 warm-up iterations then poly decay, auxiliary
# FCN head on the last level, 8 GPUs x 2 images) with CaiT-S24's self-attention stage: 384 wide, taps at
# the last block of each quarter (5, 11, 17, 23) through our deconvolution pyramid, drop path 0.1
# (constant over the blocks, as CaiT). The 224 checkpoint's 14x14 position embedding is resampled to
# 32x32 on load (CaiT's has no class slot). The class-attention layers are classification-only and not built.
# Weights: the official CaiT-S24 224 checkpoint (https://dl.fbaipublicfiles.com/deit/S24_224.pth).
# Published reference point: none found for CaiT on ADE20K.
#
# Train:  python tools/train.py configs/upernet_cait_s24_ade20k.py

_base_ = ['./upernet_vit_b16_ade20k.py']

pretrained = 'checkpoints/S24_224.pth'

model = dict(
    backbone=dict(type='CaiT', arch='s24', drop_path_rate=0.1, block_indices=(5, 11, 17, 23),
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[384, 384, 384, 384]),
    auxiliary_head=dict(in_channels=384))
