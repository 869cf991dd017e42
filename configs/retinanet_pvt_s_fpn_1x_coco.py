# RetinaNet + FPN with our PVT-Small (v1) backbone on COCO 2017, 1x schedule.
#
# The recipe of the PVT paper / mmdet (configs/pvt/retinanet_pvt-s_fpn_1x_coco.py) is the PVT v2 one of
# retinanet_pvtv2_b2_fpn_1x_coco.py (AdamW lr 1e-4, weight decay 1e-4, drop path 0.1, 8 GPUs x 2 images,
# 1333x800, 12 epochs); only the backbone differs. The backbone returns the raw stage maps and drops the
# classifier's class token, as the official detection code and mmdet (out_norm=False, use_cls_token=False).
# Published anchors (box AP): 40.4 (official whai362/PVT detection README, 800 px; and mmdet).
#
# Train:  python tools/train.py configs/retinanet_pvt_s_fpn_1x_coco.py
# The ImageNet-1k weights (pvt_small.pth from whai362/PVT releases) go in checkpoints/.

_base_ = ['retinanet_pvtv2_b2_fpn_1x_coco.py']

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
