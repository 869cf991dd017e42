"""vit_backbones: vision-transformer backbones for OpenMMLab detection and segmentation.

Importing the package registers every backbone with mmengine's model registry, so mmdet and mmseg
configs can name them after ``custom_imports=dict(imports=['vit_backbones'])``. The core needs only
torch, mmengine and einops.
"""
from .registry import build_backbone, get_backbone_class, list_backbones, register_backbone
from . import models  # noqa: F401  (registers the backbones)
from .runtime import allow_mmengine_checkpoints  # noqa: F401  (also registers BF16AutocastOptimWrapper)
from .features import FeatureExtractor, data_config, extract_features  # noqa: E402  (feature extraction API)

# mmengine 0.10 cannot read its own checkpoints under torch >= 2.6 (weights_only loading); allow exactly
# the types it writes, so --resume / load_from work even from mmdet's and mmseg's own tools.
allow_mmengine_checkpoints()

__version__ = '0.1.0'
__all__ = ['allow_mmengine_checkpoints', 'build_backbone', 'get_backbone_class', 'list_backbones', 'register_backbone', '__version__']
__all__ += ['FeatureExtractor', 'data_config', 'extract_features']
