"""Our backbones against every implementation users would pick instead, interleaved in one process.

Used by ``tools/benchmark.py --peers mmdet,timm,hf [--models swin,pvtv2,...]`` (see its ``--help``):

    python tools/benchmark.py --peers all --models swin,pvtv2 --threads 2
    python ../shared/tools/with_timm.py tools/benchmark.py --peers mmdet,timm,hf --models levit --sizes 224x224x8
    python tools/benchmark.py --peers hf --models cvt --passes eval --dtypes fp32 --pairs 3

Peers (only those that exist for a model; otherwise the column says why not):
  * ``mmdet``: mmdet ``SwinTransformer`` / ``PyramidVisionTransformer(V2)``, and for ViT/DeiT mmseg's
    ``VisionTransformer`` (trunk) and mmseg's recipe ``VisionTransformer + Feature2Pyramid`` (``mmseg+neck``,
    against ours with its deconvolution pyramid);
  * ``timm``: ``timm.create_model(name, pretrained=False, features_only=True)`` built for the cell's input
    size, when ``import timm`` works (else the column says 'timm not importable');
  * ``hf``: HF transformers ``SwinBackbone``, ``PvtV2Backbone``, ``PvtModel``, ``CvtModel``, ``LevitModel``,
    ``ViTModel`` (also for DeiT-S: the hub's non-distilled DeiT checkpoints are ``ViTModel``s) built from a
    config with random weights (no download).

Plain models (ViT, DeiT, CaiT) run trunk against trunk (ours: ``forward_features``, the tapped block
outputs; peers: their tapped blocks) plus ours with its pyramid against mmseg's recipe.

Weights: ours is built with the seeded default initialisation; every peer then gets exactly those values
through the inverse of our checkpoint converter (``convert_checkpoint`` accepts the timm / HF / mmdet
layouts; the inverse is found by converting a checkpoint whose entries are their own indices), so all
implementations compute with the same weights. The tool prints, per peer, the share of its tensors set
this way; what is left (a layout without a converter, an extra token, mmseg's neck) keeps the peer's own
initialisation, and the line says so.

Cells: input size x pass (``train`` = forward + backward of the sum of the outputs' means, ``eval`` =
``no_grad`` forward) x dtype (``fp32``, ``bf16`` = ``torch.autocast`` bfloat16). Per cell every
implementation first runs one untimed step (its peak memory: the growth of the resident set over the
step after ``malloc_trim`` and a reset of the high-water mark, ``/proc/self/clear_refs``; on CUDA the
allocator's peak), then ``--pairs`` rounds of one timed step each, in an order rotated every round. The
ratio of a round is peer time / our time (>1: ours is faster); the cell reports the median of the
per-round ratios with their min and max (with ``--warmup N`` the memory is taken on the last of N
untimed steps; ``--cell-budget S`` adds rounds while they fit in S seconds, up to ``--max-pairs``).
Our share of the matmul peak: our forward FLOPs
(``torch.utils.flop_counter.FlopCounterMode``; x3 for training: backward = 2x forward) per our median
step time, over the rate of an n^3 matmul (``--peak-n``, default 2048) in the cell's dtype measured just
before and after the cell (the larger of the two).
"""
import contextlib
import ctypes
import gc
import json
import os
import re
import statistics
import time
from typing import Callable, Dict, Optional

import torch
from torch import nn

import vit_backbones
from vit_backbones.models.base import resolve_arch

DET = ((224, 224, 8), (800, 1216, 1))
SEG = ((224, 224, 8), (512, 512, 2))
PEERS = ('mmdet', 'timm', 'hf')


class Unavailable(Exception):
    """This peer has no such model / cannot run this cell; the message is what the column says."""


try:  # timm imports torchvision; run through ../shared/tools/with_timm.py where torchvision cannot load
    import timm
    TIMM_ERROR = None
except Exception as e:  # noqa: BLE001 - any failure means: not importable here
    timm, TIMM_ERROR = None, f'{type(e).__name__}: {e}'


class Outputs(nn.Module):
    """A peer model whose forward returns the list of tensors its users take (HF output objects unpacked)."""

    def __init__(self, net: nn.Module, pick: Callable, call_kwargs: Optional[dict] = None):
        super().__init__()
        self.net, self.pick, self.call_kwargs = net, pick, dict(call_kwargs or {})

    def forward(self, x):
        return list(self.pick(self.net(x, **self.call_kwargs)))


