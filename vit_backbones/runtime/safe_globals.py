"""Loading mmengine's own checkpoints under ``torch.load(weights_only=True)`` (PyTorch's default since 2.6).

mmengine writes numpy arrays, scalars and dtypes and ``HistoryBuffer`` objects besides tensors. The real
classes cannot be allow-listed as they are: a file could call ``np.ndarray(shape, 'O')`` (any allocation),
give a float64 dtype object flags or fields through ``np.dtype.__setstate__`` (an array of raw bytes read
as object pointers), or merge its own statistics methods into the ``HistoryBuffer`` class. So the names
mmengine's pickles use are registered with stand-ins that check plain data and build only instance data.
"""
import math
import re
from typing import Any, Callable, List, Tuple, Union

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

from ..checkpoint.errors import UnsafeCheckpointError

__all__ = ['allow_mmengine_checkpoints', 'mmengine_safe_globals']

#: The statistics methods ``HistoryBuffer`` registers for itself (``_set_default_statistics``).
_HISTORY_BUFFER_METHODS = frozenset({'min', 'max', 'current', 'mean'})
_HISTORY_BUFFER_KEYS = frozenset({'max_length', '_log_history', '_count_history', 'statistics_methods'})


def _refuse(what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f'refusing {what} while loading a checkpoint: not what mmengine writes, so the '
                                 'file is damaged or crafted')


def _multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    return multiarray


class _DtypeSpec:
    """Stand-in for ``numpy.dtype``: a bool, integer, float or complex dtype rebuilt from its name.

    numpy pickles a dtype as ``dtype('f8', False, True)`` plus a ``__setstate__`` whose only meaningful
    field here is the byte order; anything else (fields, sub-arrays, flags) is refused.
    """
    __slots__ = ('_dtype', )

    def __init__(self, spec: Any, align: Any = False, copy: Any = True):
        if type(spec) is not str or not re.fullmatch(r'[biufc]\d{1,2}', spec):
            raise _refuse(f'numpy dtype {spec!r} (only bool, integer, float and complex dtypes are allowed)')
        try:
            self._dtype = np.dtype(spec)
        except TypeError as e:
            raise _refuse(f'numpy dtype {spec!r}') from e

    def __setstate__(self, state: Any) -> None:
        plain = (3, None, None, None, -1, -1, 0)  # version, sub-array, names, fields, elsize, alignment, flags
        if (type(state) is not tuple or len(state) != 8 or type(state[1]) is not str
                or state[1] not in ('<', '>', '|', '=')
                or not all(type(a) is type(b) and a == b for a, b in zip((state[0], *state[2:]), plain))):
            raise _refuse(f'numpy dtype state {state!r}')
        self._dtype = self.numpy_dtype.newbyteorder(state[1])

    @property
    def numpy_dtype(self) -> np.dtype:
        dtype = getattr(self, '_dtype', None)
        if dtype is None:
            raise _refuse('a numpy dtype that was never initialised')
        return dtype


def _as_dtype(spec: Any) -> np.dtype:
    if type(spec) is not _DtypeSpec:
        raise _refuse(f'a numpy value whose dtype is {type(spec).__name__}, not a numpy dtype')
    return spec.numpy_dtype


class _CheckedArray(np.ndarray):
    """numpy array restored from a checkpoint; ``__setstate__`` checks the pickled state before numpy uses it.

    The shape must match the raw bytes in the file, so restoring never allocates more than the file holds.
    It pickles (and deep-copies) as a plain ``numpy.ndarray``.
    """

    def __new__(cls, *args, **kwargs):
        raise _refuse('constructing a numpy array from arguments')

    def __setstate__(self, state: Any) -> None:
        if type(state) is not tuple or len(state) != 5 or type(state[0]) is not int or state[0] != 1:
            raise _refuse('a numpy array state that is not (1, shape, dtype, fortran, bytes)')
        version, shape, spec, fortran, raw = state
        dtype = _as_dtype(spec)
        if type(shape) is not tuple or len(shape) > 32 or any(type(n) is not int or n < 0 for n in shape):
            raise _refuse(f'numpy array shape {shape!r}')
        if type(fortran) is not bool or type(raw) is not bytes:
            raise _refuse('a numpy array whose data is not raw bytes')
        if math.prod(shape) * dtype.itemsize != len(raw):
            raise _refuse(f'a numpy array of shape {shape} and dtype {dtype} with {len(raw)} bytes of data')
        np.ndarray.__setstate__(self, (version, shape, dtype, fortran, raw))

    def __reduce__(self):
        return self.view(np.ndarray).__reduce__()

    def __reduce_ex__(self, protocol):
        return self.view(np.ndarray).__reduce_ex__(protocol)


