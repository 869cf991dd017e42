"""Backbone registry.

Every backbone class is registered twice: in our own table (for standalone use through
:func:`build_backbone`) and in mmengine's root ``MODELS`` registry. mmdet's and mmseg's registries are
children of that root, and a lookup that misses in a child falls back to its parent, so a config with
``custom_imports=dict(imports=['vit_backbones'])`` finds our backbones under either library without
this package importing mmdet or mmseg.
"""
import difflib
import fnmatch
import importlib
from typing import Callable, Dict, List, Optional, Type

from mmengine.registry import MODELS

_BACKBONES: Dict[str, Type] = {}

#: the module that defines each of our backbones: ``import vit_backbones`` registers the names only, and
#: the modules (with mmengine.model, which they build on) are imported when one is first asked for
BACKBONE_MODULES = {
    'Swin': 'vit_backbones.models.swin', 'ShuffleTransformer': 'vit_backbones.models.shuffle',
    'PVT': 'vit_backbones.models.pvt', 'PVTv2': 'vit_backbones.models.pvt', 'CvT': 'vit_backbones.models.cvt',
    'LeViT': 'vit_backbones.models.levit', 'ViT': 'vit_backbones.models.vit', 'DeiT': 'vit_backbones.models.vit',
    'CaiT': 'vit_backbones.models.cait', 'DeepViT': 'vit_backbones.models.deepvit',
    'CPVT': 'vit_backbones.models.cpvt', 'CeiT': 'vit_backbones.models.ceit',
}

#: what a config needs before it can name our backbones
CUSTOM_IMPORTS_HINT = "custom_imports=dict(imports=['vit_backbones'], allow_failed_imports=False)"


def register_backbone(cls: Type) -> Type:
    """Class decorator: make ``cls`` buildable by name here and from OpenMMLab configs."""
    name = cls.__name__
    if name in _BACKBONES and _BACKBONES[name] is not cls:
        raise KeyError(f'backbone {name!r} is already registered by {_BACKBONES[name]!r}')
    _BACKBONES[name] = cls
    MODELS.register_module(name=name, module=cls, force=True)
    return cls


def _deferred(name: str, module: str) -> Callable:
    """A stand-in for ``module.name`` in an mmengine registry: building it imports ``module`` (which
    registers the real class under ``name``, replacing the stand-in) and builds the real class."""

    def build(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f'{name} of {module}, imported when first built'
    build.deferred_to = module
    return build


def register_deferred(registry, name: str, module: str) -> None:
    """Put ``name`` into the mmengine ``registry`` now, defined by ``module`` when it is first built
    (configs name it after ``custom_imports=dict(imports=['vit_backbones'])``; importing the module itself
    registers the real class, see :func:`register_real`)."""
    if name not in registry.module_dict:
        registry.register_module(name=name, module=_deferred(name, module))


def register_real(registry, cls: Type) -> Type:
    """Register ``cls`` in an mmengine ``registry`` under its name, replacing our deferred stand-in; an
    entry of that name that is neither is somebody else's and is kept."""
    current = registry.module_dict.get(cls.__name__)
    if current is None or hasattr(current, 'deferred_to'):
        registry.register_module(name=cls.__name__, module=cls, force=True)
    return cls


def register_all() -> None:
    """Import everything the deferred names stand for: every backbone, ``SafeCheckpointHook`` and
    ``BF16AutocastOptimWrapper`` are then real classes in mmengine's registries."""
    importlib.import_module('vit_backbones.models')
    importlib.import_module('vit_backbones.runtime.amp')
    importlib.import_module('vit_backbones.runtime.checkpoint_hook')


def list_backbones(pattern: Optional[str] = None) -> List[str]:
    """Names of the registered backbones, sorted; ``pattern`` keeps those matching an fnmatch pattern
    (case-insensitive, e.g. ``'*swin*'``, ``'pvt*'``)."""
    names = sorted(set(_BACKBONES) | set(BACKBONE_MODULES))
    if pattern is None:
        return names
    return [n for n in names if fnmatch.fnmatchcase(n.lower(), pattern.lower())]


def suggest_names(name: str, choices, n: int = 3) -> List[str]:
    """The registered names closest to ``name`` (case-insensitive), best first."""
    by_lower = {c.lower(): c for c in choices}
    return [by_lower[c] for c in difflib.get_close_matches(str(name).lower(), list(by_lower), n=n, cutoff=0.5)]


def get_backbone_class(name: str) -> Type:
    """The backbone class registered as ``name``; a miss names the closest registered backbones."""
    if isinstance(name, str) and name not in _BACKBONES and name in BACKBONE_MODULES:
        importlib.import_module(BACKBONE_MODULES[name])
    try:
        return _BACKBONES[name]
    except (KeyError, TypeError):
        close = suggest_names(name, list_backbones())
        hint = f'did you mean {" or ".join(repr(c) for c in close)}? ' if close else ''
        raise KeyError(f'unknown backbone {name!r}; {hint}known backbones: {", ".join(list_backbones())}. In an '
                       f'mmdet/mmseg config, name one of them after {CUSTOM_IMPORTS_HINT}') from None


def build_backbone(name: str, arch=None, checkpoint=None, **kwargs):
    """Build a backbone by name and variant, e.g. ``build_backbone('Swin', 'tiny', out_indices=(1, 2, 3))``.

    Args:
        name: a registered backbone name (see :func:`list_backbones`).
        arch: the variant name or a dict of hyper-parameters; None builds the class default
            (``default_arch``, the constructor's default).
        checkpoint: optional path (or state dict) of weights in any supported layout (official, timm,
            HF transformers, mmdet/mmseg, ours), loaded right away; the report is kept in
            ``model.load_report``.
        **kwargs: the backbone's construction arguments (``out_indices``, ``frozen_stages``, ``with_cp``,
            ``drop_path_rate``, ``init_cfg`` ...).
    """
    cls = get_backbone_class(name)
    if arch is not None:
        kwargs['arch'] = arch
    model = cls(**kwargs)
    if checkpoint is not None:
        model.load_checkpoint(checkpoint)
    return model
