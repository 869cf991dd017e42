"""Backbone registry.

Every backbone class is registered twice: in our own table (for standalone use through
:func:`build_backbone`) and in mmengine's root ``MODELS`` registry. mmdet's and mmseg's registries are
children of that root, and a lookup that misses in a child falls back to its parent, so a config with
``custom_imports=dict(imports=['vit_backbones'])`` finds our backbones under either library without
this package importing mmdet or mmseg.
"""
from typing import Dict, List, Type

from mmengine.registry import MODELS

_BACKBONES: Dict[str, Type] = {}


def register_backbone(cls: Type) -> Type:
    """Class decorator: make ``cls`` buildable by name here and from OpenMMLab configs."""
    name = cls.__name__
    if name in _BACKBONES and _BACKBONES[name] is not cls:
        raise KeyError(f'backbone {name!r} is already registered by {_BACKBONES[name]!r}')
    _BACKBONES[name] = cls
    MODELS.register_module(name=name, module=cls, force=True)
    return cls


def list_backbones() -> List[str]:
    """Names of every registered backbone."""
    return sorted(_BACKBONES)


def get_backbone_class(name: str) -> Type:
    try:
        return _BACKBONES[name]
    except KeyError:
        raise KeyError(f'unknown backbone {name!r}; known backbones: {", ".join(list_backbones())}') from None


def build_backbone(name: str, arch='tiny', checkpoint=None, **kwargs):
    """Build a backbone by name and variant, e.g. ``build_backbone('Swin', 'tiny', out_indices=(1, 2, 3))``.

    Args:
        name: a registered backbone name (see :func:`list_backbones`).
        arch: the variant name or a dict of hyper-parameters.
        checkpoint: optional path (or state dict) of weights in any supported layout (official, timm,
            HF transformers, mmdet/mmseg, ours), loaded right away; the report is kept in
            ``model.load_report``.
        **kwargs: the backbone's construction arguments (``out_indices``, ``frozen_stages``, ``with_cp``,
            ``drop_path_rate``, ``init_cfg`` ...).
    """
    model = get_backbone_class(name)(arch=arch, **kwargs)
    if checkpoint is not None:
        model.load_checkpoint(checkpoint)
    return model
