"""The configs in configs/ build their models through the OpenMMLab registries, carry the published
recipes, and the demo configs train one step and predict on tiny synthetic data."""
import glob
import os

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.utils import import_modules_from_strings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, 'configs')
ALL_CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, '*.py')) + glob.glob(os.path.join(CONFIG_DIR, 'demo', '*.py')))
NO_DECAY = {'absolute_pos_embed', 'relative_position_bias_table', 'norm'}


def _load(name):
    return Config.fromfile(os.path.join(CONFIG_DIR, name))


def _build_model(cfg):
    """Build ``cfg.model`` in the config's scope, importing what ``custom_imports`` names."""
    import_modules_from_strings(**cfg.custom_imports)
    init_default_scope(cfg.default_scope)
    if cfg.default_scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    return MODELS.build(cfg.model)


def test_every_config_is_covered():
    """Each config in configs/ is named by a test module that builds it (this file or a model's own
    tests/test_<model>*.py), so a config cannot be added without a test that builds and runs it."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    sources = {}
    for path in glob.glob(os.path.join(tests_dir, 'test_*.py')):
        with open(path) as f:
            sources[os.path.basename(path)] = f.read()
    names = sorted(os.path.relpath(p, CONFIG_DIR) for p in ALL_CONFIGS)
    assert len(names) >= 12
    uncovered = [n for n in names
                 if not any(f"'{n}'" in src or f"'{os.path.basename(n)}'" in src for src in sources.values())]
    assert uncovered == [], f'configs no test builds: {uncovered}'


@pytest.mark.parametrize('path', [p for p in ALL_CONFIGS if 'swin' in os.path.basename(p)],
                         ids=lambda p: os.path.relpath(p, CONFIG_DIR))
def test_config_builds_model_with_our_swin(path):
    from vit_backbones import get_backbone_class
    cfg = Config.fromfile(path)
    assert cfg.custom_imports == dict(imports=['vit_backbones'], allow_failed_imports=False)
    assert cfg.model.backbone.type == 'Swin' and cfg.model.backbone.arch == 'tiny'
    model = _build_model(cfg)
    assert isinstance(model.backbone, get_backbone_class('Swin'))
    assert sum(p.numel() for p in model.backbone.parameters()) == pytest.approx(27.5e6, rel=0.02)
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.rand(1, 3, 96, 128))
    if cfg.default_scope == 'mmdet':  # FPN: five 256-channel levels, strides 4..64
        assert [tuple(f.shape) for f in feats] == [(1, 256, 24, 32), (1, 256, 12, 16), (1, 256, 6, 8),
                                                    (1, 256, 3, 4), (1, 256, 2, 2)]
    else:  # backbone maps straight into UperNet: Swin-T channels, strides 4..32
        assert [tuple(f.shape) for f in feats] == [(1, 96, 24, 32), (1, 192, 12, 16), (1, 384, 6, 8),
                                                    (1, 768, 3, 4)]


def test_mask_rcnn_recipe():
    cfg = _load('mask_rcnn_swin_t.py')
    assert cfg.default_scope == 'mmdet'
    assert cfg.model.type == 'MaskRCNN'
    bb = cfg.model.backbone
    assert bb.drop_path_rate == 0.2 and tuple(bb.out_indices) == (0, 1, 2, 3)
    assert bb.init_cfg == dict(type='Pretrained', checkpoint='checkpoints/swin_tiny_patch4_window7_224.pth')
    assert cfg.model.neck.type == 'FPN' and cfg.model.neck.in_channels == [96, 192, 384, 768]
    assert cfg.model.roi_head.bbox_head.num_classes == 80 == cfg.model.roi_head.mask_head.num_classes
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.train_dataloader.dataset.data_root == 'data/coco/'
    assert cfg.train_dataloader.dataset.ann_file == 'annotations/instances_train2017.json'
    assert cfg.val_evaluator.type == 'CocoMetric' and cfg.val_evaluator.metric == ['bbox', 'segm']
    assert cfg.train_cfg.type == 'EpochBasedTrainLoop' and cfg.train_cfg.max_epochs == 12
    steps = [s for s in cfg.param_scheduler if s.type == 'MultiStepLR']
    assert len(steps) == 1 and steps[0].milestones == [8, 11] and steps[0].by_epoch
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ('AdamW', 1e-4, 0.05)
    keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
    assert set(keys) == NO_DECAY and all(v['decay_mult'] == 0.0 for v in keys.values())


def test_upernet_recipe():
    cfg = _load('upernet_swin_t_ade20k.py')
    assert cfg.default_scope == 'mmseg'
    assert cfg.model.type == 'EncoderDecoder'
    assert cfg.model.backbone.drop_path_rate == 0.3
    assert cfg.model.backbone.init_cfg.checkpoint == 'checkpoints/swin_tiny_patch4_window7_224.pth'
    assert cfg.model.decode_head.type == 'UPerHead' and cfg.model.decode_head.in_channels == [96, 192, 384, 768]
    aux = cfg.model.auxiliary_head
    assert aux.type == 'FCNHead' and aux.in_index == 2 and aux.in_channels == 384
    assert cfg.model.decode_head.num_classes == 150 == aux.num_classes
    assert cfg.crop_size == (512, 512) and cfg.model.data_preprocessor.size == (512, 512)
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.train_dataloader.dataset.type == 'ADE20KDataset'
    assert cfg.train_cfg.type == 'IterBasedTrainLoop' and cfg.train_cfg.max_iters == 160000
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ('AdamW', 6e-5, 0.01)
    assert set(cfg.optim_wrapper.paramwise_cfg.custom_keys) == NO_DECAY
    warm, poly = cfg.param_scheduler
    assert warm.type == 'LinearLR' and (warm.begin, warm.end) == (0, 1500)
    assert poly.type == 'PolyLR' and (poly.begin, poly.end, poly.power) == (1500, 160000, 1.0)


@pytest.mark.parametrize('name, base', [('demo/mask_rcnn_swin_t_synthetic.py', 'mask_rcnn_swin_t.py'),
                                        ('demo/upernet_swin_t_synthetic.py', 'upernet_swin_t_ade20k.py')])
def test_demo_config_is_the_same_network_without_pretrained_weights(name, base):
    demo, full = _load(name), _load(base)
    assert demo.model.backbone.init_cfg is None
    assert demo.train_cfg.type == 'IterBasedTrainLoop'
    assert demo.model.type == full.model.type
    if demo.default_scope == 'mmdet':
        assert demo.model.neck == full.model.neck
        assert demo.model.roi_head.bbox_head.fc_out_channels == full.model.roi_head.bbox_head.fc_out_channels
        assert demo.model.roi_head.bbox_head.num_classes == len(demo.metainfo['classes']) == 3
        assert demo.train_dataloader.dataset.data_root == 'data/synthetic_coco/'
    else:
        assert demo.model.decode_head.channels == full.model.decode_head.channels
        assert demo.model.decode_head.num_classes == len(demo.metainfo['classes']) == 4
        assert demo.train_dataloader.dataset.data_root == 'data/synthetic_ade/'
        assert demo.train_dataloader.dataset.reduce_zero_label is True


def _set_size(cfg, size):
    """Shrink every resize / crop of the demo pipelines to ``size`` (keeps the tests fast)."""
    found = 0
    for loader in ('train_dataloader', 'val_dataloader'):
        for step in cfg[loader].dataset.pipeline:
            if step.type in ('Resize', 'RandomResize'):
                step.scale, found = size, found + 1
            elif step.type == 'RandomCrop':
                step.crop_size, found = size, found + 1
    assert found >= 2


def _tiny_run(cfg, work_dir, data_root, ann_file=None):
    """Train one iteration then validate (which predicts on every val image)."""
    from mmengine.runner import Runner
    cfg.work_dir = str(work_dir)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = data_root
    if ann_file is not None:
        cfg.val_evaluator.ann_file = ann_file
        cfg.test_evaluator.ann_file = ann_file
    cfg.train_cfg.max_iters = 1
    cfg.train_cfg.val_interval = 1
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end=1)]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=-1, save_last=False)
    runner = Runner.from_cfg(cfg)
    before = {k: v.detach().clone() for k, v in runner.model.named_parameters()}
    runner.train()
    changed = [k for k, v in runner.model.named_parameters() if not torch.equal(v, before[k])]
    return runner, changed


def test_mask_rcnn_demo_config_trains_and_predicts(tmp_path):
    from mmengine.dataset import pseudo_collate
    from vit_backbones.data import make_coco_instances
    root = str(tmp_path / 'coco') + os.sep
    paths = make_coco_instances(root, num_train=2, num_val=1, image_size=(96, 96), seed=0)
    cfg = _load('demo/mask_rcnn_swin_t_synthetic.py')
    _set_size(cfg, (96, 96))
    runner, changed = _tiny_run(cfg, tmp_path / 'work', root, paths['val_ann'])
    assert any(k.startswith('backbone.') for k in changed), 'the backbone was not updated by the step'
    assert any(k.startswith('roi_head.mask_head') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    pred = sample.pred_instances
    assert pred.bboxes.shape[1] == 4 and len(pred) <= 20
    assert tuple(pred.masks.shape[1:]) == (96, 96)
    assert ((pred.labels >= 0) & (pred.labels < 3)).all()


def test_upernet_demo_config_trains_and_predicts(tmp_path):
    from mmengine.dataset import pseudo_collate
    from vit_backbones.data import make_ade_like
    root = str(tmp_path / 'ade') + os.sep
    make_ade_like(root, num_train=2, num_val=1, image_size=(96, 96), seed=0)
    cfg = _load('demo/upernet_swin_t_synthetic.py')
    cfg.model.data_preprocessor.size = (96, 96)
    _set_size(cfg, (96, 96))
    runner, changed = _tiny_run(cfg, tmp_path / 'work', root)
    assert any(k.startswith('backbone.') for k in changed)
    assert any(k.startswith('decode_head.') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    seg = sample.pred_sem_seg.data
    assert tuple(seg.shape) == (1, 96, 96)
    assert int(seg.min()) >= 0 and int(seg.max()) < 4
    gt = sample.gt_sem_seg.data
    assert set(gt.unique().tolist()) <= {0, 1, 2, 3, 255} and 255 in gt.unique().tolist()


# ------------------------------------------------------------------------------------------ ViT / DeiT
PLAIN_CONFIGS = {  # config -> (backbone type, arch, backbone parameters without the pyramid neck)
    'mask_rcnn_vit_b_fpn.py': ('ViT', 'base', 85.80e6),
    'mask_rcnn_deit_s_fpn.py': ('DeiT', 'small', 21.67e6),
    'upernet_vit_b16_ade20k.py': ('ViT', 'base', 85.80e6),
    'upernet_deit_s16_ade20k.py': ('DeiT', 'small', 21.67e6),
}
PLAIN_TINY = dict(base='small', embed_dims=32, depth=4, num_heads=2)


@pytest.mark.parametrize('name', sorted(PLAIN_CONFIGS))
def test_plain_config_builds_model(name):
    from vit_backbones import get_backbone_class
    cfg = _load(name)
    assert cfg.custom_imports == dict(imports=['vit_backbones'], allow_failed_imports=False)
    kind, arch, n_params = PLAIN_CONFIGS[name]
    assert cfg.model.backbone.type == kind and cfg.model.backbone.arch == arch
    model = _build_model(cfg)
    bb = model.backbone
    assert isinstance(bb, get_backbone_class(kind))
    n = sum(p.numel() for k, p in bb.named_parameters() if not k.startswith('pyramid.'))
    assert n == pytest.approx(n_params + (bb.pos_embed.numel() - (1 + 196) * bb.embed_dims), rel=0.01)
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.rand(1, 3, 96, 128))
    if cfg.default_scope == 'mmdet':  # ViTDet pyramid -> FPN: five 256-channel levels, strides 4..64
        assert cfg.model.neck.in_channels == bb.out_channels
        assert [tuple(f.shape) for f in feats] == [(1, 256, 24, 32), (1, 256, 12, 16), (1, 256, 6, 8),
                                                    (1, 256, 3, 4), (1, 256, 2, 2)]
    else:  # deconvolution pyramid straight into UperNet
        c = bb.embed_dims
        assert cfg.model.decode_head.in_channels == bb.out_channels == [c] * 4
        assert [tuple(f.shape) for f in feats] == [(1, c, 24, 32), (1, c, 12, 16), (1, c, 6, 8), (1, c, 3, 4)]


def test_plain_recipes():
    det = _load('mask_rcnn_vit_b_fpn.py').model.backbone
    assert (det.pyramid, det.window_size, tuple(det.global_attn_indexes), det.rel_pos) == ('simple', 14, (2, 5, 8, 11), True)
    assert det.drop_path_rate == 0.1 and det.final_norm is False
    seg = _load('upernet_vit_b16_ade20k.py')
    assert (seg.model.backbone.img_size, tuple(seg.model.backbone.block_indices)) == (512, (2, 5, 8, 11))
    assert seg.model.backbone.drop_path_rate == 0.0 and seg.model.auxiliary_head.in_index == 3
    assert seg.train_cfg.max_iters == 160000 and seg.optim_wrapper.optimizer.lr == 6e-5
    assert set(seg.optim_wrapper.paramwise_cfg.custom_keys) == {'pos_embed', 'cls_token', 'norm'}
    deit = _load('upernet_deit_s16_ade20k.py').model.backbone
    assert (deit.type, deit.arch, deit.drop_path_rate) == ('DeiT', 'small', 0.1)
    assert deit.init_cfg.checkpoint.endswith('deit_small_patch16_224-cd65a155.pth')


def _plain_on_demo(demo_name, name):
    """The demo (synthetic-data) config with the backbone and neck/head channels of ``name``, the backbone
    shrunk to a 32-wide, 4-block arch (windows of 4 tokens with blocks 1 and 3 global for ViTDet)."""
    import vit_backbones
    demo, full = _load(demo_name), _load(name)
    bb = full.model.backbone.copy()
    bb.update(arch=PLAIN_TINY, init_cfg=None, block_indices=None)
    if bb.get('window_size'):
        bb.update(window_size=4, global_attn_indexes=(1, 3))
    kind = bb.pop('type')
    chans = vit_backbones.build_backbone(kind, **bb).out_channels
    bb['type'] = kind
    demo.model.backbone = bb
    if demo.default_scope == 'mmdet':
        demo.model.neck = full.model.neck.copy()
        demo.model.neck.in_channels = chans
    else:
        demo.model.decode_head.in_channels = chans
        demo.model.auxiliary_head.in_channels = chans[full.model.auxiliary_head.in_index]
        demo.model.auxiliary_head.in_index = full.model.auxiliary_head.in_index
    return demo


@pytest.mark.parametrize('name', ['mask_rcnn_vit_b_fpn.py', 'mask_rcnn_deit_s_fpn.py'])
def test_plain_mask_rcnn_trains_and_predicts(tmp_path, name):
    from mmengine.dataset import pseudo_collate
    from vit_backbones.data import make_coco_instances
    root = str(tmp_path / 'coco') + os.sep
    paths = make_coco_instances(root, num_train=2, num_val=1, image_size=(96, 96), seed=0)
    cfg = _plain_on_demo('demo/mask_rcnn_swin_t_synthetic.py', name)
    _set_size(cfg, (96, 96))
    runner, changed = _tiny_run(cfg, tmp_path / 'work', root, paths['val_ann'])
    assert any(k.startswith('backbone.blocks.') for k in changed) and any(k.startswith('backbone.pyramid.') for k in changed)
    assert any(k.startswith('roi_head.mask_head') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    pred = sample.pred_instances
    assert pred.bboxes.shape[1] == 4 and tuple(pred.masks.shape[1:]) == (96, 96)


@pytest.mark.parametrize('name', ['upernet_vit_b16_ade20k.py', 'upernet_deit_s16_ade20k.py'])
def test_plain_upernet_trains_and_predicts(tmp_path, name):
    from mmengine.dataset import pseudo_collate
    from vit_backbones.data import make_ade_like
    root = str(tmp_path / 'ade') + os.sep
    make_ade_like(root, num_train=2, num_val=1, image_size=(96, 96), seed=0)
    cfg = _plain_on_demo('demo/upernet_swin_t_synthetic.py', name)
    cfg.model.data_preprocessor.size = (96, 96)
    _set_size(cfg, (96, 96))
    runner, changed = _tiny_run(cfg, tmp_path / 'work', root)
    assert any(k.startswith('backbone.blocks.') for k in changed) and any(k.startswith('backbone.pyramid.') for k in changed)
    assert any(k.startswith('decode_head.') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    seg = sample.pred_sem_seg.data
    assert tuple(seg.shape) == (1, 96, 96) and int(seg.min()) >= 0 and int(seg.max()) < 4


# ------------------------------------------------------------------------------------------ PVT v1 / v2
PVT_CONFIGS = {  # config -> (backbone type, arch, backbone parameters)
    'retinanet_pvtv2_b2_fpn_1x_coco.py': ('PVTv2', 'b2', 24.85e6),
    'fpn_pvtv2_b2_ade20k_40k.py': ('PVTv2', 'b2', 24.85e6),
    'retinanet_pvt_s_fpn_1x_coco.py': ('PVT', 'small', 23.97e6),
    'fpn_pvt_s_ade20k_40k.py': ('PVT', 'small', 23.97e6),
}
PVT_TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))


@pytest.mark.parametrize('name', sorted(PVT_CONFIGS))
def test_pvt_config_builds_model(name):
    from vit_backbones import get_backbone_class
    cfg = _load(name)
    assert cfg.custom_imports == dict(imports=['vit_backbones'], allow_failed_imports=False)
    kind, arch, n_params = PVT_CONFIGS[name]
    assert cfg.model.backbone.type == kind and cfg.model.backbone.arch == arch
    assert cfg.model.backbone.init_cfg.type == 'Pretrained'
    model = _build_model(cfg)
    bb = model.backbone
    assert isinstance(bb, get_backbone_class(kind))
    assert sum(p.numel() for p in bb.parameters()) == pytest.approx(n_params, rel=0.01)
    assert cfg.model.neck.in_channels == bb.out_channels == [64, 128, 320, 512]
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.rand(1, 3, 96, 128))
    if cfg.default_scope == 'mmdet':  # RetinaNet FPN: P3-P7, strides 8..128
        assert [tuple(f.shape) for f in feats] == [(1, 256, 12, 16), (1, 256, 6, 8), (1, 256, 3, 4),
                                                    (1, 256, 2, 2), (1, 256, 1, 1)]
    else:  # Semantic FPN neck: strides 4..32
        assert [tuple(f.shape) for f in feats] == [(1, 256, 24, 32), (1, 256, 12, 16), (1, 256, 6, 8),
                                                    (1, 256, 3, 4)]


@pytest.mark.parametrize('name', ['retinanet_pvtv2_b2_fpn_1x_coco.py', 'retinanet_pvt_s_fpn_1x_coco.py'])
def test_pvt_retinanet_recipe(name):
    cfg = _load(name)
    assert cfg.default_scope == 'mmdet' and cfg.model.type == 'RetinaNet'
    assert cfg.model.backbone.drop_path_rate == 0.1 and tuple(cfg.model.backbone.out_indices) == (0, 1, 2, 3)
    neck = cfg.model.neck
    assert (neck.type, neck.start_level, neck.add_extra_convs, neck.num_outs) == ('FPN', 1, 'on_input', 5)
    assert cfg.model.bbox_head.type == 'RetinaHead' and cfg.model.bbox_head.num_classes == 80
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16
    assert cfg.train_cfg.type == 'EpochBasedTrainLoop' and cfg.train_cfg.max_epochs == 12
    steps = [s for s in cfg.param_scheduler if s.type == 'MultiStepLR']
    assert len(steps) == 1 and steps[0].milestones == [8, 11]
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ('AdamW', 1e-4, 1e-4)
    assert cfg.val_evaluator.metric == 'bbox'


@pytest.mark.parametrize('name', ['fpn_pvtv2_b2_ade20k_40k.py', 'fpn_pvt_s_ade20k_40k.py'])
def test_pvt_semantic_fpn_recipe(name):
    cfg = _load(name)
    assert cfg.default_scope == 'mmseg' and cfg.model.type == 'EncoderDecoder'
    assert cfg.model.neck.type == 'FPN' and cfg.model.neck.num_outs == 4
    head = cfg.model.decode_head
    assert (head.type, head.channels, head.num_classes, head.feature_strides) == ('FPNHead', 128, 150, [4, 8, 16, 32])
    assert cfg.crop_size == (512, 512) and cfg.model.data_preprocessor.size == (512, 512)
    assert cfg.train_dataloader.dataset.type == 'ADE20KDataset' and cfg.train_dataloader.batch_size == 4
    assert cfg.train_cfg.type == 'IterBasedTrainLoop' and cfg.train_cfg.max_iters == 40000
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ('AdamW', 2e-4, 1e-4)
    (poly, ) = cfg.param_scheduler
    assert poly.type == 'PolyLR' and (poly.begin, poly.end, poly.power, poly.eta_min) == (0, 40000, 0.9, 0.0)


def _pvt_on_synthetic(name, root):
    """The config with a 16-wide one-block-per-stage backbone of the same type, random init, and its
    datasets pointed at tiny synthetic data (3 shapes; 96 px images)."""
    import vit_backbones
    from vit_backbones.data import DEFAULT_CLASSES, ade_class_names
    cfg = _load(name)
    bb = cfg.model.backbone
    bb.update(arch=dict(base=bb.arch, **PVT_TINY), init_cfg=None)
    cfg.model.neck.in_channels = vit_backbones.build_backbone(bb.type, bb.arch).out_channels
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].update(num_workers=0, persistent_workers=False)
    cfg.train_dataloader.update(sampler=dict(type='InfiniteSampler', shuffle=True), batch_sampler=None)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=1, val_interval=1)
    if cfg.default_scope == 'mmdet':
        cfg.model.bbox_head.num_classes = len(DEFAULT_CLASSES)
        for loader in ('train_dataloader', 'val_dataloader'):
            cfg[loader].dataset.metainfo = dict(classes=DEFAULT_CLASSES)
    else:
        classes = ade_class_names()
        cfg.model.decode_head.num_classes = len(classes)
        cfg.model.data_preprocessor.size = (96, 96)
        for loader in ('train_dataloader', 'val_dataloader'):
            cfg[loader].dataset.update(type='BaseSegDataset', metainfo=dict(classes=classes), img_suffix='.jpg',
                                       seg_map_suffix='.png', reduce_zero_label=True)
        cfg.model.decode_head.norm_cfg = dict(type='BN', requires_grad=True)  # one CPU process: no SyncBN
    cfg.test_dataloader = cfg.val_dataloader
    _set_size(cfg, (96, 96))
    return cfg


@pytest.mark.parametrize('name', ['retinanet_pvtv2_b2_fpn_1x_coco.py', 'retinanet_pvt_s_fpn_1x_coco.py'])
def test_pvt_retinanet_trains_and_predicts(tmp_path, name):
    from mmengine.dataset import pseudo_collate
    from vit_backbones.data import make_coco_instances
    root = str(tmp_path / 'coco') + os.sep
    paths = make_coco_instances(root, num_train=2, num_val=1, image_size=(96, 96), seed=0)
    cfg = _pvt_on_synthetic(name, root)
    runner, changed = _tiny_run(cfg, tmp_path / 'work', root, paths['val_ann'])
    assert any(k.startswith('backbone.stages.3.') for k in changed) and any(k.startswith('bbox_head.') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    pred = sample.pred_instances
    assert pred.bboxes.shape[1] == 4 and len(pred) <= 100 and ((pred.labels >= 0) & (pred.labels < 3)).all()


@pytest.mark.parametrize('name', ['fpn_pvtv2_b2_ade20k_40k.py', 'fpn_pvt_s_ade20k_40k.py'])
def test_pvt_semantic_fpn_trains_and_predicts(tmp_path, name):
    from mmengine.dataset import pseudo_collate
    from vit_backbones.data import make_ade_like
    root = str(tmp_path / 'ade') + os.sep
    make_ade_like(root, num_train=2, num_val=1, image_size=(96, 96), seed=0)
    cfg = _pvt_on_synthetic(name, root)
    runner, changed = _tiny_run(cfg, tmp_path / 'work', root)
    assert any(k.startswith('backbone.stages.0.') for k in changed) and any(k.startswith('decode_head.') for k in changed)
    runner.model.eval()
    with torch.no_grad():
        sample = runner.model.test_step(pseudo_collate([runner.val_dataloader.dataset[0]]))[0]
    seg = sample.pred_sem_seg.data
    assert tuple(seg.shape) == (1, 96, 96) and int(seg.min()) >= 0 and int(seg.max()) < 4