class OursTrunk(nn.Module):
    """Our plain backbone's trunk: the tapped block outputs (token sequences) without the pyramid."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.forward_features(x)[0]


def _hf():
    import transformers
    return transformers


def _timm(name, size, **kw):
    if timm is None:
        raise Unavailable('timm not importable')
    return timm.create_model(name, pretrained=False, features_only=True, **kw)


# ------------------------------------------------------------------ peers, from our hyper-parameters
def _swin(peer, cfg, size, dp):
    heads, depths, dim, ws = tuple(cfg['num_heads']), tuple(cfg['depths']), cfg['embed_dims'], cfg['window_size']
    if peer == 'mmdet':
        from mmdet.models.backbones import SwinTransformer
        return SwinTransformer(embed_dims=dim, depths=depths, num_heads=heads, window_size=ws, drop_path_rate=dp,
                               out_indices=(0, 1, 2, 3)), 'mmdet SwinTransformer'
    if peer == 'timm':
        return _timm('swin_tiny_patch4_window7_224', size, img_size=size[:2], embed_dim=dim, depths=depths,
                     num_heads=heads, window_size=ws, drop_path_rate=dp), \
        'timm swin_tiny_patch4_window7_224 (NHWC maps)'
    T = _hf()
    conf = T.SwinConfig(image_size=list(size[:2]), embed_dim=dim, depths=list(depths), num_heads=list(heads),
                        window_size=ws, drop_path_rate=dp, out_features=['stage1', 'stage2', 'stage3', 'stage4'])
    return Outputs(T.SwinBackbone(conf), lambda o: o.feature_maps), 'HF SwinBackbone'


def _pvtv2(peer, cfg, size, dp):
    dims, heads, depths = tuple(cfg['embed_dims']), tuple(cfg['num_heads']), tuple(cfg['depths'])
    mlp, sr, linear = tuple(cfg['mlp_ratios']), tuple(cfg['sr_ratios']), bool(cfg['linear'])
    if peer == 'mmdet':
        from mmdet.models.backbones import PyramidVisionTransformerV2
        base = dims[0] // heads[0]
        if any(d != base * h for d, h in zip(dims, heads)):
            raise Unavailable('mmdet PVTv2 needs embed_dims = base * num_heads per stage')
        if linear:
            raise Unavailable('mmdet PVTv2 has no linear (-li) attention')
        return PyramidVisionTransformerV2(embed_dims=base, num_layers=depths, num_heads=heads, sr_ratios=sr,
                                          mlp_ratios=mlp, drop_path_rate=dp), 'mmdet PyramidVisionTransformerV2'
    if peer == 'timm':
        return _timm('pvt_v2_b2', size, embed_dims=dims, depths=depths, num_heads=heads, sr_ratios=sr,
                     mlp_ratios=mlp, linear=linear, drop_path_rate=dp), 'timm pvt_v2_b2'
    T = _hf()
    conf = T.PvtV2Config(hidden_sizes=list(dims), depths=list(depths), num_attention_heads=list(heads),
                         sr_ratios=list(sr), mlp_ratios=list(mlp), linear_attention=linear, drop_path_rate=dp,
                         out_features=['stage1', 'stage2', 'stage3', 'stage4'])
    return Outputs(T.PvtV2Backbone(conf), lambda o: o.feature_maps), 'HF PvtV2Backbone'


def _pvt(peer, cfg, size, dp):
    dims, heads, depths = tuple(cfg['embed_dims']), tuple(cfg['num_heads']), tuple(cfg['depths'])
    mlp, sr = tuple(cfg['mlp_ratios']), tuple(cfg['sr_ratios'])
    if peer == 'mmdet':
        from mmdet.models.backbones import PyramidVisionTransformer
        base = dims[0] // heads[0]
        if any(d != base * h for d, h in zip(dims, heads)):
            raise Unavailable('mmdet PVT needs embed_dims = base * num_heads per stage')
        return PyramidVisionTransformer(embed_dims=base, num_layers=depths, num_heads=heads, sr_ratios=sr,
                                        mlp_ratios=mlp, drop_path_rate=dp), 'mmdet PyramidVisionTransformer'
    if peer == 'timm':
        raise Unavailable('timm has no PVT v1')
    if size[0] != size[1]:
        raise Unavailable('HF PvtModel: square inputs only')  # its position-embedding resize assumes a square
    # built for the input size: its last stage's position embedding (with the class token) is not resampled
    T = _hf()
    conf = T.PvtConfig(image_size=size[0], hidden_sizes=list(dims), depths=list(depths),
                       num_attention_heads=list(heads), sequence_reduction_ratios=list(sr), mlp_ratios=list(mlp),
                       drop_path_rate=dp)
    return Outputs(T.PvtModel(conf), lambda o: [o.last_hidden_state]), 'HF PvtModel (last stage)'


def _levit(peer, cfg, size, dp):
    dims, heads, depths, kd = tuple(cfg['embed_dims']), tuple(cfg['num_heads']), tuple(cfg['depths']), cfg['key_dim']
    if peer == 'mmdet':
        raise Unavailable('no LeViT in mmdet/mmseg')
    if peer == 'timm':
        return _timm('levit_256', size, img_size=size[:2], embed_dim=dims, key_dim=kd, num_heads=heads, depth=depths,
                     attn_ratio=cfg['attn_ratio'], mlp_ratio=cfg['mlp_ratio'], drop_path_rate=dp), 'timm levit_256'
    if size[0] != size[1]:
        raise Unavailable('HF LevitModel: square inputs only')  # LevitConfig.image_size is one int
    T = _hf()
    down = [['Subsample', kd, dims[i] // kd, cfg['shrink_attn_ratio'], cfg['shrink_mlp_ratio'], 2] for i in range(2)]
    conf = T.LevitConfig(image_size=size[0], hidden_sizes=list(dims), num_attention_heads=list(heads),
                         depths=list(depths), key_dim=[kd] * 3, attention_ratio=[cfg['attn_ratio']] * 3,
                         mlp_ratio=[cfg['mlp_ratio']] * 3,
                         down_ops=down)
    net = T.LevitModel(conf)
    for m in net.modules():  # LevitConfig.drop_path_rate is typed int (0.2 is refused): set the layers' rate
        if type(m).__name__ == 'LevitResidualLayer':
            m.drop_rate = dp
    return Outputs(net, lambda o: o.hidden_states[1:], dict(output_hidden_states=True)), \
        'HF LevitModel (stage outputs)'


def _cvt(peer, cfg, size, dp):
    if peer == 'mmdet':
        raise Unavailable('no CvT in mmdet/mmseg')
    if peer == 'timm':
        raise Unavailable('timm has no CvT')
    T = _hf()
    conf = T.CvtConfig(embed_dim=list(cfg['embed_dims']), depth=list(cfg['depths']), num_heads=list(cfg['num_heads']),
                       mlp_ratio=[cfg['mlp_ratio']] * 3, drop_path_rate=[0., 0., dp])
    net = T.CvtModel(conf, add_pooling_layer=False)
    return Outputs(net, lambda o: o.hidden_states, dict(output_hidden_states=True)), 'HF CvtModel (stage outputs)'


class MmsegRecipe(nn.Module):
    """mmseg's ViT recipe: VisionTransformer (tapped blocks) then the Feature2Pyramid neck (BN)."""

    def __init__(self, backbone, embed_dims):
        super().__init__()
        from mmseg.models.necks import Feature2Pyramid
        self.backbone = backbone
        self.neck = Feature2Pyramid(embed_dims, rescales=[4, 2, 1, 0.5], norm_cfg=dict(type='BN', requires_grad=True))

    def forward(self, x):
        return tuple(self.neck(self.backbone(x)))


