"""Class-specific tables of the construction contract, keyed by class name.

mmdet's keyword names: a backbone dict of an mmdet config builds ours by changing ``type`` alone
(``dict(type='Swin', embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, ...)``
is our Swin-T). For each of our classes with an mmdet counterpart (Swin: mmdet's ``SwinTransformer``; PVT
and PVTv2: ``PyramidVisionTransformer(V2)``):

* a keyword that names one of our hyper-parameters (Swin's ``depths``, PVT's ``num_layers``) becomes an
  override of ``arch`` (of the ``arch`` given, or of the class default, which for these three classes is
  mmdet's default too);
* a keyword that renames one of our arguments (``in_channels``) is renamed;
* a keyword whose only value we implement is what our model does anyway (``patch_norm=True``, PVT v2's
  ``use_conv_ffn=True``) is accepted at that value and refused at any other;
* a keyword that changes nothing in our model (``convert_weights``: our loader recognises the official,
  timm, HF and mmdet layouts itself) is dropped.
"""
from typing import Callable, Dict, Mapping

def _tuples(value):
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _gelu(v) -> bool:
    return isinstance(v, Mapping) and v.get('type') == 'GELU' and set(v) <= {'type', 'approximate'} and \
        v.get('approximate', 'none') == 'none'


def _ln(v) -> bool:
    return isinstance(v, Mapping) and v.get('type') == 'LN' and v.get('requires_grad', True) is True


def _ln_eps(ours: str) -> Callable[[dict, object], None]:
    """mmdet's ``norm_cfg=dict(type='LN', eps=e)`` sets every LayerNorm: our ``ours`` argument."""

    def apply(kwargs: dict, value) -> None:
        if not _ln(value):
            raise ValueError(f"norm_cfg={value!r}: only LayerNorm (dict(type='LN', eps=...)) is implemented")
        if 'eps' in value:
            kwargs[ours] = float(value['eps'])
    return apply


_SWIN = dict(
    arch={'embed_dims': 'embed_dims', 'depths': 'depths', 'num_heads': 'num_heads'},
    rename={'in_channels': 'in_chans'},
    fixed={'patch_norm': (True, 'the patch embedding always has its LayerNorm'),
           'use_abs_pos_embed': (False, 'no absolute position embedding (the released Swin models have none)'),
           'strides': ((4, 2, 2, 2), 'stride 4 patch embedding then 2x2 patch merging (set patch_size)'),
           'act_cfg': (_gelu, 'the MLP activation is GELU'),
           'norm_cfg': (_ln, 'the norms are LayerNorms')},
    dropped=('convert_weights', 'pretrain_img_size'),
)


def _pvt(v2: bool) -> dict:
    return dict(
        arch={'embed_dims': 'embed_dims', 'num_layers': 'depths', 'num_heads': 'num_heads', 'sr_ratios': 'sr_ratios',
              'mlp_ratios': 'mlp_ratios'},
        rename={'in_channels': 'in_chans'},
        fixed={'num_stages': (4, 'four stages'),
               'patch_sizes': ((7, 3, 3, 3) if v2 else (4, 2, 2, 2), 'the patch embeddings of the paper'),
               'strides': ((4, 2, 2, 2), 'strides 4, 8, 16, 32'),
               'paddings': ((3, 1, 1, 1) if v2 else (0, 0, 0, 0), 'the patch embeddings of the paper'),
               'use_abs_pos_embed': (not v2, 'v1 has position embeddings, v2 none'),
               'norm_after_stage': (v2, 'v2 normalises each stage output, v1 does not (see out_norm)'),
               'use_conv_ffn': (v2, 'v2 has depthwise-conv MLPs, v1 plain ones'),
               'act_cfg': (_gelu, 'the MLP activation is GELU')},
        special={'norm_cfg': _ln_eps('layer_norm_eps')},
        dropped=('convert_weights', ) + (('pretrain_img_size', ) if v2 else ()),
    )


TABLES: Dict[str, dict] = {'Swin': _SWIN, 'PVT': _pvt(False), 'PVTv2': _pvt(True)}


def _pvt_widths(cls, overrides: dict, arch) -> None:
    """mmdet's PVT ``embed_dims`` is stage 0's width; stage i has ``embed_dims * num_heads[i]``."""
    dims = overrides.get('embed_dims')
    if dims is None or isinstance(dims, tuple):
        return
    heads = overrides.get('num_heads')
    if heads is None:
        from .base import resolve_arch
        base = arch.get('base', cls.default_arch) if isinstance(arch, Mapping) else arch
        heads = (arch if isinstance(arch, Mapping) and 'num_heads' in arch else
                 resolve_arch(base, cls.arch_zoo, cls.__name__, cls.arch_aliases)[1])['num_heads']
    overrides['embed_dims'] = tuple(int(dims) * int(h) for h in heads)


def translate_keywords(cls, kwargs: dict) -> dict:
    """``kwargs`` with the mmdet keyword names of ``cls``'s table (if any) mapped onto ours (module doc)."""
    table = TABLES.get(cls.__name__)
    if table is None or not kwargs:
        return kwargs
    kwargs = dict(kwargs)
    overrides = {ours: _tuples(kwargs.pop(theirs)) for theirs, ours in table['arch'].items() if theirs in kwargs}
    for theirs, ours in table.get('rename', {}).items():
        if theirs in kwargs:
            if ours in kwargs:
                raise ValueError(f'{cls.__name__}: pass {theirs}= (mmdet) or {ours}=, not both')
            kwargs[ours] = kwargs.pop(theirs)
    for key, (want, what) in table.get('fixed', {}).items():
        if key in kwargs:
            value = kwargs.pop(key)
            ok = want(value) if callable(want) else _tuples(value) == want
            if not ok:
                shown = '' if callable(want) else f' (only {want!r})'
                raise ValueError(f'{cls.__name__}: the mmdet keyword {key}={value!r} is not supported{shown}: {what}')
    for key, apply in table.get('special', {}).items():
        if key in kwargs:
            try:
                apply(kwargs, kwargs.pop(key))
            except ValueError as e:
                raise ValueError(f'{cls.__name__}: {e}') from None
    for key in table.get('dropped', ()):
        kwargs.pop(key, None)
    if overrides:
        arch = kwargs.get('arch', cls.default_arch)
        if cls.__name__ in ('PVT', 'PVTv2'):
            _pvt_widths(cls, overrides, arch)
        kwargs['arch'] = {**arch, **overrides} if isinstance(arch, Mapping) else {'base': arch, **overrides}
    return kwargs
