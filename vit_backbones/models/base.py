"""What every backbone shares: variant lookup, output selection, freezing, input checks, pretrained
loading, activation checkpointing and the description of the pyramid (``feature_info``)."""
import contextlib
import copy
import functools
import inspect
import math
import numbers
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checkpoint import LoadReport, load_pretrained
from ..features import FeatureInfo
from ..layers import drop_path_schedule
from ..layers.tracing import export_shapes
from ..registry import suggest_names
from .keywords import translate_keywords

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def init_transformer_weights(m: nn.Module):
    """The usual transformer initialisation, for ``model.apply``: truncated-normal (std .02) Linear weights
    with zero biases; norms at weight 1, bias 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm) + _BN_TYPES):
        if m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resolve_arch(arch: Union[str, Mapping], zoo: Mapping[str, dict], model_name: str,
                 aliases: Optional[Mapping[str, str]] = None) -> Tuple[str, dict]:
    """Variant name or override dict -> (name, hyper-parameters).

    A dict may name a base variant with ``'base': 'tiny'`` and override some of its entries; without
    ``'base'`` it must give every hyper-parameter of the model.
    """
    aliases = aliases or {}
    if isinstance(arch, str):
        key = aliases.get(arch.lower(), arch.lower())
        if key not in zoo:
            raise ValueError(f'unknown arch {arch!r} for {model_name}; choose one of {sorted(zoo)} '
                             'or pass a dict of hyper-parameters')
        return key, copy.deepcopy(zoo[key])
    if isinstance(arch, Mapping):
        arch = dict(arch)
        base = arch.pop('base', None)
        if base is not None:
            name, cfg = resolve_arch(base, zoo, model_name, aliases)
            unknown = set(arch) - set(cfg)
            if unknown:
                raise ValueError(f'{model_name} arch overrides {sorted(unknown)} are not hyper-parameters; '
                                 f'known: {sorted(cfg)}')
            cfg.update(arch)
            return _variant_named(cfg, zoo) or f'{name}-custom', cfg
        needed = set(next(iter(zoo.values())))
        lacking = needed - set(arch)
        if lacking:
            raise ValueError(f'{model_name} arch dict lacks {sorted(lacking)}; give them all or add '
                             f"'base': one of {sorted(zoo)}")
        return _variant_named(arch, zoo) or 'custom', arch
    raise TypeError(f'arch must be a variant name or a dict, got {type(arch).__name__}')


def _as_tuples(value):
    """Lists (also nested) as tuples, so that a config's [2, 2, 6, 2] equals a zoo's (2, 2, 6, 2)."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def _variant_named(cfg: Mapping, zoo: Mapping[str, dict]) -> Optional[str]:
    """The zoo variant whose hyper-parameters are exactly ``cfg``, if any."""
    mine = {k: _as_tuples(v) for k, v in cfg.items()}
    for name, entry in zoo.items():
        if set(entry) == set(mine) and all(_as_tuples(v) == mine[k] for k, v in entry.items()):
            return name
    return None


#: stochastic-depth rules of the papers, by name (see :func:`drop_path_rates`)
DROP_PATH_RULES = ('linear', 'stage_linear', 'constant', 'stage_constant')


