# UperNet with our DeiT-S/16 backbone on ADE20K, 512x512 crops, 160k iterations.
#
# mmseg's DeiT-S recipe (configs/vit/vit_deit-s16_upernet_8xb2-160k_ade20k-512x512.py, which inherits the
# ViT-B one): embed 384 / 6 heads, drop path 0.1, the non-distilled deit_small_patch16_224-cd65a155.pth
# weights; everything else as configs/upernet_vit_b16_ade20k.py (blocks 2, 5, 8, 11 through our
# deconvolution pyramid instead of mmseg's MultiLevelNeck / no neck).
# Published anchors (mmseg metafile): DeiT-S16 UperNet 160k 42.87, DeiT-S16 + MLN 43.82.
#
# Train:  python tools/train.py configs/upernet_deit_s16_ade20k.py

_base_ = ['./upernet_vit_b16_ade20k.py']

pretrained = 'checkpoints/deit_small_patch16_224-cd65a155.pth'

model = dict(
    backbone=dict(type='DeiT', arch='small', drop_path_rate=0.1,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[384, 384, 384, 384]),
    auxiliary_head=dict(in_channels=384))
