# RetinaNet + FPN with our LeViT-256 backbone on COCO 2017, 1x schedule (12 epochs, lr steps at 8 and 11).
#
# No LeViT detection recipe has been published (the official repo is
# classification-only; LeViT#25 discusses detection without results), so this is the standard RetinaNet
# 1x recipe used for transformer backbones (PVT v2 / mmdet): AdamW lr 1e-4, weight decay 1e-4, 500-iteration
# linear warmup, 8 GPUs x 2 images, single-scale 1333x800 training with flips. No weight decay on the
# attention bias tables (as the official LeViT training) nor on norms.
# Backbone levels: strides 4 (stem), 8 (stem), 16, 32, 64 (stages); the FPN starts at stride 8 and adds one
# extra level (stride 128) from the stride-64 map, giving RetinaNet's P3-P7. Every backbone parameter is
# used (level 0 is a stem activation without parameters of its own).
# BatchNorm: every linear layer of LeViT has one; with 2 images per GPU the statistics stay the ImageNet ones
# (norm_eval=True, as mmdet does for BN backbones); the BN affine parameters still train.
# Full attention at stride 16 on 800x1333 inputs (~4200 tokens) is memory-hungry; with_cp=True trades
# compute for memory. Published anchor: none.
#
# Train:  python tools/train.py configs/retinanet_levit_256_fpn_1x_coco.py
# The ImageNet-1k weights (LeViT-256-13b5763e.pth from facebookresearch/LeViT releases, official format;
# timm and HF transformers layouts load too) go in checkpoints/.

_base_ = ['retinanet_pvtv2_b2_fpn_1x_coco.py']  # the PVT v2 RetinaNet 1x recipe; backbone, neck inputs, decay

pretrained = 'checkpoints/LeViT-256-13b5763e.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='LeViT',
        arch='256',
        img_size=224,
        drop_path_rate=0.0,
        out_indices=(0, 1, 2, 3, 4),
        frozen_stages=-1,
        norm_eval=True,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 256, 384, 512], start_level=1))  # strides 8-64 -> P3-P7
optim_wrapper = dict(
    paramwise_cfg=dict(norm_decay_mult=0.0, custom_keys={'attention_biases': dict(decay_mult=0.0)}))