class _ClassName:
    """A class that mmengine's pickles name only as an argument (``_reconstruct(numpy.ndarray, ...)``)."""
    __slots__ = ('name', )

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f'<{self.name} (not callable while unpickling)>'


_NDARRAY = _ClassName('numpy.ndarray')


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """Stand-in for numpy's ``_reconstruct``: the empty array that the pickled state then fills."""
    if subtype is not _NDARRAY or type(shape) is not tuple or shape != (0, ) or type(typecode) is not bytes \
            or typecode != b'b':
        raise _refuse(f'numpy _reconstruct({subtype!r}, {shape!r}, {typecode!r})')
    return np.ndarray.__new__(_CheckedArray, (0, ), np.int8)


def _scalar(spec: Any, data: Any) -> np.generic:
    """Stand-in for numpy's ``scalar``: a numeric scalar from exactly ``itemsize`` raw bytes."""
    dtype = _as_dtype(spec)
    if type(data) is not bytes or len(data) != dtype.itemsize:
        raise _refuse(f'a numpy {dtype} scalar from {type(data).__name__} data')
    return _multiarray().scalar(dtype, data)


def _frombuffer(buf: Any, spec: Any, shape: Any, order: Any) -> np.ndarray:
    """Stand-in for numpy's ``_frombuffer`` (arrays in pickle protocol 5): a copy of exactly the given bytes."""
    dtype = _as_dtype(spec)
    if type(buf) not in (bytes, bytearray) or type(order) is not str or order not in ('C', 'F') or type(shape) is not tuple or any(
            type(n) is not int or n < 0 for n in shape) or math.prod(shape) * dtype.itemsize != len(buf):
        raise _refuse(f'numpy _frombuffer of {type(buf).__name__} data, shape {shape!r}, order {order!r}')
    return np.frombuffer(bytes(buf), dtype).reshape(shape, order=order).copy(order=order)


