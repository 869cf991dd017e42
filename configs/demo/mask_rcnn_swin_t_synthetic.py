# Mask R-CNN + FPN + our Swin-T (configs/mask_rcnn_swin_t.py) on the synthetic COCO-format shapes set,
# sized to learn on a 2-core CPU in minutes, from random weights (no checkpoint can be downloaded).
#
# Make the data:  python tools/make_synthetic_data.py --out data/synthetic_coco --kind coco --size 128
# Train:          python tools/train.py configs/demo/mask_rcnn_swin_t_synthetic.py
# tools/demo.py runs all of it (data, untrained eval, training, trained eval, picture) in one go.
#
# What differs from the COCO recipe, and why (measured on a 2-core CPU, 200 train / 40 val images):
# - 3 classes, 128 px images, no pretrained weights (init_cfg=None: the backbone starts random), no drop
#   path (regularisation only slows a 500-iteration run down);
# - an iteration-based schedule: 40 warmup iterations, then cosine decay from AdamW lr 4e-4 (4x the
#   COCO recipe's; a 300-iteration trial at 8e-4 learned worse), gradient clipping, fused AdamW (its
#   optimizer step took 0.08 s instead of 0.23 s here);
# - fewer RPN proposals and RoI samples (the images hold 1-4 objects). The mask head dominates the
#   step time and trains only on positive RoIs, so at most 8 positives per image (64 x 0.125): 500
#   iterations this way reached about the mAP of 600 iterations with 16 positives per image
#   (bbox/mask mAP 0.21/0.28 vs 0.24/0.27);
# - the network itself is the same (FPN, RPN, 2-fc box head, 4-conv mask head).

_base_ = ['../mask_rcnn_swin_t.py']

data_root = 'data/synthetic_coco/'
classes = ('ellipse', 'rectangle', 'triangle')
metainfo = dict(classes=classes, palette=[(220, 20, 60), (0, 128, 255), (20, 200, 20)])
img_scale = (128, 128)
max_iters = 500
val_interval = max_iters
lr = 4e-4
warmup_iters = 40

model = dict(
    backbone=dict(drop_path_rate=0.0, init_cfg=None),
    roi_head=dict(
        bbox_head=dict(num_classes=len(classes)),
        mask_head=dict(num_classes=len(classes))),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=128)),
        rpn_proposal=dict(nms_pre=1000, max_per_img=200),
        rcnn=dict(sampler=dict(num=64, pos_fraction=0.125))),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=100),
        rcnn=dict(max_per_img=20)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        filter_cfg=dict(filter_empty_gt=True, min_size=8),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=val_interval)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='CosineAnnealingLR', T_max=max_iters - warmup_iters, eta_min=lr * 0.05, by_epoch=False,
         begin=warmup_iters, end=max_iters),
]
optim_wrapper = dict(optimizer=dict(lr=lr, fused=True), clip_grad=dict(max_norm=10.0, norm_type=2))

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(type='SafeCheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1),
    visualization=dict(type='DetVisualizationHook', draw=False))
log_processor = dict(type='LogProcessor', window_size=20, by_epoch=False)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0, deterministic=False)
