# UperNet with our CPVT-S backbone on ADE20K, 512x512 crops, 160k iterations.
#
# The DeiT-S recipe of configs/upernet_deit_s16_ade20k.py (mmseg's vit_deit-s16 UperNet: blocks 2, 5, 8, 11
# through our deconvolution pyramid, drop path 0.1, AdamW lr 6e-5, poly decay) with CPVT-S: no absolute
# position embedding (nothing to resample for 512x512), a PEG after block 0; the PEG gets no weight decay.
# Weights: the plain CPVT weights were never released (Meituan-AutoML/CPVT#5); see
# configs/mask_rcnn_cpvt_s_fpn.py. Published anchor for the authors' pyramid form only: Twins-PCPVT-S
# UperNet 46.2 mIoU (Meituan-AutoML/Twins README), not comparable with this plain model.
#
# Train:  python tools/train.py configs/upernet_cpvt_s_ade20k.py

_base_ = ['./upernet_vit_b16_ade20k.py']

pretrained = 'checkpoints/cpvt_small.pth'

model = dict(
    backbone=dict(type='CPVT', arch='small', drop_path_rate=0.1,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[384, 384, 384, 384]),
    auxiliary_head=dict(in_channels=384))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'pos_block': dict(decay_mult=0.0)}))