def drop_path_rates(rate: Union[float, Sequence[float]], depths: Sequence[int],
                    rule: str = 'linear') -> List[List[float]]:
    """Per-block stochastic-depth rates, one list per stage, by one of the papers' rules:

    * ``'linear'``: from 0 to ``rate`` linearly over all blocks (Swin, PVT, ViT/DeiT, DeepViT, CPVT, CeiT);
    * ``'stage_linear'``: within each stage from 0 to that stage's rate (CvT); ``rate`` is one rate per
      stage, or one number for the last stage with 0 before it (CvT's official 0, 0, 0.1);
    * ``'constant'``: ``rate`` in every block (CaiT, LeViT);
    * ``'stage_constant'``: constant within a stage, ``linspace(0, rate, num_stages)`` over the stages
      (Shuffle Transformer).

    Plain Python numbers, so models can be built on the meta device.
    """
    depths = [int(d) for d in depths]
    n = len(depths)
    if rule == 'stage_linear':
        rates = [0.] * (n - 1) + [float(rate)] if isinstance(rate, (int, float)) else [float(r) for r in rate]
        if len(rates) != n:
            raise ValueError(f'drop_path_rate needs one rate or one per stage ({n}), got {rate!r}')
        return [[r * j / (d - 1) for j in range(d)] if d > 1 else [0.] * d for r, d in zip(rates, depths)]
    if not isinstance(rate, (int, float)):
        raise TypeError(f'drop_path_rate must be a number for the {rule!r} schedule, got {rate!r}')
    rate = float(rate)
    if rule == 'linear':
        return drop_path_schedule(rate, depths)
    if rule == 'constant':
        return [[rate] * d for d in depths]
    if rule == 'stage_constant':
        stage = [rate * i / (n - 1) for i in range(n)] if n > 1 else [0.]
        return [[r] * d for r, d in zip(stage, depths)]
    raise ValueError(f'unknown drop-path rule {rule!r}; choose one of {DROP_PATH_RULES}')


def normalize_indices(indices: Sequence[int], count: int, what: str, unit: str = 'levels') -> Tuple[int, ...]:
    """``indices`` into ``count`` items (negative ones count from the end) as non-negative ints, in the
    given order; an index out of range or repeated raises ValueError naming the valid range."""
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f'{what} entries must be ints, got {i!r} ({type(i).__name__})')
        i = int(i)
        j = i + count if i < 0 else i
        if not 0 <= j < count:
            raise ValueError(f'{what} entry {i} is out of range for {count} {unit} (valid: {-count}..{count - 1})')
        out.append(j)
    if len(set(out)) != len(out):
        raise ValueError(f'{what} {tuple(indices)} repeats an entry')
    return tuple(out)


def _check_init_cfg(init_cfg, pretrained, model_name: str):
    """``pretrained`` / ``init_cfg`` checked at construction (not only at ``init_weights()``); returns the
    init config to keep. mmdet's PVT spelling ``init_cfg=dict(checkpoint=PATH)`` (no type) means
    ``'Pretrained'``."""
    fix = "pass pretrained=PATH or init_cfg=dict(type='Pretrained', checkpoint=PATH)"
    if pretrained is not None:
        if isinstance(pretrained, bool) or not isinstance(pretrained, (str, os.PathLike)):
            raise TypeError(f'{model_name}: pretrained must be a checkpoint path, got {pretrained!r} '
                            f'({type(pretrained).__name__}); {fix}, or leave it None for random weights')
        if init_cfg is not None:
            raise ValueError(f'{model_name}: pass either pretrained= or init_cfg=, not both')
        return dict(type='Pretrained', checkpoint=os.fspath(pretrained))
    if init_cfg is None:
        return None
    cfgs = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    out = []
    for cfg in cfgs:
        if not isinstance(cfg, Mapping):
            raise TypeError(f'{model_name}: init_cfg must be a dict or a list of dicts, got {cfg!r} '
                            f'({type(cfg).__name__}); {fix}')
        cfg = dict(cfg)
        if 'type' not in cfg and 'checkpoint' in cfg:
            cfg['type'] = 'Pretrained'
        kind = cfg.get('type')
        if kind == 'Pretrained':
            path = cfg.get('checkpoint')
            if isinstance(path, bool) or not isinstance(path, (str, os.PathLike, Mapping)):
                raise TypeError(f"{model_name}: init_cfg type 'Pretrained' needs checkpoint=PATH (a path or a state "
                                f'dict), got {path!r}; {fix}')
        else:
            from mmengine.registry import WEIGHT_INITIALIZERS
            if not isinstance(kind, str) or WEIGHT_INITIALIZERS.get(kind) is None:
                known = sorted(WEIGHT_INITIALIZERS.module_dict)
                raise ValueError(f"{model_name}: init_cfg type {kind!r} is neither 'Pretrained' nor an mmengine "
                                 f'initialiser ({", ".join(known)}); {fix}')
        out.append(cfg)
    return out if isinstance(init_cfg, (list, tuple)) else out[0]


