"""vit_backbones: vision-transformer backbones for OpenMMLab detection and segmentation.

``import vit_backbones`` does what loading and building from an mmengine config needs, and no more: it
allow-lists the types mmengine writes into its checkpoints (for ``torch.load(weights_only=True)``) and
puts the names of our backbones, ``SafeCheckpointHook`` and ``BF16AutocastOptimWrapper`` into mmengine's
registries, so that mmdet and mmseg configs can name them after
``custom_imports=dict(imports=['vit_backbones'])``. The modules behind the names (and mmengine.model,
which they build on) are imported when a config first builds one, when a name is first asked for
(:func:`get_backbone_class`, :func:`build_backbone`, ``vit_backbones.models``), or all at once by
:func:`register_all`. The core needs only torch, mmengine and einops.
"""
import importlib

from mmengine.registry import HOOKS, MODELS, OPTIM_WRAPPERS

from .registry import (BACKBONE_MODULES, build_backbone, get_backbone_class, list_backbones, register_all,
                       register_backbone, register_deferred)
from .runtime.safe_globals import allow_mmengine_checkpoints

# mmengine 0.10 cannot read its own checkpoints under torch >= 2.6 (weights_only loading); allow exactly
# the types it writes, so --resume / load_from work even from mmdet's and mmseg's own tools.
allow_mmengine_checkpoints()
for _name, _module in BACKBONE_MODULES.items():
    register_deferred(MODELS, _name, _module)
register_deferred(HOOKS, 'SafeCheckpointHook', 'vit_backbones.runtime.checkpoint_hook')
register_deferred(OPTIM_WRAPPERS, 'BF16AutocastOptimWrapper', 'vit_backbones.runtime.amp')

#: names of the package imported from their module on first use
_LAZY = {'FeatureExtractor': 'features', 'data_config': 'features', 'extract_features': 'features'}
_SUBMODULES = ('checkpoint', 'data', 'features', 'layers', 'models', 'runtime')


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f'.{_LAZY[name]}', __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f'.{name}', __name__)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__version__ = '0.1.0'
__all__ = ['allow_mmengine_checkpoints', 'build_backbone', 'get_backbone_class', 'list_backbones', 'register_all',
           'register_backbone', '__version__', 'FeatureExtractor', 'data_config', 'extract_features']
