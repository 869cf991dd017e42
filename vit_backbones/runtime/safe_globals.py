"""Loading mmengine's own checkpoints under ``torch.load(weights_only=True)`` (PyTorch's default since 2.6)."""
from typing import Any, Callable, List, Tuple, Union

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

__all__ = ['allow_mmengine_checkpoints', 'mmengine_safe_globals']

#: The statistics methods ``HistoryBuffer`` registers for itself (``_set_default_statistics``).
_HISTORY_BUFFER_METHODS = frozenset({'min', 'max', 'current', 'mean'})


def _history_buffer_getattr(obj: Any, name: str) -> Callable:
    """Stand-in for ``builtins.getattr`` while unpickling, limited to ``HistoryBuffer`` methods.

    ``HistoryBuffer.__getstate__`` stores its class-level ``_statistics_methods`` dict, whose values
    are the plain functions ``HistoryBuffer.min`` / ``max`` / ``current`` / ``mean``. ``torch.save``
    pickles with protocol 2, which cannot name a nested qualname directly, so pickle writes each of
    them as ``getattr(HistoryBuffer, 'min')``. Allowing the real ``getattr`` would let a checkpoint
    walk from any allowed object to arbitrary attributes (``__globals__``, ``__subclasses__`` ...);
    this function resolves exactly those four names on exactly that class and refuses the rest.

    Args:
        obj: The object the pickle applies ``getattr`` to; must be the ``HistoryBuffer`` class.
        name: The attribute name; must be one of HistoryBuffer's default statistics methods.

    Returns:
        The function ``HistoryBuffer.<name>``.

    Raises:
        pickle.UnpicklingError: For any other object or name.
    """
    if obj is HistoryBuffer and isinstance(name, str) and name in _HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    import pickle
    raise pickle.UnpicklingError(
        f'refusing getattr({obj!r}, {name!r}) while loading a checkpoint: with weights_only=True, '
        f'vit_backbones only allows getattr(HistoryBuffer, name) for name in {sorted(_HISTORY_BUFFER_METHODS)} '
        '(what mmengine writes). If you trust this file, load it with torch.load(..., weights_only=False).')


_NUMERIC_DTYPES = ('bool', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64', 'float16',
                   'float32', 'float64')


def _numeric_dtype_classes() -> List[type]:
    """The dtype classes of numpy's bool, integer and float dtypes (only np.dtype itself on numpy < 1.25)."""
    classes = []
    for name in _NUMERIC_DTYPES:
        cls = type(np.dtype(name))
        if cls is not np.dtype and cls not in classes:
            classes.append(cls)
    return classes


def mmengine_safe_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    """The globals that mmengine 0.10's ``Runner.save_checkpoint`` writes besides tensors.

    Found by saving checkpoints of real mmdet and mmseg runners (``IterBasedTrainLoop`` and
    ``EpochBasedTrainLoop``, AdamW/SGD, param schedulers, fp32 and bf16-autocast optimizer wrappers)
    and listing their globals with ``torch.serialization.get_unsafe_globals_in_checkpoint``.

    Returns:
        Entries for ``torch.serialization.add_safe_globals``: objects, or ``(object, 'module.name')``
        where the name in the pickle differs from the object's own ``__module__.__qualname__``.
    """
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    reconstruct = multiarray._reconstruct
    scalar = multiarray.scalar
    return [
        # HistoryBuffer objects live in message_hub['log_scalars'] (loss, lr, time, data_time ...).
        HistoryBuffer,
        # Their `_statistics_methods` are pickled as getattr(HistoryBuffer, 'min') etc.
        (_history_buffer_getattr, 'builtins.getattr'),
        # HistoryBuffer._log_history / _count_history are numpy arrays: ndarray pickles as
        # _reconstruct(ndarray, (0,), b'b') + __setstate__ with a dtype.
        np.ndarray,
        np.dtype,
        # numpy >= 1.25 gives each dtype its own class (numpy.dtypes.Float64DType ...) and unpickling
        # a dtype ends in a BUILD on an instance of it: the numeric and bool ones are allowed (HistoryBuffer
        # holds float64 values and int64 counts; metrics may be float32/float16/int scalars). Object,
        # string and structured dtypes stay refused.
        *_numeric_dtype_classes(),
        (reconstruct, 'numpy._core.multiarray._reconstruct'),  # written by numpy >= 2
        (reconstruct, 'numpy.core.multiarray._reconstruct'),  # written by numpy 1.x
        # numpy scalars (np.float64 from HistoryBuffer.mean(), np.int64 ...) in message-hub
        # runtime_info and meta pickle as scalar(dtype, raw_bytes).
        (scalar, 'numpy._core.multiarray.scalar'),
        (scalar, 'numpy.core.multiarray.scalar'),
    ]


_CHECKPOINTS_ALLOWED = False


def allow_mmengine_checkpoints() -> None:
    """Make mmengine's checkpoint loading (``load_checkpoint``, ``resume``, ``load_from``) work.

    PyTorch >= 2.6 loads with ``weights_only=True`` by default and mmengine 0.10.7 calls
    ``torch.load`` without ``weights_only``, so a checkpoint that mmengine itself wrote (numpy arrays and
    scalars, ``HistoryBuffer`` objects in the message hub) fails with ``UnpicklingError: Weights only
    load failed``. This registers exactly those types with ``torch.serialization.add_safe_globals``
    (see :func:`mmengine_safe_globals`); ``weights_only`` stays on, so a file that names any other
    class or function is still refused. Calling it again does nothing.
    """
    global _CHECKPOINTS_ALLOWED
    if _CHECKPOINTS_ALLOWED:
        return
    torch.serialization.add_safe_globals(mmengine_safe_globals())
    _CHECKPOINTS_ALLOWED = True
