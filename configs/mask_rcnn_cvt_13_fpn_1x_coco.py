# Mask R-CNN + FPN with our CvT-13 backbone on COCO 2017, 1x schedule (12 epochs, lr steps at 8 and 11).
#
# CvT has no published detection recipe (the official repository is
# classification only, microsoft/CvT#28), so this is the Swin / PVT v2 Mask R-CNN 1x recipe: AdamW lr 1e-4,
# weight decay 0.05 except on norms, BatchNorms of the q/k/v projections and the class token; 8 GPUs x 2
# images. Drop path 0.1 on the last stage as CvT-13's ImageNet spec (the official per-stage schedule).
# The backbone returns strides 4/8/16 and a stride-32 level max-pooled from stride 16 (384 channels),
# each level after a LayerNorm.
#
# Train:  python tools/train.py configs/mask_rcnn_cvt_13_fpn_1x_coco.py
# The ImageNet-1k CvT-13 weights (CvT-13-224x224-IN-1k.pth, official format) go in checkpoints/.

_base_ = ['mask_rcnn_swin_t.py']  # the Swin-T Mask R-CNN 1x recipe; backbone, neck and decay keys replaced

pretrained = 'checkpoints/CvT-13-224x224-IN-1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='CvT',
        arch='13',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 192, 384, 384]))
optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys=dict(
        _delete_=True, cls_token=dict(decay_mult=0.0), norm=dict(decay_mult=0.0), **{'.bn.': dict(decay_mult=0.0)})))
