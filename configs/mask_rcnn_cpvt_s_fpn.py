# Mask R-CNN + FPN with our CPVT-S backbone in ViTDet's form, on COCO 2017, 1x schedule.
#
# Same detector as configs/mask_rcnn_vit_b_fpn.py / mask_rcnn_deit_s_fpn.py (ViTDet windows 14 with global
# blocks 2, 5, 8, 11, relative position bias, no final norm, simple feature pyramid from the last block:
# 96, 192, 384, 384 channels at strides 4..32, mmdet FPN), with CPVT-S: DeiT-S without the absolute position
# embedding, a PEG (depthwise 3x3 conv, residual) after block 0 on the grid tokens. Windowed models have no
# class token (as ViTDet): a class-token checkpoint loads with cls_token dropped. The PEG needs no
# resampling for the 1333x800 inputs. No weight decay on the PEG (as Twins' no_weight_decay).
# Weights: the plain CPVT weights were never released (Meituan-AutoML/CPVT#5); train your own CPVT-S on
# ImageNet in the official layout (DeiT keys + pos_block.0.proj.0.*) and put it at the path below.
# No published plain-CPVT detection number was found (Twins-PCPVT is the authors' pyramid form).
#
# Train:  python tools/train.py configs/mask_rcnn_cpvt_s_fpn.py

_base_ = ['./mask_rcnn_vit_b_fpn.py']

pretrained = 'checkpoints/cpvt_small.pth'

model = dict(
    backbone=dict(type='CPVT', arch='small', init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 384]))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'pos_block': dict(decay_mult=0.0)}))