_BN_ONE_VALUE = 'Expected more than 1 value per channel when training'


def _contract_forward(forward, empty: str = 'empty_outputs'):
    """Wrap a backbone's ``forward``: input checks, an empty batch answered by the method ``empty`` (called
    with the same arguments; empty maps), and a clear message for BatchNorm's one-value error (every
    subclass's forward gets it, see ``__init_subclass__``; :meth:`BaseBackbone.forward_intermediates` too)."""

    @functools.wraps(forward)
    def wrapper(self, x, *args, **kwargs):
        self.check_input(x)
        if x.shape[0] == 0:
            return getattr(self, empty)(x, *args, **kwargs)
        try:
            with export_shapes():  # non-strict torch.export: no 0/1 specialisation (layers/tracing.py)
                return forward(self, x, *args, **kwargs)
        except ValueError as e:
            if _BN_ONE_VALUE not in str(e):
                raise
            h, w = x.shape[-2:]
            raise ValueError(
                f'{type(self).__name__}: a BatchNorm in training mode got one value per channel (batch {x.shape[0]}, '
                f'{h}x{w} input: some stage map has a single cell). Train with a batch of at least 2 or a larger '
                'image, or keep the BatchNorms in eval mode (norm_eval=True, or model.eval())') from e

    wrapper.__contract_wrapped__ = True
    return wrapper


class _BackboneMeta(type(BaseModule)):
    """Construction of every backbone: mmdet keyword names translated (:mod:`.keywords`), arguments the
    class does not take refused by name, then ``__init__``, then :meth:`BaseBackbone._finish_construction`
    (weights initialised, bounds checked, stages frozen) in one place."""

    def __call__(cls, *args, **kwargs):
        kwargs = translate_keywords(cls, kwargs)
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = [k for k in kwargs if k not in params or k == 'self']
            if unknown:
                takes = [k for k in params if k != 'self']
                hints = {k: suggest_names(k, takes, 1) for k in unknown}
                said = ', '.join(f'{k!r}' + (f' (did you mean {hints[k][0]!r}?)' if hints[k] else '') for k in unknown)
                raise TypeError(f'{cls.__name__} does not use the argument(s) {said}; it takes: {", ".join(takes)}')
        model = super().__call__(*args, **kwargs)
        model._finish_construction()
        return model