def _plain_array(value: Any, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in 'biuf':
        raise _refuse(f'HistoryBuffer {name} that is not a 1-d numeric array')
    return value.view(np.ndarray)


class _HistoryBuffer(HistoryBuffer):
    """``HistoryBuffer`` as restored from a checkpoint: ``__setstate__`` checks and sets instance data only.

    mmengine's own ``__setstate__`` merges the pickled ``statistics_methods`` into the class; here they must
    be the four defaults (what mmengine writes) and are not applied. Once checked, the object becomes a
    plain ``HistoryBuffer``.
    """

    def __init__(self, *args, **kwargs):
        raise _refuse('constructing a HistoryBuffer from arguments (mmengine pickles its state)')

    def __setstate__(self, state: Any) -> None:
        if type(state) is not dict or not set(state) <= _HISTORY_BUFFER_KEYS:
            raise _refuse('a HistoryBuffer state with keys other than '
                          f'{sorted(_HISTORY_BUFFER_KEYS)}')
        methods = state.get('statistics_methods', {})
        if type(methods) is not dict or any(name not in _HISTORY_BUFFER_METHODS or fn is not getattr(HistoryBuffer, name)
                                            for name, fn in methods.items()):
            raise _refuse('HistoryBuffer statistics methods other than '
                          f'HistoryBuffer.{{{", ".join(sorted(_HISTORY_BUFFER_METHODS))}}}')
        max_length = state.get('max_length', 1000000)
        if type(max_length) is not int or max_length < 1:
            raise _refuse(f'HistoryBuffer max_length {max_length!r}')
        log = _plain_array(state.get('_log_history', np.zeros(0)), '_log_history')
        count = _plain_array(state.get('_count_history', np.zeros(0)), '_count_history')
        if len(log) != len(count):
            raise _refuse('a HistoryBuffer whose log and count histories differ in length')
        self._set_default_statistics()  # the four defaults, as HistoryBuffer() itself does
        self.max_length = max_length
        self._log_history = log
        self._count_history = count
        self.__class__ = HistoryBuffer  # checked: from now on a plain HistoryBuffer (and pickled as one)


def _history_buffer_getattr(obj: Any, name: str) -> Callable:
    """Stand-in for ``builtins.getattr`` while unpickling, limited to ``HistoryBuffer`` methods.

    ``HistoryBuffer.__getstate__`` stores its statistics methods, which protocol 2 pickles as
    ``getattr(HistoryBuffer, 'min')``. The real ``getattr`` would let a file walk from any allowed object to
    any attribute (``__globals__``, ``__subclasses__`` ...); this resolves only those four names.

    Raises:
        UnsafeCheckpointError: (a ``pickle.UnpicklingError``) for any other object or name.
    """
    if (obj is HistoryBuffer or obj is _HistoryBuffer) and type(name) is str and name in _HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise UnsafeCheckpointError(
        f'refusing getattr({obj!r}, {name!r}) (GLOBAL builtins.getattr) while loading a checkpoint: vit_backbones '
        f'only allows getattr(HistoryBuffer, name) for name in {sorted(_HISTORY_BUFFER_METHODS)}, which is what '
        'mmengine writes; anything else can reach arbitrary code.')


_ENTRIES = (
    # HistoryBuffer objects live in message_hub['log_scalars'] (loss, lr, time, data_time ...).
    (_HistoryBuffer, 'mmengine.logging.history_buffer.HistoryBuffer'),
    # Their statistics methods are pickled as getattr(HistoryBuffer, 'min') etc.
    (_history_buffer_getattr, 'builtins.getattr'),
    # ndarray pickles as _reconstruct(numpy.ndarray, (0,), b'b') + __setstate__((1, shape, dtype, fortran, bytes)).
    (_NDARRAY, 'numpy.ndarray'),
    (_reconstruct, 'numpy._core.multiarray._reconstruct'),  # written by numpy >= 2
    (_reconstruct, 'numpy.core.multiarray._reconstruct'),  # written by numpy 1.x
    _CheckedArray,  # allowed so that its checked __setstate__ may run; it cannot be constructed
    # A dtype pickles as numpy.dtype('f8', False, True) + __setstate__ with the byte order.
    (_DtypeSpec, 'numpy.dtype'),
    # numpy scalars (np.float64 from HistoryBuffer.mean(), np.int64 ...) pickle as scalar(dtype, raw_bytes).
    (_scalar, 'numpy._core.multiarray.scalar'),
    (_scalar, 'numpy.core.multiarray.scalar'),
    # pickle protocol 5 (not torch.save's default) writes arrays as _frombuffer(bytes, dtype, shape, order).
    (_frombuffer, 'numpy._core.numeric._frombuffer'),
    (_frombuffer, 'numpy.core.numeric._frombuffer'),
)


def mmengine_safe_globals() -> List[Union[Callable, Tuple[Any, str]]]:
    """The globals that mmengine 0.10's ``Runner.save_checkpoint`` writes besides tensors, as checked stand-ins.

    Found by saving checkpoints of real mmdet and mmseg runners (``IterBasedTrainLoop`` and
    ``EpochBasedTrainLoop``, AdamW/SGD, param schedulers, fp32 and bf16-autocast optimizer wrappers)
    and listing their globals with ``torch.serialization.get_unsafe_globals_in_checkpoint``.

    Returns:
        Entries for ``torch.serialization.add_safe_globals``: objects, or ``(object, 'module.name')``
        where the name in the pickle differs from the object's own ``__module__.__qualname__``.
    """
    return list(_ENTRIES)


def mmengine_safe_global_map() -> dict:
    """``{name in the pickle: stand-in}`` for :func:`mmengine_safe_globals`."""
    pairs = (e if isinstance(e, tuple) else (e, f'{e.__module__}.{e.__qualname__}') for e in _ENTRIES)
    return {name: obj for obj, name in pairs}


_CHECKPOINTS_ALLOWED = False


def allow_mmengine_checkpoints() -> None:
    """Make mmengine's checkpoint loading (``load_checkpoint``, ``resume``, ``load_from``) work.

    PyTorch >= 2.6 loads with ``weights_only=True`` by default and mmengine 0.10.7 calls
    ``torch.load`` without ``weights_only``, so a checkpoint that mmengine itself wrote (numpy arrays and
    scalars, ``HistoryBuffer`` objects in the message hub) fails with ``UnpicklingError: Weights only
    load failed``. This registers checked stand-ins for exactly those names with
    ``torch.serialization.add_safe_globals`` (see :func:`mmengine_safe_globals`); ``weights_only`` stays
    on, so a file that names any other class or function is still refused. Calling it again does nothing.
    """
    global _CHECKPOINTS_ALLOWED
    if _CHECKPOINTS_ALLOWED:
        return
    torch.serialization.add_safe_globals(mmengine_safe_globals())
    _CHECKPOINTS_ALLOWED = True
