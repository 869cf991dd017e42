"""Backbone implementations; importing this module registers them."""
from .base import BaseBackbone
from .swin import Swin

__all__ = ['BaseBackbone', 'Swin']
