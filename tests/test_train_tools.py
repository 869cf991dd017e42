"""tools/train.py and tools/test.py end to end on tiny mmdet / mmseg models (CPU, 64x64 images).

The runs are real subprocesses of the tools (as a user runs them); a recording hook
(``helpers.RecordTrainingHook``) reports per-rank weights, the samples each iteration saw and the
dtype of the first layer's output, so the tests can check what happened inside.
"""
import importlib.util
import json
import os
import os.path as osp
import pickle
import socket

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config

import helpers
from helpers import load_ckpt, make_tiny_coco, make_tiny_seg, run_tool, tiny_det_config, tiny_seg_config, write_config

TRAIN = osp.join(helpers.REPO_ROOT, 'tools', 'train.py')
TEST = osp.join(helpers.REPO_ROOT, 'tools', 'test.py')


def _load_tool(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def train_tool():
    return _load_tool(TRAIN, 'vb_tools_train')


@pytest.fixture(scope='module')
def test_tool():
    return _load_tool(TEST, 'vb_tools_test')


@pytest.fixture(scope='module')
def det_data(tmp_path_factory):
    return make_tiny_coco(str(tmp_path_factory.mktemp('coco')), num_train=4, num_val=2)


@pytest.fixture(scope='module')
def det_run(det_data, tmp_path_factory):
    """An uninterrupted 4-iteration RetinaNet run, checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp('det_full')
    cfg = write_config(tiny_det_config(det_data, max_iters=4, ckpt_interval=2, record_dir=str(root / 'rec')),
                       str(root / 'det_cfg.py'))
    proc = run_tool([TRAIN, cfg, '--work-dir', str(root / 'work')])
    return dict(root=root, cfg=cfg, work=root / 'work', rec=root / 'rec', proc=proc)


def _params_equal(a: dict, b: dict, atol: float = 0.0) -> bool:
    assert a.keys() == b.keys()
    return all(torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=atol) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# Command line and config handling (in-process, fast)
# --------------------------------------------------------------------------------------------------


def test_train_arguments(train_tool, tmp_path, monkeypatch):
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    cfg_path = write_config(tiny_det_config(str(tmp_path)), str(tmp_path / 'my_cfg.py'))
    args = train_tool.parse_args([cfg_path, '--resume', '--amp', '--local-rank', '1', '--cfg-options',
                                  'train_cfg.max_iters=7', 'model.backbone.out_indices=(1,3)'])
    assert args.resume == 'auto' and args.amp and args.launcher == 'none'
    assert os.environ['LOCAL_RANK'] == '1'
    cfg = train_tool.build_config(args)
    # No checkpoint in ./work_dirs/my_cfg: --resume starts from scratch (tests/test_checkpoint_hook.py
    # checks which checkpoint it takes when there are some).
    assert cfg.resume is False and cfg.load_from is None
    assert cfg.default_hooks.checkpoint.type == 'SafeCheckpointHook'
    assert cfg.train_cfg.max_iters == 7 and tuple(cfg.model.backbone.out_indices) == (1, 3)
    assert cfg.work_dir == osp.join('./work_dirs', 'my_cfg')
    # No CUDA here: --amp means bfloat16 autocast on the CPU.
    assert cfg.optim_wrapper.type == 'BF16AutocastOptimWrapper' and cfg.optim_wrapper.dtype == 'bfloat16'

    ckpt = tmp_path / 'some.pth'
    torch.save({}, ckpt)
    args = train_tool.parse_args([cfg_path, '--resume', str(ckpt), '--work-dir', str(tmp_path / 'w')])
    cfg = train_tool.build_config(args)
    assert cfg.resume is True and cfg.load_from == str(ckpt) and cfg.work_dir == str(tmp_path / 'w')
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    with pytest.raises(FileNotFoundError, match='--resume checkpoint not found'):
        train_tool.build_config(train_tool.parse_args([cfg_path, '--resume', str(tmp_path / 'missing.pth')]))
    with pytest.raises(SystemExit):
        train_tool.parse_args([cfg_path, '--launcher', 'ssh'])


def test_scope_errors_are_clear(train_tool, tmp_path):
    from vit_backbones.runtime import resolve_scope
    assert resolve_scope(Config(dict(model=dict(type='EncoderDecoder')))) == 'mmseg'
    assert resolve_scope(Config(dict(model=dict(type='X', data_preprocessor=dict(type='DetDataPreprocessor'))))) \
        == 'mmdet'
    assert resolve_scope(Config(dict(model=dict(type='mmdet.RetinaNet')))) == 'mmdet'
    with pytest.raises(ValueError, match="default_scope='mmpretrain'.*mmdet and mmseg"):
        resolve_scope(Config(dict(default_scope='mmpretrain', model=dict(type='ImageClassifier'))))
    with pytest.raises(ValueError, match='cannot tell whether this is an mmdet or an mmseg config'):
        resolve_scope(Config(dict(model=dict(type='MyModel'))))
    cfg_path = write_config(Config(dict(default_scope='mmocr', model=dict(type='X'))), str(tmp_path / 'ocr.py'))
    with pytest.raises(ValueError, match='mmocr'):
        train_tool.main([cfg_path])
    with pytest.raises(FileNotFoundError, match='config file not found'):
        train_tool.main([str(tmp_path / 'nope.py')])


def test_test_tool_arguments(test_tool, tmp_path):
    det_cfg = write_config(tiny_det_config(str(tmp_path)), str(tmp_path / 'det.py'))
    seg_cfg = write_config(tiny_seg_config(str(tmp_path)), str(tmp_path / 'seg.py'))
    ckpt = tmp_path / 'c.pth'
    torch.save({}, ckpt)
    cfg = test_tool.build_config(test_tool.parse_args([det_cfg, str(ckpt), '--out', str(tmp_path / 'r.pkl'),
                                                       '--show-dir', 'vis']))
    assert cfg.load_from == str(ckpt) and cfg.resume is False
    assert [m['type'] for m in cfg.test_evaluator] == ['CocoMetric', 'DumpDetResults']
    assert cfg.default_hooks.visualization.draw is True
    assert cfg.default_hooks.visualization.test_out_dir == osp.abspath('vis')
    with pytest.raises(ValueError, match='must be a pickle file'):
        test_tool.build_config(test_tool.parse_args([det_cfg, str(ckpt), '--out', str(tmp_path / 'dir')]))
    cfg = test_tool.build_config(test_tool.parse_args([seg_cfg, str(ckpt), '--out', str(tmp_path / 'pngs')]))
    assert cfg.test_evaluator.output_dir == str(tmp_path / 'pngs')
    cfg = test_tool.build_config(test_tool.parse_args([seg_cfg, str(ckpt), '--out', str(tmp_path / 'p.pkl')]))
    assert [m['type'] for m in cfg.test_evaluator] == ['IoUMetric', 'mmengine.DumpResults']
    with pytest.raises(FileNotFoundError, match='checkpoint file not found'):
        test_tool.build_config(test_tool.parse_args([seg_cfg, str(tmp_path / 'missing.pth')]))


def test_distributed_config_without_cuda(monkeypatch):
    from vit_backbones.runtime import prepare_distributed
    assert not torch.cuda.is_available()
    cfg = Config(dict(env_cfg=dict(dist_cfg=dict(backend='nccl'))))
    prepare_distributed(cfg, 'none')
    assert cfg.launcher == 'none' and cfg.env_cfg.dist_cfg.backend == 'nccl' and 'model_wrapper_cfg' not in cfg
    for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match='torch.distributed.run'):
        prepare_distributed(cfg, 'pytorch')
    # The config was made CPU-ready before the process group was needed.
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model_wrapper_cfg.type == 'MMDistributedDataParallel' and cfg.model_wrapper_cfg.device_ids is None
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match='unknown launcher'):
        prepare_distributed(cfg, 'ssh')


def test_enable_amp_on_cpu():
    from vit_backbones.runtime import enable_amp
    cfg = Config(dict(optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1))))
    assert enable_amp(cfg) == 'BF16AutocastOptimWrapper' and cfg.optim_wrapper.optimizer.type == 'SGD'
    gpu_cfg = Config(dict(optim_wrapper=dict(type='AmpOptimWrapper', loss_scale=512.0, optimizer=dict(type='SGD'))))
    assert enable_amp(gpu_cfg) == 'BF16AutocastOptimWrapper' and 'loss_scale' not in gpu_cfg.optim_wrapper
    with pytest.raises(ValueError, match="only replaces a plain OptimWrapper.*'ApexOptimWrapper'"):
        enable_amp(Config(dict(optim_wrapper=dict(type='ApexOptimWrapper', optimizer=dict(type='SGD')))))
    with pytest.raises(KeyError, match='optim_wrapper'):
        enable_amp(Config(dict()))


def test_bf16_autocast_optim_wrapper():
    from mmengine.registry import OPTIM_WRAPPERS
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    wrapper = OPTIM_WRAPPERS.build(
        dict(type='BF16AutocastOptimWrapper', optimizer=torch.optim.AdamW(model.parameters(), lr=0.1)))
    x = torch.randn(4, 8)
    with wrapper.optim_context(model):
        out = model(x)
        assert out.dtype == torch.bfloat16
        loss = out.float().pow(2).mean()
    before = model[0].weight.detach().clone()
    wrapper.update_params(loss)
    assert model[0].weight.dtype == torch.float32 and not torch.equal(before, model[0].weight)
    assert wrapper.optimizer.state[model[0].weight]['exp_avg'].dtype == torch.float32
    assert model(x).dtype == torch.float32  # autocast only inside the context
    with pytest.raises(ValueError, match='unknown dtype'):
        OPTIM_WRAPPERS.build(dict(type='BF16AutocastOptimWrapper', dtype='bf17',
                                  optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


def test_resume_continues_exactly(det_run, tmp_path):
    """4 iterations in one go == 2 iterations, a crash, then `--resume` (auto) to 4: bit for bit."""
    full = load_ckpt(str(det_run['work'] / 'iter_4.pth'))
    full_at_2 = load_ckpt(str(det_run['work'] / 'iter_2.pth'))
    assert full['meta']['iter'] == 4 and full_at_2['meta']['iter'] == 2
    # The run trained: weights and optimizer moments changed between iterations 2 and 4.
    assert not _params_equal(full['state_dict'], full_at_2['state_dict'], atol=1e-6)

    cfg = write_config(tiny_det_config(helpers_data(det_run), max_iters=4, ckpt_interval=2,
                                       record_dir=str(tmp_path / 'rec')), str(tmp_path / 'det_cfg.py'))
    work = tmp_path / 'work'
    crashed = run_tool([TRAIN, cfg, '--work-dir', str(work)], env_extra={'VB_TEST_STOP_AT_ITER': '2'}, check=False)
    assert crashed.returncode != 0 and 'simulated crash' in crashed.stderr
    assert (work / 'iter_2.pth').exists() and not (work / 'iter_4.pth').exists()

    resumed = run_tool([TRAIN, cfg, '--work-dir', str(work), '--resume'])
    log = resumed.stdout + resumed.stderr
    assert f'--resume: resuming from {work}/iter_2.pth' in log
    assert 'Iter(train) [3/4]' in log and 'Iter(train) [4/4]' in log and 'Iter(train) [1/4]' not in log
    record = json.loads((tmp_path / 'rec' / 'rank0.json').read_text())
    assert record['iters'] == [3, 4]
    # The resumed run saw the same samples in iterations 3-4 as the uninterrupted one.
    full_record = json.loads((det_run['rec'] / 'rank0.json').read_text())
    assert record['samples'] == full_record['samples'][2:]

    # Weights right after resuming are the iteration-2 checkpoint's.
    init = torch.load(tmp_path / 'rec' / 'rank0_init.pth')
    assert _params_equal(init['params'], {k: full_at_2['state_dict'][k] for k in init['params']})

    part = load_ckpt(str(work / 'iter_4.pth'))
    assert part['meta']['iter'] == 4
    assert _params_equal(part['state_dict'], full['state_dict'])
    for idx, state in full['optimizer']['state'].items():
        for key in ('exp_avg', 'exp_avg_sq', 'step'):
            assert torch.equal(part['optimizer']['state'][idx][key], state[key]), (idx, key)
    assert part['optimizer']['param_groups'][0]['lr'] == pytest.approx(full['optimizer']['param_groups'][0]['lr'])
    assert part['param_schedulers'] == full['param_schedulers']
    assert part['param_schedulers'][0]['last_step'] == 3


def helpers_data(det_run) -> str:
    """The data root of the det_run fixture's config."""
    return Config.fromfile(det_run['cfg']).train_dataloader.dataset.data_root


def test_load_from_starts_fresh_from_weights(det_run, tmp_path):
    start = load_ckpt(str(det_run['work'] / 'iter_2.pth'))
    cfg = write_config(tiny_det_config(helpers_data(det_run), max_iters=2, ckpt_interval=2,
                                       record_dir=str(tmp_path / 'rec')), str(tmp_path / 'det_cfg.py'))
    run_tool([TRAIN, cfg, '--work-dir', str(tmp_path / 'work'), '--cfg-options',
              f'load_from={det_run["work"] / "iter_2.pth"}'])
    init = torch.load(tmp_path / 'rec' / 'rank0_init.pth')
    fresh = torch.load(det_run['rec'] / 'rank0_init.pth')
    # Loaded weights, not the random initialisation ...
    assert _params_equal(init['params'], {k: start['state_dict'][k] for k in init['params']})
    assert not _params_equal(init['params'], fresh['params'], atol=1e-6)
    # ... but a fresh run: iterations and optimizer state start from zero.
    record = json.loads((tmp_path / 'rec' / 'rank0.json').read_text())
    assert record['iters'] == [1, 2]
    end = load_ckpt(str(tmp_path / 'work' / 'iter_2.pth'))
    assert end['meta']['iter'] == 2
    assert all(float(s['step']) == 2.0 for s in end['optimizer']['state'].values())
    assert not _params_equal(end['state_dict'], start['state_dict'], atol=1e-6)


def test_distributed_two_cpu_processes(det_data, tmp_path):
    """torch.distributed.run with 2 gloo processes: DDP keeps the ranks' parameters identical."""
    rec = tmp_path / 'rec'
    cfg = write_config(tiny_det_config(det_data, max_iters=3, ckpt_interval=3, batch_size=1, record_dir=str(rec)),
                       str(tmp_path / 'det_cfg.py'))
    work = tmp_path / 'work'
    proc = run_tool(['--nproc_per_node', '2', '--master_port', str(_free_port()), TRAIN, cfg, '--work-dir',
                     str(work), '--launcher', 'pytorch'], prefix=['-m', 'torch.distributed.run'], timeout=400)
    log = proc.stdout + proc.stderr
    assert "dist_cfg: {'backend': 'gloo'}" in log and 'Distributed training: True' in log
    records = [json.loads((rec / f'rank{r}.json').read_text()) for r in range(2)]
    # Each rank trained on its own shard: different images in every iteration.
    for a, b in zip(records[0]['samples'], records[1]['samples']):
        assert len(a) == len(b) == 1 and a != b
    assert records[0]['iters'] == records[1]['iters'] == [1, 2, 3]

    init = [torch.load(rec / f'rank{r}_init.pth') for r in range(2)]
    final = [torch.load(rec / f'rank{r}_final.pth') for r in range(2)]
    assert _params_equal(init[0]['params'], init[1]['params'])
    # Different data, same parameters afterwards: the gradients were all-reduced.
    assert _params_equal(final[0]['params'], final[1]['params'])
    # ... and they did train.
    changed = [k for k in final[0]['params'] if not torch.equal(final[0]['params'][k], init[0]['params'][k])]
    assert len(changed) == len(final[0]['params'])
    # BatchNorm statistics are each rank's own (broadcast_buffers=False, as mmengine does on GPUs).
    bn_means = [k for k in final[0]['buffers'] if k.endswith('running_mean')]
    assert any(not torch.equal(final[0]['buffers'][k], final[1]['buffers'][k]) for k in bn_means)
    # The checkpoint (written by rank 0) holds exactly those parameters.
    ckpt = load_ckpt(str(work / 'iter_3.pth'))
    assert ckpt['meta']['iter'] == 3
    assert _params_equal(final[0]['params'], {k: ckpt['state_dict'][k] for k in final[0]['params']})


def test_test_tool_det(det_run, tmp_path):
    out = tmp_path / 'preds.pkl'
    show = tmp_path / 'show'
    ckpt = str(det_run['work'] / 'iter_4.pth')
    proc = run_tool([TEST, det_run['cfg'], ckpt, '--work-dir', str(tmp_path / 'work'), '--out', str(out),
                     '--show-dir', str(show)])
    assert 'coco/bbox_mAP' in proc.stdout + proc.stderr
    with open(out, 'rb') as f:
        preds = pickle.load(f)
    assert sorted(p['img_id'] for p in preds) == [1, 2]
    assert sorted(os.listdir(show)) == ['val_000.png', 'val_001.png']
    assert cv2.imread(str(show / 'val_000.png')).shape[:2] == (64, 128)  # ground truth | prediction

    # The predictions are those of the checkpoint's weights: compare with the model run in-process.
    from mmdet.apis import inference_detector, init_detector
    from mmdet.utils import register_all_modules
    from vit_backbones.runtime import allow_mmengine_checkpoints
    register_all_modules()
    allow_mmengine_checkpoints()
    model = init_detector(det_run['cfg'], ckpt, device='cpu')
    by_id = {p['img_id']: p for p in preds}
    data_root = helpers_data(det_run)
    for img_id, name in ((1, 'val_000.png'), (2, 'val_001.png')):
        ref = inference_detector(model, osp.join(data_root, 'val', name)).pred_instances
        got = by_id[img_id]['pred_instances']
        assert len(got['scores']) == len(ref.scores) > 0
        assert torch.allclose(got['scores'], ref.scores, atol=1e-5)
        assert torch.allclose(got['bboxes'], ref.bboxes, atol=1e-3)


def test_seg_swin_amp_train_and_test(tmp_path):
    """mmseg through the same tools, with our Swin backbone (no custom_imports) and --amp (bf16 on CPU)."""
    data = make_tiny_seg(str(tmp_path / 'data'), num_train=4, num_val=2)
    swin = dict(type='Swin', arch=dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
                window_size=2, out_indices=(3, ), drop_path_rate=0.0)
    cfg = tiny_seg_config(data, max_iters=2, ckpt_interval=2, record_dir=str(tmp_path / 'rec'), backbone=swin,
                          backbone_channels=128)
    assert 'custom_imports' not in cfg or cfg.custom_imports.imports == ['helpers']
    cfg_path = write_config(cfg, str(tmp_path / 'seg_cfg.py'))
    work = tmp_path / 'work'
    run_tool([TRAIN, cfg_path, '--work-dir', str(work), '--amp'])
    record = json.loads((tmp_path / 'rec' / 'rank0.json').read_text())
    assert record['iters'] == [1, 2]
    assert record['forward_dtypes'] and set(record['forward_dtypes']) == {'torch.bfloat16'}
    ckpt = load_ckpt(str(work / 'iter_2.pth'))
    assert "type='BF16AutocastOptimWrapper'" in ckpt['meta']['cfg']
    assert any(k.startswith('backbone.') for k in ckpt['state_dict'])
    assert all(v.dtype == torch.float32 for v in ckpt['state_dict'].values() if v.is_floating_point())

    out, show = tmp_path / 'pred_png', tmp_path / 'show'
    proc = run_tool([TEST, cfg_path, str(work / 'iter_2.pth'), '--work-dir', str(tmp_path / 'test_work'), '--out',
                     str(out), '--show-dir', str(show)])
    assert 'mIoU' in proc.stdout + proc.stderr
    assert sorted(os.listdir(out)) == ['000.png', '001.png']
    label = cv2.imread(str(out / '000.png'), cv2.IMREAD_UNCHANGED)
    assert label.shape == (64, 64) and set(np.unique(label)) <= {0, 1, 2}
    assert len(os.listdir(show / 'vis_data' / 'vis_image')) == 2


_RSS_AFTER_FREE = r'''
import os
import torch
from vit_backbones.runtime import keep_freed_memory
print(keep_freed_memory())
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
base = rss()
x = torch.ones(64 * 2**20)  # 256 MiB, above glibc's largest dynamic mmap threshold (32 MiB)
del x
print('KEPT_MIB', (rss() - base) >> 20)
'''


@pytest.mark.parametrize('choice', ['keep', 'default'])
def test_keep_freed_memory(choice, tmp_path):
    """keep_freed_memory (what our tools run with): a freed 256 MiB buffer stays in the process for reuse
    instead of being unmapped; VIT_BACKBONES_MALLOC=default leaves glibc as it is (the buffer is returned)."""
    script = tmp_path / 'rss.py'
    script.write_text(_RSS_AFTER_FREE)
    proc = run_tool([str(script)], env_extra={'VIT_BACKBONES_MALLOC': choice})
    kept = int(proc.stdout.split('KEPT_MIB')[1])
    if choice == 'keep':
        assert 'freed memory kept for reuse' in proc.stdout and kept >= 200
    else:
        assert 'glibc defaults' in proc.stdout and kept < 50
    bad = run_tool([str(script)], env_extra={'VIT_BACKBONES_MALLOC': 'sometimes'}, check=False)
    assert bad.returncode != 0 and 'use "keep"' in bad.stderr


def test_train_tool_keeps_freed_memory(det_run):
    """tools/train.py sets malloc up to reuse freed memory and says so in its log."""
    assert 'malloc: freed memory kept for reuse' in det_run['proc'].stdout