def _plain(timm_name):
    def build(peer, cfg, size, dp):
        dim, depth, heads, taps = cfg['embed_dims'], cfg['depth'], cfg['num_heads'], cfg['taps']
        if timm_name.startswith('cait'):
            if peer.startswith('mmdet'):
                raise Unavailable('no CaiT in mmdet/mmseg')
            if peer == 'hf':
                raise Unavailable('HF transformers has no CaiT')
            return _timm(timm_name, size, img_size=size[:2], embed_dim=dim, depth=depth, num_heads=heads,
                         init_values=cfg['init_values'], out_indices=taps, drop_path_rate=dp), f'timm {timm_name}'
        mlp = cfg['mlp_ratio']
        mlp = int(mlp) if float(mlp).is_integer() else mlp  # mmcv's FFN needs an int hidden width
        if peer in ('mmdet', 'mmdet+neck'):
            from mmseg.models.backbones import VisionTransformer
            trunk = VisionTransformer(img_size=size[:2], patch_size=16, embed_dims=dim, num_layers=depth,
                                      num_heads=heads, mlp_ratio=mlp, out_indices=taps, qkv_bias=True,
                                      drop_path_rate=dp,
                                      norm_cfg=dict(type='LN', eps=1e-6), final_norm=True, interpolate_mode='bicubic')
            if peer == 'mmdet':
                return trunk, 'mmseg VisionTransformer (trunk)'
            return MmsegRecipe(trunk, dim), 'mmseg VisionTransformer + Feature2Pyramid'
        if peer == 'timm':
            return _timm(timm_name, size, img_size=size[:2], embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp,
                         out_indices=taps, drop_path_rate=dp), f'timm {timm_name} (trunk)'
        T = _hf()
        conf = T.ViTConfig(image_size=list(size[:2]), hidden_size=dim, num_hidden_layers=depth,
                           num_attention_heads=heads, intermediate_size=int(dim * mlp), layer_norm_eps=1e-6)
        pick = lambda o, taps=tuple(taps): [o.hidden_states[t + 1] for t in taps]  # noqa: E731
        return Outputs(T.ViTModel(conf, add_pooling_layer=False), pick, dict(output_hidden_states=True)), \
            'HF ViTModel (trunk, no stochastic depth)'
    return build


