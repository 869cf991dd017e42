"""Which OpenMMLab library (mmdet or mmseg) a config belongs to, and registering its modules."""
from mmengine.config import Config

__all__ = ['SUPPORTED_SCOPES', 'resolve_scope', 'register_scope_modules']

SUPPORTED_SCOPES = ('mmdet', 'mmseg')

# Model and data-preprocessor types that identify a library when a config has no default_scope.
_SCOPE_HINTS = {
    'mmdet': ('DetDataPreprocessor', ),
    'mmseg': ('SegDataPreProcessor', 'EncoderDecoder', 'CascadeEncoderDecoder'),
}


def resolve_scope(cfg: Config) -> str:
    """Decide whether ``cfg`` is an mmdet or an mmseg config.

    Uses ``default_scope`` when present; otherwise a ``'mmdet.'`` / ``'mmseg.'`` prefix on the model
    type, or a data preprocessor / model type that only one of the libraries has.

    Args:
        cfg: A loaded config.

    Returns:
        ``'mmdet'`` or ``'mmseg'``.

    Raises:
        ValueError: If the scope is another library's or cannot be decided.
    """
    scope = cfg.get('default_scope')
    if scope is not None:
        if scope not in SUPPORTED_SCOPES:
            raise ValueError(f'config has default_scope={scope!r}, but these tools run only '
                             f'{" and ".join(SUPPORTED_SCOPES)} configs; set default_scope to one of them')
        return scope
    model = cfg.get('model') or {}
    types = [str(model.get('type', ''))]
    preprocessor = model.get('data_preprocessor') or {}
    types.append(str(preprocessor.get('type', '')))
    for scope in SUPPORTED_SCOPES:
        if any(t.startswith(scope + '.') for t in types):
            return scope
    for scope, hints in _SCOPE_HINTS.items():
        if any(t in hints for t in types):
            return scope
    raise ValueError('cannot tell whether this is an mmdet or an mmseg config: it has no default_scope and '
                     f'its model type {types[0]!r} does not say; add default_scope = "mmdet" or "mmseg"')


def register_scope_modules(scope: str) -> None:
    """Import and register every module of mmdet or mmseg (their ``register_all_modules``).

    Args:
        scope: ``'mmdet'`` or ``'mmseg'``.

    Raises:
        ValueError: For another scope.
        ImportError: If the library is not installed, with the install hint.
    """
    if scope == 'mmdet':
        try:
            from mmdet.utils import register_all_modules
        except ImportError as e:
            raise ImportError(f'an mmdet config needs mmdet 3.x and mmcv 2.1 with ops ({e}); '
                              'install vit_backbones[det]') from e
    elif scope == 'mmseg':
        try:
            from mmseg.utils import register_all_modules
        except ImportError as e:
            raise ImportError(f'an mmseg config needs mmsegmentation 1.x and mmcv 2.1 ({e}); '
                              'install vit_backbones[seg]') from e
    else:
        raise ValueError(f'unknown scope {scope!r}; expected one of {SUPPORTED_SCOPES}')
    # init_default_scope=False: the Runner sets the scope from cfg.default_scope itself.
    register_all_modules(init_default_scope=False)