class KeepBatchNormStats:
    """Context manager: the training-mode BatchNorms inside ``module`` still normalise with batch
    statistics, but their running statistics and counters are restored on exit (used for the
    recomputation of activation checkpointing)."""

    def __init__(self, module: nn.Module):
        self.bns = [m for m in module.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
        self.saved = []

    def __enter__(self):
        self.saved = [[t.detach().clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
                       if t is not None] for bn in self.bns]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for bn, saved in zip(self.bns, self.saved):
                live = [t for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if t is not None]
                for t, old in zip(live, saved):
                    t.copy_(old)
        return False


class BaseBackbone(BaseModule, metaclass=_BackboneMeta):
    """Base class of all backbones: it owns the contract (docs/contract.md).

    Subclasses set ``self.feature_info`` (one dict per pyramid level: ``num_chs``, ``reduction``) and
    implement ``_stem_and_stages()`` (modules frozen by ``frozen_stages``), ``convert_checkpoint`` and
    the forward; they build their modules in ``__init__`` and stop there: construction ends in
    :meth:`_finish_construction` (``_default_init()``, bounds checks, ``feature_info`` as a
    :class:`~vit_backbones.features.FeatureInfo`, then freezing), called once the outermost ``__init__``
    returns. Every subclass's ``forward`` is wrapped (input checks, empty batch, BatchNorm message), and
    ``default_arch`` is the constructor's ``arch`` default.

    Args:
        out_indices: pyramid levels to return (negative indices count from the end).
        frozen_stages: -1 freezes nothing; k freezes the stem and the first k stages (no gradients,
            eval mode).
        norm_eval: keep BatchNorm layers in eval mode during training.
        with_cp: activation checkpointing per block.
        in_chans: input channels.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads a checkpoint in any supported layout
            at ``init_weights()``; other mmengine init configs are passed to mmengine.
    """

    #: smallest input side the model accepts (its total stride unless a subclass says otherwise)
    min_input_size: int = 32
    #: the variant built when no ``arch`` is given (set from the constructor's default for every subclass)
    default_arch: Optional[str] = None

    #: the paper's (or official README's) table, per variant of ``arch_zoo``:
    #: ``{arch: dict(params=<millions>, gmacs=<GMACs at 224x224, None if not given>, source='<table>')}``.
    #: Counts include the ImageNet classifier as the tables do; see :meth:`paper_param_count`.
    paper_table: Dict[str, dict] = {}
    #: parameter-name prefixes of parts added for dense prediction only (plain pyramids, derived levels,
    #: per-level output norms): left out when comparing with the paper's classifier.
    dense_only_prefixes: Tuple[str, ...] = ()

    def __init__(self,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 in_chans: int = 3,
                 init_cfg: Optional[Union[dict, List[dict]]] = None,
                 pretrained: Optional[str] = None):
        name = type(self).__name__
        init_cfg = _check_init_cfg(init_cfg, pretrained, name)
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f'{name}: in_chans must be a positive int, got {in_chans!r}')
        super().__init__(init_cfg=init_cfg)
        self._out_indices_arg = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = bool(norm_eval)
        self.with_cp = bool(with_cp)
        self.in_chans = in_chans
        self.load_report: Optional[LoadReport] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if 'default_arch' not in cls.__dict__:
            p = inspect.signature(cls.__init__).parameters.get('arch')
            if p is not None and isinstance(p.default, str):
                cls.default_arch = p.default
        fwd = cls.__dict__.get('forward')
        if fwd is not None and not getattr(fwd, '__contract_wrapped__', False):
            cls.forward = _contract_forward(fwd)

    def _finish_construction(self):
        """The end of every construction: default initialisation, bounds checks, ``feature_info`` as a
        :class:`FeatureInfo`, freezing."""
        self._default_init()
        units = len(self._stem_and_stages())
        if not -1 <= self.frozen_stages <= units - 1:
            raise ValueError(f'{type(self).__name__}: frozen_stages={self.frozen_stages} is out of range: -1 freezes '
                             f'nothing, 0 the stem, k the stem and the first k of its {units - 1} stages (blocks of '
                             f'a plain model), so at most {units - 1}')
        self.feature_info = FeatureInfo(self.feature_info, self.out_indices)
        self._freeze_stages()

    def set_grad_checkpointing(self, enable: bool = True):
        """Activation checkpointing per block on or off (``with_cp``); returns the model."""
        self.with_cp = bool(enable)
        return self

    def empty_outputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The outputs for an empty batch ``x`` (B = 0): empty maps of the returned levels' shapes."""
        h, w = x.shape[-2:]
        return tuple(x.new_zeros((0, self.feature_info[i]['num_chs'], math.ceil(h / self.feature_info[i]['reduction']),
                                  math.ceil(w / self.feature_info[i]['reduction']))) for i in self.out_indices)

    # ---------------------------------------------------------------- pyramid description
    def _set_out_indices(self, num_levels: int):
        out = self._out_indices_arg
        self.out_indices = normalize_indices((out, ) if isinstance(out, int) else out, num_levels, 'out_indices')
        fs = self.frozen_stages
        if isinstance(fs, bool) or not isinstance(fs, int) or fs < -1:
            raise ValueError(f'frozen_stages must be -1 or a non-negative int, got {fs!r}')

    @property
    def out_channels(self) -> List[int]:
        """Channels of the returned levels, in ``out_indices`` order (for a neck's ``in_channels``)."""
        return [self.feature_info[i]['num_chs'] for i in self.out_indices]

    @property
    def out_strides(self) -> List[int]:
        return [self.feature_info[i]['reduction'] for i in self.out_indices]

    def classifier_param_delta(self) -> int:
        """Parameters the paper's classifier has beyond our trunk (ImageNet head, final norm, class-attention
        layers, ...) that this dense backbone does not build; subclasses with such parts override it."""
        return 0

    def paper_param_count(self) -> int:
        """Our parameter count comparable with :attr:`paper_table`: the trunk (without
        :attr:`dense_only_prefixes`) plus :meth:`classifier_param_delta`."""
        prefixes = tuple(self.dense_only_prefixes)
        n = sum(p.numel() for k, p in self.named_parameters() if not (prefixes and k.startswith(prefixes)))
        return n + self.classifier_param_delta()

    # ---------------------------------------------------------------- intermediates
    #: what an index of :meth:`forward_intermediates` counts (in messages)
    intermediate_unit: str = 'levels'

    def intermediate_info(self) -> List[dict]:
        """What :meth:`forward_intermediates` indexes: one dict (``num_chs``, ``reduction``) per index. By
        default the levels of ``feature_info``; plain models override it with their blocks."""
        return [dict(num_chs=f['num_chs'], reduction=f['reduction']) for f in self.feature_info]

    def _unavailable_intermediates(self) -> Dict[int, str]:
        """Indices this built model cannot return, with the reason (default: none)."""
        return {}

    def _levels_without(self, modules: Mapping[int, str]) -> Dict[int, str]:
        """For :meth:`_unavailable_intermediates`: the levels whose output module (``modules[level]``, an
        attribute name) was not built because ``out_indices`` left the level out."""
        return {i: f'{m} is built only for the levels in out_indices={self.out_indices}'
                for i, m in modules.items() if not hasattr(self, m)}

    def intermediate_indices(self, indices: Union[None, int, Sequence[int]] = None) -> Tuple[int, ...]:
        """The non-negative indices :meth:`forward_intermediates` returns for ``indices``: None for all, an
        int n for the last n, or a sequence (negative entries count from the end)."""
        count, unit = len(self.intermediate_info()), self.intermediate_unit
        if indices is None:
            idx = tuple(range(count))
        elif isinstance(indices, numbers.Integral) and not isinstance(indices, bool):
            indices = int(indices)
            if not 1 <= indices <= count:
                raise ValueError(f'{type(self).__name__}: indices={indices} asks for the last {indices} of '
                                 f'{count} {unit}; give 1..{count}, or a list of indices in {-count}..{count - 1}')
            idx = tuple(range(count - indices, count))
        elif isinstance(indices, Sequence) and not isinstance(indices, str):
            if not indices:
                raise ValueError(f'{type(self).__name__}: indices is empty; give None (all {count} {unit}), a count '
                                 f'1..{count} or a list of indices in {-count}..{count - 1}')
            idx = normalize_indices(indices, count, f'{type(self).__name__}: indices', unit)
        else:
            raise TypeError(f'indices must be None, an int or a list of ints, got {indices!r}')
        missing = {i: why for i, why in self._unavailable_intermediates().items() if i in idx}
        if missing:
            why = '; '.join(f'{i}: {w}' for i, w in sorted(missing.items()))
            have = [i for i in range(count) if i not in self._unavailable_intermediates()]
            raise ValueError(f'{type(self).__name__} cannot return {unit} {sorted(missing)} ({why}); this model '
                             f'returns {have}')
        return idx

    def forward_intermediates(self, x: torch.Tensor, indices: Union[None, int, Sequence[int]] = None, *,
                              norm: bool = False, output_fmt: str = 'NCHW',
                              return_prefix_tokens: bool = False) -> List:
        """Features without a plain model's pyramid: a list with one tensor per index, in ``indices`` order.

        Hierarchical models: the stage maps (pyramid levels, indexed as ``feature_info``) exactly as
        ``forward`` returns them (per-level norms included), whatever ``out_indices`` the model was built
        with. Plain models: the token sequence after each block (indexed by block; the stride of every
        one is the patch size), prefix tokens removed, before the final norm (``norm=True`` applies it to
        every returned block). Blocks past the last index are not run.

        Args:
            indices: None (all), an int n (the last n), or a list (negative entries count from the end).
            norm: plain models only: apply the final norm (``final_norm=True`` models).
            output_fmt: 'NCHW' maps (B, C, ceil(H / stride), ceil(W / stride)) or 'NLC' tokens
                (B, h*w, C), row-major over the grid.
            return_prefix_tokens: plain models only: each entry becomes (features, prefix tokens (B, P, C)),
                P the class/distillation tokens of the sequence (0 for models without any).

        Input checks, the empty batch and BatchNorm's one-value message are those of ``forward``.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"{type(self).__name__}: output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        self._check_intermediate_options(bool(norm), bool(return_prefix_tokens))
        maps, prefix = self._checked_intermediates(x, self.intermediate_indices(indices), bool(norm))
        if output_fmt == 'NLC':
            maps = [m.flatten(2).transpose(1, 2) for m in maps]
        return list(zip(maps, prefix)) if return_prefix_tokens else list(maps)

    def _check_intermediate_options(self, norm: bool, return_prefix_tokens: bool):
        """Refuse options this model does not offer (hierarchical models: ``norm``, ``return_prefix_tokens``)."""
        if norm or return_prefix_tokens:
            raise ValueError(f'{type(self).__name__}: norm and return_prefix_tokens apply to plain models; its stage '
                             'maps already carry their output norms and no prefix tokens')

    def _intermediates(self, x: torch.Tensor, indices: Tuple[int, ...],
                       norm: bool) -> Tuple[List[torch.Tensor], Optional[List[torch.Tensor]]]:
        """(NCHW maps, prefix tokens or None) for ``indices``: the hierarchical models' ``forward`` run with
        ``out_indices`` set to the sorted ``indices`` for the call (plain models override this)."""
        built, levels = self.out_indices, tuple(sorted(indices))
        self.out_indices = levels
        try:
            maps = dict(zip(levels, type(self).forward.__wrapped__(self, x)))
        finally:
            self.out_indices = built
        return [maps[i] for i in indices], None

    def _empty_intermediates(self, x: torch.Tensor, indices: Tuple[int, ...], norm: bool):
        h, w = x.shape[-2:]
        info = self.intermediate_info()
        maps = [x.new_zeros((0, info[i]['num_chs'], math.ceil(h / info[i]['reduction']),
                             math.ceil(w / info[i]['reduction']))) for i in indices]
        p = getattr(self, 'runtime_prefix_tokens', 0)  # plain models; hierarchical ones return no prefix tokens
        return maps, [x.new_zeros((0, p, info[i]['num_chs'])) for i in indices]

    _checked_intermediates = _contract_forward(lambda self, *a: self._intermediates(*a), '_empty_intermediates')

    # ---------------------------------------------------------------- input checks
    def check_input(self, x: torch.Tensor):
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'{name} expects a tensor, got {type(x).__name__}')
        if x.ndim != 4:
            raise ValueError(f'{name} expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}')
        if x.shape[1] != self.in_chans:
            raise ValueError(f'{name} expects {self.in_chans} input channels, got {x.shape[1]} '
                             f'(shape {tuple(x.shape)}); pass in_chans={x.shape[1]} to build it for that')
        if not x.is_floating_point():
            raise TypeError(f'{name} expects a floating-point image tensor, got {x.dtype}; '
                            'convert it with x.float() (and normalise it)')
        h, w = x.shape[-2:]
        if min(h, w) < self.min_input_size:
            raise ValueError(f'{name} needs images of at least {self.min_input_size}x{self.min_input_size} '
                             f'pixels, got {h}x{w}; resize or pad the input')
        weight = next((p for p in self.parameters() if p.is_floating_point()), None)
        if weight is not None and x.dtype != weight.dtype:
            dev = x.device.type
            autocast = torch.is_autocast_enabled(dev) if dev in ('cpu', 'cuda', 'xpu', 'mps') else False
            if not (autocast and x.dtype in (torch.float32, torch.get_autocast_dtype(dev))):
                raise TypeError(
                    f'{name} has {weight.dtype} weights but got a {x.dtype} input. Run mixed precision under '
                    f"torch.autocast('{dev}', dtype={x.dtype}) with a float32 input, or convert the model with "
                    f'model.to({x.dtype}) (or the input with x.to({weight.dtype}))')

    # ---------------------------------------------------------------- freezing / norm_eval
    def _stem_and_stages(self) -> List[nn.Module]:
        """[stem, stage 0, stage 1, ...]: the units ``frozen_stages`` counts."""
        raise NotImplementedError

    def _freeze_stages(self):
        if self.frozen_stages < 0:
            return
        units = self._stem_and_stages()
        for m in units[:self.frozen_stages + 1]:
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BN_TYPES):
                    m.eval()
        return self

    # ---------------------------------------------------------------- checkpointing
    def run_block(self, block: nn.Module, *args):
        """Call ``block(*args)``, with activation checkpointing when ``with_cp`` and gradients flow.

        The recomputation in the backward pass leaves the block's BatchNorm running statistics alone, so
        a checkpointed block updates them once per step, as without checkpointing."""
        if self.with_cp and self.training and torch.is_grad_enabled() and any(
                a.requires_grad for a in args if isinstance(a, torch.Tensor)):
            return checkpoint(block, *args, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), KeepBatchNormStats(block)))
        return block(*args)

    # ---------------------------------------------------------------- weights
    def convert_checkpoint(self, state_dict: Dict[str, torch.Tensor]):
        """Rename a foreign state dict to ours: returns (state_dict, format name, {dropped key: reason})."""
        raise NotImplementedError

    def optional_checkpoint_keys(self) -> List[str]:
        """Parameters a classification checkpoint need not provide (they keep their initialisation)."""
        return []

    def resize_checkpoint_tensor(self, key: str, value: torch.Tensor) -> Optional[torch.Tensor]:
        """Resample a checkpoint tensor whose shape depends on window/grid size; None if not resizable."""
        return None

    def load_checkpoint(self, checkpoint, strict: bool = False, logger=None) -> LoadReport:
        """Load a checkpoint (path or state dict) in any supported layout; returns the report."""
        self.load_report = load_pretrained(self, checkpoint, strict=strict, logger=logger)
        return self.load_report

    def init_weights(self):
        """Load ``init_cfg``'s checkpoint, or run ``init_cfg``'s mmengine initialisers, or (no init_cfg)
        re-initialise with :func:`init_transformer_weights` (override ``_default_init`` for more)."""
        cfg = self.init_cfg
        if cfg is None:
            self._default_init()
            return
        if isinstance(cfg, Mapping) and cfg.get('type') == 'Pretrained':
            logger = MMLogger.get_current_instance()
            path = cfg.get('checkpoint')
            if path is None:
                raise ValueError("init_cfg type 'Pretrained' needs checkpoint=PATH")
            logger.info(f'{type(self).__name__}: loading {path}')
            self.load_checkpoint(path, logger=logger)
            self._is_init = True
            return
        super().init_weights()

    def _default_init(self):
        self.apply(init_transformer_weights)