#: --models key -> label, our backbone and arch, extra kwargs for ours, default sizes, peer builder,
#: plain (trunk vs trunk + ours with its pyramid vs mmseg's recipe)
MODELS = {
    'swin': dict(label='Swin-T', name='Swin', arch='tiny', sizes=DET, build=_swin, defaults=dict(window_size=7)),
    'pvtv2': dict(label='PVT v2-b2', name='PVTv2', arch='b2', sizes=DET, build=_pvtv2),
    'pvt': dict(label='PVT-S', name='PVT', arch='small', sizes=DET, build=_pvt),
    'levit': dict(label='LeViT-256', name='LeViT', arch='256', sizes=DET, build=_levit, size_kw='img_size'),
    'vit': dict(label='ViT-B/16', name='ViT', arch='base', sizes=SEG, build=_plain('vit_base_patch16_224'),
                size_kw='img_size', plain=True),
    'deit': dict(label='DeiT-S/16', name='DeiT', arch='small', sizes=SEG, build=_plain('deit_small_patch16_224'),
                 size_kw='img_size', plain=True),
    'cait': dict(label='CaiT-S24', name='CaiT', arch='s24', sizes=SEG, build=_plain('cait_s24_224'),
                 size_kw='img_size', plain=True),
    'cvt': dict(label='CvT-13', name='CvT', arch='13', sizes=DET, build=_cvt),
}


def resolve(model: str, arch=None):
    """(spec, our hyper-parameters) for a --models key; ``arch``: a variant name or an override dict."""
    if model not in MODELS:
        raise SystemExit(f'unknown model {model!r} for --peers; choose from {", ".join(MODELS)}')
    spec = MODELS[model]
    cls = vit_backbones.get_backbone_class(spec['name'])
    extra = dict(spec.get('defaults', {}))
    if isinstance(arch, dict):  # overrides of our hyper-parameters (and of the defaults, e.g. window_size)
        arch = dict(arch)
        extra.update({k: arch.pop(k) for k in list(arch) if k in extra})
        arch.setdefault('base', spec['arch'])
    name, cfg = resolve_arch(arch or spec['arch'], cls.arch_zoo, spec['name'], getattr(cls, 'arch_aliases', None))
    cfg = dict(extra, **cfg)
    if spec.get('plain'):  # the peers tap the blocks our pyramid uses
        cfg['taps'] = tuple(build_ours(spec, name, cfg, (224, 224, 1), 0.).block_indices)
    return spec, name, cfg


def build_ours(spec, arch_name, cfg, size, dp):
    kw = {k: cfg[k] for k in spec.get('defaults', {})}
    if spec.get('size_kw'):
        kw[spec['size_kw']] = tuple(size[:2])
    zoo_cfg = {k: v for k, v in cfg.items() if k not in spec.get('defaults', {}) and k != 'taps'}
    return vit_backbones.build_backbone(spec['name'], dict(zoo_cfg), drop_path_rate=dp, **kw)


# ------------------------------------------------------------------ the same weights everywhere
def _float_items(sd):
    return [(k, v) for k, v in sd.items() if v.is_floating_point()]


