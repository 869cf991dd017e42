# UperNet with our CvT-13 backbone on ADE20K, 512x512 crops, 160k iterations.
#
# CvT has no published segmentation recipe (microsoft/CvT#28 is open),
# so this is the Swin UperNet recipe (mmseg configs/swin/...upernet_8xb2-160k_ade20k-512x512.py): AdamW
# lr 6e-5, weight decay 0.01 except on norms, BatchNorms of the q/k/v projections and the class token,
# linear warmup over 1500 iterations then poly decay (power 1), auxiliary FCN head on the stride-16 level,
# 8 GPUs x 2 images. Drop path 0.1 on the last stage as CvT-13's ImageNet spec. Levels: strides 4/8/16
# and a stride-32 level max-pooled from stride 16 (64, 192, 384, 384 channels), each after a LayerNorm.
#
# Train:  python tools/train.py configs/upernet_cvt_13_ade20k.py
# The ImageNet-1k CvT-13 weights (CvT-13-224x224-IN-1k.pth, official format) go in checkpoints/.

_base_ = ['upernet_swin_t_ade20k.py']  # the Swin-T UperNet 160k recipe; backbone, head channels, decay keys replaced

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
    decode_head=dict(in_channels=[64, 192, 384, 384]))
optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys=dict(
        _delete_=True, cls_token=dict(decay_mult=0.0), norm=dict(decay_mult=0.0), **{'.bn.': dict(decay_mult=0.0)})))
