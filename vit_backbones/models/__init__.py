"""Backbone implementations; importing this module registers them."""
from .base import BaseBackbone
from .swin import Swin
from .pvt import PVT, PVTv2  # noqa: F401  (registers PVT and PVTv2)
from .vit import DeiT, PlainBackbone, ViT  # noqa: F401  (registers ViT and DeiT)
from .levit import LeViT  # noqa: F401  (registers LeViT)
from .shuffle import ShuffleTransformer  # noqa: F401  (registers ShuffleTransformer)
from .cvt import CvT  # noqa: F401  (registers CvT)

__all__ = ['BaseBackbone', 'Swin']
__all__ += ['PlainBackbone', 'ViT', 'DeiT']
from .cpvt import CPVT  # noqa: E402,F401  (registers CPVT)
from .cait import CaiT  # noqa: E402,F401  (registers CaiT)
from .deepvit import DeepViT  # noqa: E402,F401  (registers DeepViT)
from .ceit import CeiT  # noqa: E402,F401  (registers CeiT)