def _convert(ours, sd):
    try:
        return ours.convert_checkpoint(dict(sd))
    except Exception:  # noqa: BLE001 - mmseg layouts are recognised under a segmentor's prefix
        return ours.convert_checkpoint({'backbone.' + k: v for k, v in sd.items()})


def _canonical_keys(net: nn.Module, sd: dict) -> dict:
    """The model's own key names under timm's feature wrappers (FeatureGetterNet: ``model.``;
    FeatureListNet flattens ``layers.0`` to ``layers_0``), so that our converter recognises the layout."""
    kind = type(net).__name__
    if kind == 'FeatureGetterNet':
        return {k[len('model.'):] if k.startswith('model.') else k: v for k, v in sd.items()}
    if kind in ('FeatureListNet', 'FeatureDictNet'):
        return {re.sub(r'^([A-Za-z]+)_(\d+)\.', r'\1.\2.', k): v for k, v in sd.items()}
    return sd


def share_weights(ours: nn.Module, peer: nn.Module) -> str:
    """Give ``peer`` our weights through the inverse of our converter; returns what was shared."""
    target = peer.backbone if isinstance(peer, MmsegRecipe) else peer
    target = target.net if isinstance(target, Outputs) else target
    raw = target.state_dict()
    canon = _canonical_keys(target, raw)
    names = dict(zip(canon, raw))  # canonical -> the wrapper's own key
    psd = canon
    items = _float_items(psd)
    sizes = [v.numel() for _, v in items]
    total = sum(sizes)
    tagged, off = dict(psd), 0
    for (k, v), n in zip(items, sizes):  # every entry = its own index + 1 (exact in float64 up to 2**53)
        tagged[k] = (torch.arange(n, dtype=torch.float64) + off + 1).view(v.shape)
        off += n
    try:
        converted, fmt, _ = _convert(ours, tagged)
    except Exception as e:  # noqa: BLE001
        return f'weights differ (our converter does not read this layout: {type(e).__name__}: {str(e)[:120]})'
    own = ours.state_dict()
    flat = torch.cat([v.detach().reshape(-1).float() for _, v in items]) if items else torch.zeros(0)
    hit = torch.zeros(total, dtype=torch.bool)
    ours_total = sum(v.numel() for _, v in _float_items(own))
    ours_mapped = 0
    for k, v in converted.items():
        if k not in own or tuple(v.shape) != tuple(own[k].shape) or v.dtype != torch.float64:
            continue
        idx = v.reshape(-1)
        if not bool(((idx == idx.round()) & (idx >= 1) & (idx <= total)).all()):
            continue  # computed, not moved (e.g. resampled): not an inverse we can use
        idx = idx.long() - 1
        flat[idx] = own[k].detach().reshape(-1).float()
        hit[idx] = True
        ours_mapped += v.numel()
    left = sorted({re.sub(r'\.\d+\.', '.N.', k) for (k, _), n, o in zip(items, sizes, _offsets(sizes))
                   if not bool(hit[o:o + n].all())})
    new, off = dict(psd), 0
    for (k, v), n in zip(items, sizes):
        new[k] = flat[off:off + n].view(v.shape).to(v.dtype)
        off += n
    target.load_state_dict({names[k]: v for k, v in new.items()})
    share = hit.sum().item() / max(total, 1)
    rest = '' if share == 1 else f'; the rest keeps its own initialisation ({", ".join(left[:3])}' + (
        ', ...)' if len(left) > 3 else ')')
    unmapped_pyr = [k for k in own if k.startswith('pyramid.')]
    if unmapped_pyr and not isinstance(peer, MmsegRecipe):
        rest += "; ours' pyramid is not part of the trunk"
        ours_total -= sum(own[k].numel() for k in unmapped_pyr if own[k].is_floating_point())
    if isinstance(peer, MmsegRecipe):
        rest += '; the Feature2Pyramid neck keeps its own weights (no converter)'
    return (f'{_pct(share)} of its float tensors set from ours ({fmt} layout; {_pct(ours_mapped / ours_total)} '
            f'of ours){rest}')


def _offsets(sizes):
    out, off = [], 0
    for n in sizes:
        out.append(off)
        off += n
    return out


def _pct(share):
    return '100%' if share >= 1 else f'{min(100 * share, 99.9):.1f}%'


# ------------------------------------------------------------------ measurement
def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


try:
    _LIBC = ctypes.CDLL('libc.so.6')
except OSError:
    _LIBC = None


