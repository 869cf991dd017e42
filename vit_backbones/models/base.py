"""What every backbone shares: variant lookup, output selection, freezing, input checks, pretrained
loading, activation checkpointing and the description of the pyramid (``feature_info``)."""
import contextlib
import copy
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checkpoint import LoadReport, load_pretrained

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
            return f'{name}-custom', cfg
        needed = set(next(iter(zoo.values())))
        lacking = needed - set(arch)
        if lacking:
            raise ValueError(f'{model_name} arch dict lacks {sorted(lacking)}; give them all or add '
                             f"'base': one of {sorted(zoo)}")
        return 'custom', arch
    raise TypeError(f'arch must be a variant name or a dict, got {type(arch).__name__}')


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


class BaseBackbone(BaseModule):
    """Base class of all backbones.

    Subclasses set ``self.feature_info`` (one dict per pyramid level: ``num_chs``, ``reduction``) and
    implement ``_stem_and_stages()`` (modules frozen by ``frozen_stages``), ``convert_checkpoint`` and
    the forward.

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
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('pass either pretrained= or init_cfg=, not both')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        self._out_indices_arg = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.in_chans = in_chans
        self.load_report: Optional[LoadReport] = None

    # ---------------------------------------------------------------- pyramid description
    def _set_out_indices(self, num_levels: int):
        out = self._out_indices_arg
        if isinstance(out, int):
            out = (out, )
        idx = []
        for i in out:
            j = i + num_levels if i < 0 else i
            if not 0 <= j < num_levels:
                raise ValueError(f'out_indices entry {i} is out of range for {num_levels} levels')
            idx.append(j)
        if len(set(idx)) != len(idx):
            raise ValueError(f'out_indices {tuple(out)} repeats a level')
        self.out_indices = tuple(idx)
        if not isinstance(self.frozen_stages, int) or self.frozen_stages < -1:
            raise ValueError(f'frozen_stages must be -1 or a non-negative int, got {self.frozen_stages!r}')

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
