# RetinaNet + FPN with our PVT v2-b2 backbone on COCO 2017, 1x schedule (12 epochs, lr steps at 8 and 11).
#
# mmdet 3.x config on mmdet's own bases (RetinaNet R-50 FPN model, COCO detection data, 1x schedule,
# default runtime); this file holds only the backbone, the FPN inputs and the optimizer. The recipe is
# the PVT v2 paper's / mmdet's (configs/pvt/retinanet_pvtv2-b2_fpn_1x_coco.py): AdamW lr 1e-4, weight
# decay 1e-4, drop path 0.1, 500-iteration linear warmup, 8 GPUs x 2 images, single-scale 1333x800
# training with flips; the FPN starts at stride 8 and adds P6/P7 from the backbone's last map
# (RetinaNet's standard neck).
# Published anchors (box AP): 44.6 (official whai362/PVT detection README and mmdet).
#
# Train:  python tools/train.py configs/retinanet_pvtv2_b2_fpn_1x_coco.py
# The ImageNet-1k weights (pvt_v2_b2.pth from whai362/PVT releases, official format; timm, HF and mmdet
# layouts load too) go in checkpoints/.

_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['vit_backbones'], allow_failed_imports=False)

pretrained = 'checkpoints/pvt_v2_b2.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='PVTv2',
        arch='b2',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 320, 512]))

# schedule_1x as it is (12 epochs, 500 warmup iterations, steps at 8 and 11), with AdamW for SGD
max_epochs = 12  # a name the self-contained version of this file defined; kept so the resolved config is the same
optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, weight_decay=0.0001))

# Crash-safe checkpoints that also carry the generator states, so a killed run resumes bit-identically
# (vit_backbones.runtime.SafeCheckpointHook: mmengine's CheckpointHook arguments, atomic writes).
default_hooks = dict(checkpoint=dict(type='SafeCheckpointHook'))
# persistent_workers=False: a resumed run starts its loader workers afresh, so only workers that restart
# every epoch in the uninterrupted run too give a bit-identical resume (one worker start per epoch).
train_dataloader = dict(persistent_workers=False)
