"""vit_backbones: vision-transformer backbones for OpenMMLab detection and segmentation.

Importing the package registers every backbone with mmengine's model registry, so mmdet and mmseg
configs can name them after ``custom_imports=dict(imports=['vit_backbones'])``. The core needs only
torch, mmengine and einops.
"""
from .registry import build_backbone, get_backbone_class, list_backbones, register_backbone
from . import models  # noqa: F401  (registers the backbones)

__version__ = '0.1.0'
__all__ = ['build_backbone', 'get_backbone_class', 'list_backbones', 'register_backbone', '__version__']
