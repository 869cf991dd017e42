"""Backbone registry.

Every backbone class is registered twice: in our own table (for standalone use through
:func:`build_backbone`) and in mmengine's root ``MODELS`` registry. mmdet's and mmseg's registries are
children of that root, and a lookup that misses in a child falls back to its parent, so a config with
``custom_imports=dict(imports=['vit_backbones'])`` finds our backbones under either library without
this package importing mmdet or mmseg.
"""
import difflib
import fnmatch
from typing import Dict, List, Optional, Type

from mmengine.registry import MODELS

_BACKBONES: Dict[str, Type] = {}

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


def list_backbones(pattern: Optional[str] = None) -> List[str]:
    """Names of the registered backbones, sorted; ``pattern`` keeps those matching an fnmatch pattern
    (case-insensitive, e.g. ``'*swin*'``, ``'pvt*'``)."""
    names = sorted(_BACKBONES)
    if pattern is None:
        return names
    return [n for n in names if fnmatch.fnmatchcase(n.lower(), pattern.lower())]


def suggest_names(name: str, choices, n: int = 3) -> List[str]:
    """The registered names closest to ``name`` (case-insensitive), best first."""
    by_lower = {c.lower(): c for c in choices}
    return [by_lower[c] for c in difflib.get_close_matches(str(name).lower(), list(by_lower), n=n, cutoff=0.5)]


def get_backbone_class(name: str) -> Type:
    """The backbone class registered as ``name``; a miss names the closest registered backbones."""
    try:
        return _BACKBONES[name]
    except (KeyError, TypeError):
        close = suggest_names(name, _BACKBONES)
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
