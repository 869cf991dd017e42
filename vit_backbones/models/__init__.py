"""Backbone implementations; importing this module registers them."""
from .base import BaseBackbone
from .swin import Swin
from .shuffle import ShuffleTransformer
from .pvt import PVT, PVTv2
from .cvt import CvT
from .levit import LeViT
from .plain import PlainBackbone
from .vit import DeiT, ViT
from .cait import CaiT
from .deepvit import DeepViT
from .cpvt import CPVT
from .ceit import CeiT

__all__ = [
    'BaseBackbone', 'Swin', 'ShuffleTransformer', 'PVT', 'PVTv2', 'CvT', 'LeViT', 'PlainBackbone', 'ViT', 'DeiT',
    'CaiT', 'DeepViT', 'CPVT', 'CeiT'
]
