# Semantic FPN with our PVT-Small (v1) backbone on ADE20K, 512x512 crops, 40k iterations.
#
# The recipe of whai362/PVT segmentation/configs/sem_fpn/PVT/fpn_pvt_s_ade20k_40k.py is the one of
# fpn_pvtv2_b2_ade20k_40k.py (AdamW lr 2e-4, weight decay 1e-4, poly 0.9, 40k iterations, 8 GPUs x 4
# images); only the backbone differs. Raw stage maps, no class token (the official segmentation code).
# Published anchors (mIoU): 41.9 (official segmentation README, code) / 39.8 (PVT paper).
#
# Train:  python tools/train.py configs/fpn_pvt_s_ade20k_40k.py
# The ImageNet-1k weights (pvt_small.pth from whai362/PVT releases) go in checkpoints/.

_base_ = ['fpn_pvtv2_b2_ade20k_40k.py']

pretrained = 'checkpoints/pvt_small.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='PVT',
        arch='small',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 320, 512]))