def _proc_kb(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak memory growth over a block: CUDA allocator peak, or on Linux the resident set's high-water mark
    after freeing what the C allocator caches (``malloc_trim``) and resetting the mark (``clear_refs``)."""

    def __init__(self, device):
        self.device, self.mb = device, float('nan')

    def __enter__(self):
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            self.base = _proc_kb('VmRSS')
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.base is not None:
            self.mb = (_proc_kb('VmHWM') - self.base) / 1024
        return False


def matmul_rate(dtype, device, n=2048, repeats=5):
    a = torch.randn(n, n, device=device).to(dtype)
    a @ a
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def forward_flops(net: nn.Module, size, device) -> float:
    """FLOPs of one forward of ``net`` at ``size`` (matmuls, convolutions, attention), counted at batch 1."""
    from torch.utils.flop_counter import FlopCounterMode
    h, w, b = size
    counter = FlopCounterMode(display=False)
    was = net.training
    net.eval()
    with torch.no_grad(), counter:
        net(torch.randn(1, 3, h, w, device=device))
    net.train(was)
    return counter.get_total_flops() * b


def make_step(net, mode, dtype, x, device):
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == 'bf16' else contextlib.nullcontext
    if mode == 'eval':
        def step():
            with torch.no_grad(), ctx():
                net(x)
        return step
    params = [p for p in net.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        with ctx():
            outs = net(x)
        sum(o.float().mean() for o in outs).backward()
    return step


def timed(step, device):
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def run_cell(impls: Dict[str, nn.Module], mode, dtype, size, pairs, warmup, device, budget_s=0., max_pairs=0):
    """impls: name -> module (already on the device). Returns name -> dict(times_ms, peak_mb) or error.
    At least ``pairs`` rounds; with ``budget_s`` more while another round fits in that many seconds of
    timed rounds (up to ``max_pairs``)."""
    h, w, b = size
    torch.manual_seed(1)
    x = torch.randn(b, 3, h, w, device=device)
    steps, res = {}, {}
    for name, net in impls.items():
        net.train(mode == 'train')
        step = make_step(net, mode, dtype, x, device)
        try:
            for _ in range(warmup - 1):
                step()
            with PeakMemory(device) as mem:  # the last warm-up step
                step()
        except Exception as e:  # noqa: BLE001 - a peer that fails at run time: say so, keep the others
            res[name] = dict(error=f'failed: {type(e).__name__}: {str(e)[:160]}')
            continue
        steps[name] = step
        res[name] = dict(times_ms=[], peak_mb=mem.mb)
    names = list(steps)
    r, spent, last = 0, 0., 0.
    while names and (r < pairs or (budget_s and spent + last <= budget_s and (not max_pairs or r < max_pairs))):
        order = names[r % len(names):] + names[:r % len(names)]
        t0 = time.perf_counter()
        for name in order:
            res[name]['times_ms'].append(1000 * timed(steps[name], device))
        last = time.perf_counter() - t0
        spent += last
        r += 1
    for name in names:
        res[name]['median_ms'] = statistics.median(res[name]['times_ms']) if r else float('nan')
    return res


def ratio_stats(peer, ref):
    ratios = sorted(a / o for a, o in zip(peer['times_ms'], ref['times_ms']))
    if not ratios:
        return None
    return dict(median=statistics.median(ratios), min=ratios[0], max=ratios[-1], n=len(ratios))


# ------------------------------------------------------------------ the run
def _is_big(size):
    return size[0] * size[1] * size[2] > 224 * 224 * 8


def _fmt_ratio(r):
    return f'{r["median"]:.2f}x [{r["min"]:.2f}-{r["max"]:.2f}]'


def _cell_text(cell, peer):
    entry = cell['peers'].get(peer)
    if entry is None:
        return '-'
    if 'ratio' in entry:
        return _fmt_ratio(entry['ratio'])
    return entry['why']


def cpu_description():
    model, flags = '?', set()
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name') and model == '?':
                    model = line.split(':', 1)[1].strip()
                elif line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
    wanted = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile') if f in flags]
    return model, wanted


def run(args):
    """--peers mode of tools/benchmark.py."""
    device = torch.device(args.device)
    peers = [p.strip().lower() for p in (args.peers or 'all').split(',') if p.strip()]
    peers = list(PEERS) if peers == ['all'] else ['mmdet' if p == 'mmseg' else p for p in peers]
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise SystemExit(f'unknown peer(s) {bad}; choose from {", ".join(PEERS)} or all')
    models = [m.strip().lower() for m in (args.models or args.model).split(',') if m.strip()]
    passes = [p.strip() for p in args.passes.split(',')]
    dtypes = [d.strip() for d in ('fp32' if args.no_bf16 else args.dtypes).split(',')]
    if set(passes) - {'train', 'eval'} or set(dtypes) - {'fp32', 'bf16'}:
        raise SystemExit('--passes takes train,eval and --dtypes fp32,bf16')
    arch = args.arch
    if arch and arch.strip().startswith('{'):
        arch = json.loads(arch)
    cpu, flags = cpu_description()
    print(f'# CPU: {cpu}; flags: {" ".join(flags) or "none of avx2/avx512f/avx512_bf16/amx_bf16"}; '
          f'threads {torch.get_num_threads()}; torch {torch.__version__}; device {device}', flush=True)
    print(f'# timm: {"timm " + timm.__version__ if timm else "not importable (" + TIMM_ERROR + ")"}; '
          f'transformers {_hf().__version__}; rounds per cell: at least {args.pairs} (inputs above 224x224x8: '
          f'{args.big_pairs})' + (f', more while they fit in {args.cell_budget:g} s (at most {args.max_pairs})'
                                  if args.cell_budget else '') + f'; drop path {args.drop_path}', flush=True)
    results = []
    per_model = isinstance(arch, dict) and bool(arch) and set(arch) <= set(MODELS)
    for model in models:
        spec, arch_name, cfg = resolve(model, arch.get(model) if per_model else arch)
        sizes = [tuple(int(v) for v in s.split('x')) for s in args.sizes.split(',')] if args.sizes else spec['sizes']
        for size in sizes:
            results += run_model_size(model, spec, arch_name, cfg, size, peers, passes, dtypes, args, device)
    print_tables(results, peers)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(cpu=cpu, flags=flags, threads=torch.get_num_threads(), torch=torch.__version__,
                           timm=timm.__version__ if timm else None, timm_error=TIMM_ERROR, cells=results), f, indent=1)
    return results


def run_model_size(model, spec, arch_name, cfg, size, peers, passes, dtypes, args, device):
    h, w, b = size
    plain = bool(spec.get('plain'))
    label = f'{spec["label"]}' + ('' if arch_name == spec['arch'] else f' ({arch_name})')
    torch.manual_seed(0)
    ours = build_ours(spec, arch_name, cfg, size, args.drop_path).to(device)
    impls = {'ours': OursTrunk(ours) if plain else ours}
    if plain:
        impls['ours+pyramid'] = ours
    why, notes = {}, {}
    for peer in peers:
        for name in ([peer, peer + '+neck'] if plain and peer == 'mmdet' else [peer]):
            try:
                torch.manual_seed(0)
                net, desc = spec['build'](name, cfg, size, args.drop_path)
                notes[name] = f'{desc}: {share_weights(ours, net)}'
                impls[name] = net.to(device)
            except Unavailable as e:
                why[name] = str(e)
            except Exception as e:  # noqa: BLE001 - say exactly what failed, run the others
                why[name] = f'failed to build: {type(e).__name__}: {str(e)[:200]}'
    print(f'\n## {label} {h}x{w} b{b}', flush=True)
    for name, note in notes.items():
        print(f'#   {name}: {note}', flush=True)
    for name, reason in why.items():
        print(f'#   {name}: {reason}', flush=True)
    flops = {}
    for ref in ('ours', 'ours+pyramid') if plain else ('ours',):
        try:
            flops[ref] = forward_flops(impls[ref], size, device)
        except Exception as e:  # noqa: BLE001
            print(f'#   FLOPs of {ref} not counted: {type(e).__name__}: {e}', flush=True)
    print('#   our forward GFLOPs: ' + ', '.join(f'{k} {v / 1e9:.3g}' for k, v in flops.items()), flush=True)
    pairs = args.big_pairs if _is_big(size) else args.pairs
    cells = []
    for mode in passes:
        for dtype in dtypes:
            tdtype = torch.bfloat16 if dtype == 'bf16' else torch.float32
            rate0 = matmul_rate(tdtype, device, args.peak_n)
            res = run_cell(impls, mode, dtype, size, pairs, max(args.warmup, 1), device, args.cell_budget,
                           args.max_pairs)
            rate1 = matmul_rate(tdtype, device, args.peak_n)
            peak = max(rate0, rate1)
            done = max((len(v.get('times_ms', ())) for v in res.values()), default=0)
            cell = dict(model=model, label=label, size=list(size), mode=mode, dtype=dtype, pairs=done,
                        matmul_gflops=[rate0, rate1], impls=res, peers={}, peak_fraction={}, flops=flops)
            for ref in flops:
                r = res.get(ref, {})
                if r.get('median_ms'):
                    work = flops[ref] * (3 if mode == 'train' else 1)  # backward = 2x forward
                    cell['peak_fraction'][ref] = work / (r['median_ms'] / 1e3) / (peak * 1e9)
            for name in [n for p in peers for n in ([p, p + '+neck'] if plain and p == 'mmdet' else [p])]:
                ref = 'ours+pyramid' if name.endswith('+neck') else 'ours'
                if name in why:
                    cell['peers'][name] = dict(why=why[name])
                elif 'error' in res[name]:
                    cell['peers'][name] = dict(why=res[name]['error'])
                elif 'error' in res[ref]:
                    cell['peers'][name] = dict(why=f'ours {res[ref]["error"]}')
                else:
                    st = ratio_stats(res[name], res[ref])
                    cell['peers'][name] = dict(ratio=st, ref=ref) if st else dict(why='no timed pairs')
            print_cell(cell)
            cells.append(cell)
    del impls, ours
    gc.collect()
    return cells


def _ms(r):
    return f'{r["median_ms"]:.0f} ms' if r and r.get('median_ms') == r.get('median_ms') and 'median_ms' in r else '-'


def _mb(r):
    return f'{r["peak_mb"]:.0f}' if r and 'peak_mb' in r and r['peak_mb'] == r['peak_mb'] else '-'


def print_cell(cell):
    h, w, b = cell['size']
    res = cell['impls']
    peak = max(cell['matmul_gflops'])
    head = f'{cell["label"]} {h}x{w} b{b} {cell["mode"]} {cell["dtype"]}'
    fr = ', '.join(f'{k} {100 * v:.0f}%' for k, v in cell['peak_fraction'].items())
    ours = ', '.join(f'{k} {_ms(res[k])} (+{_mb(res[k])} MB)' for k in ('ours', 'ours+pyramid') if k in res)
    print(f'{head}: {ours}; of the {cell["dtype"]} matmul peak ({peak:.0f} GFLOP/s; before/after '
          f'{cell["matmul_gflops"][0]:.0f}/{cell["matmul_gflops"][1]:.0f}): {fr or "-"}', flush=True)
    for name, entry in cell['peers'].items():
        if 'ratio' in entry:
            r = res[name]
            print(f'    {name:11s} {_fmt_ratio(entry["ratio"])} vs {entry["ref"]} ({entry["ratio"]["n"]} rounds), '
                  f'{_ms(r)}, peak +{_mb(r)} MB', flush=True)
        else:
            print(f'    {name:11s} {entry["why"]}', flush=True)


def print_tables(cells, peers):
    """One markdown table per model: a row per cell, a column per peer (ratio peer / ours, median [min-max])."""
    by_model = {}
    for c in cells:
        by_model.setdefault(c['label'], []).append(c)
    for label, rows in by_model.items():
        names = list(rows[0]['peers'])
        refs = [r for r in ('ours', 'ours+pyramid') if r in rows[0]['impls']]
        print(f'\n### {label}: peer time / our time, median of paired rounds [min-max]')
        head = ['input', 'pass', 'dtype', 'rounds'] + [f'{r} ms' for r in refs] + names + \
            [f'{r} % of matmul peak' for r in refs] + ['peak MB ' + ' / '.join(refs + names)]
        print('| ' + ' | '.join(head) + ' |')
        print('|' + '---|' * len(head))
        for c in rows:
            h, w, b = c['size']
            res = c['impls']
            cols = [f'{h}x{w} b{b}', c['mode'], c['dtype'], str(c['pairs'])]
            cols += [_ms(res.get(r)) for r in refs]
            cols += [_cell_text(c, n) for n in names]
            cols += [f'{100 * c["peak_fraction"][r]:.0f}% ({max(c["matmul_gflops"]):.0f})' if r in c['peak_fraction']
                     else '-' for r in refs]
            cols.append(' / '.join(_mb(res.get(n)) for n in refs + names))
            print('| ' + ' | '.join(cols) + ' |')
