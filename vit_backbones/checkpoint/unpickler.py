"""A pickle module for ``torch.load`` that restores data and never runs code from the file.

Globals resolve to the real object only for PyTorch's own weights-only allowlist (tensors, storages,
dtypes, ``OrderedDict`` ...) and vit_backbones' checked numpy / ``HistoryBuffer`` stand-ins
(:mod:`vit_backbones.runtime.safe_globals`). Any other global becomes a placeholder type made for this
read: never imported, and calling it raises :class:`UnsafeCheckpointError` naming the global. Objects of
such a class (``argparse.Namespace`` args, a yacs ``CfgNode`` config ...) become :class:`ForeignObject`
records holding the class name and the pickled arguments and state as plain data.

Built on the standard library's pure-Python unpickler, with every opcode that calls, builds or fills an
object replaced by a checked version; reads and allocations are bounded by the file's size.
"""
import pickle
import struct
import warnings
import _compat_pickle
from collections import Counter, OrderedDict
from types import SimpleNamespace
from typing import Any, Dict, List

import torch

from .errors import UnsafeCheckpointError

_FIX = ('Running code from a checkpoint is what vit_backbones never does. If the file is yours, save a plain '
        "state dict instead: torch.save(model.state_dict(), 'weights.pth') (or a .safetensors file).")


class ForeignObject(dict):
    """Inert record of an object whose class vit_backbones does not import.

    Dict items are the object's own items (dict subclasses such as yacs ``CfgNode``); ``args`` /
    ``kwargs`` the arguments it was created with, ``state`` what its ``__setstate__`` would have
    received (``argparse.Namespace``: its ``vars()``), ``listitems`` its items if a list subclass.
    ``foreign_name`` is the class's ``module.qualname``. Nothing here is ever called.
    """
    __slots__ = ('args', 'kwargs', 'state', 'listitems')
    foreign_name = '?'

    def __repr__(self):
        return f'<record of {self.foreign_name}>'


class _ForeignType(type):
    """Metaclass of the placeholders: calling one (REDUCE, or an allowed function calling it) is refused."""

    def __call__(cls, *args, **kwargs):
        raise UnsafeCheckpointError(f'restoring it would call GLOBAL {cls.foreign_name}{_preview(args)}. {_FIX}')

    def __repr__(cls):
        return f'<foreign global {cls.foreign_name}>'


class _Helper:
    """``copyreg`` helpers that pickle uses to describe plain objects; interpreted, never called."""
    __slots__ = ('name', )

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f'<{self.name}>'


_HELPERS = {n: _Helper(n) for n in ('copyreg._reconstructor', 'copyreg.__newobj__', 'copyreg.__newobj_ex__')}


def _preview(args) -> str:
    """A short, safe rendering of call arguments for messages."""

    def one(a, depth=0):
        if isinstance(a, (str, bytes)):
            r = repr(a)
            return r if len(r) <= 60 else r[:57] + '...'
        if type(a) is int and a.bit_length() > 64:
            return f'<int of {a.bit_length()} bits>'
        if a is None or type(a) in (bool, int, float):
            return repr(a)
        if isinstance(a, torch.Tensor):
            return f'tensor{tuple(a.shape)}'
        if type(a) in (tuple, list) and depth < 2:
            inner = ', '.join(one(x, depth + 1) for x in a[:4]) + (', ...' if len(a) > 4 else '')
            return (f'({inner},)' if len(a) == 1 else f'({inner})') if type(a) is tuple else f'[{inner}]'
        return repr(a) if isinstance(a, (ForeignObject, _ForeignType, _Helper)) else f'<{type(a).__name__}>'

    return one(tuple(args)) if isinstance(args, (tuple, list)) else ''


def _new_record(cls: _ForeignType, args=(), kwargs=None) -> ForeignObject:
    rec = dict.__new__(cls)
    rec.args, rec.kwargs, rec.state, rec.listitems = tuple(args), dict(kwargs or {}), None, []
    return rec


def _describe(obj) -> str:
    if isinstance(obj, _ForeignType):
        return f'GLOBAL {obj.foreign_name}'
    if isinstance(obj, type) or callable(obj):
        return f'{getattr(obj, "__module__", "?")}.{getattr(obj, "__qualname__", type(obj).__qualname__)}'
    if isinstance(obj, (torch.Tensor, dict, list, tuple, set)):
        return f'an object of type {type(obj).__qualname__}'
    return repr(obj)[:80]


def _allowed_globals() -> Dict[str, Any]:
    from torch._weights_only_unpickler import _get_allowed_globals
    from ..runtime.safe_globals import mmengine_safe_global_map
    return {**_get_allowed_globals(), **mmengine_safe_global_map()}


def _elements(args) -> int:
    """Product of the (non-bool) integers among ``args`` and inside its tuples/lists: a requested size."""
    n = 1
    for a in args:
        for x in (a if type(a) in (tuple, list, torch.Size) else (a, )):
            if type(x) is int:
                n *= max(x, 0)
    return n


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickler of :func:`restricted_pickle_module`; ``max_bytes`` (the file's size) is set per read."""
    max_bytes = 0
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        read, limit = self._file_read, self.max_bytes

        def bounded_read(n=-1):
            if n is not None and n > limit:
                raise pickle.UnpicklingError(f'a record claims {n} bytes, more than the whole file ({limit} bytes)')
            return read(n)

        self._file_read = bounded_read
        self._placeholders: Dict[str, _ForeignType] = {}
        globals_ = _allowed_globals()
        self._allowed = globals_
        self._allowed_ids = {id(v) for v in globals_.values()}
        self._rebuild_ids = {id(v) for k, v in globals_.items() if k.startswith('torch._utils._rebuild_')}
        self._allocators = {id(v) for v in (bytearray, torch.Tensor, torch.UntypedStorage, torch.TypedStorage,
                                            *torch._tensor_classes)}

    # -------------------------------------------------------------- names
    def find_class(self, module, name):
        if self.proto < 3 and self.fix_imports:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full = f'{module}.{name}'
        if full in self._allowed:
            return self._allowed[full]
        if full in _HELPERS:
            return _HELPERS[full]
        if full not in self._placeholders:
            self._placeholders[full] = _ForeignType(f'Foreign[{full}]', (ForeignObject, ), {
                '__slots__': (), 'foreign_name': full, '__module__': __name__})
        return self._placeholders[full]

    def _is_allowed(self, obj) -> bool:
        return id(obj) in self._allowed_ids

    # -------------------------------------------------------------- calls
    def _check_call(self, func, args) -> tuple:
        """Refuse allowed callables used to allocate beyond the file or to reach other code; returns args."""
        if id(func) in self._allocators and _elements(args) > self.max_bytes:
            raise UnsafeCheckpointError(f'restoring it would call {_describe(func)}{_preview(args)}, allocating more '
                                        f'than the whole file ({self.max_bytes} bytes). {_FIX}')
        if func is self._allowed.get('_codecs.encode') and not (
                len(args) == 2 and type(args[0]) is str and type(args[1]) is str and args[1] in ('latin1', 'latin-1')):
            raise UnsafeCheckpointError(f'restoring it would call _codecs.encode{_preview(args)} (pickle only '
                                        f"writes encode(str, 'latin1')). {_FIX}")
        if func is torch._utils._rebuild_qtensor and len(args) > 2 and _elements(args[2:3]) > self.max_bytes:
            raise UnsafeCheckpointError(f'a quantized tensor of size {_preview(args[2:3])} is larger than the file')
        if func is torch._tensor._rebuild_from_type_v2:
            inner, new_type, inner_args, state = args
            if id(inner) not in self._rebuild_ids:
                raise UnsafeCheckpointError(f'restoring a tensor subclass would call {_describe(inner)}, not one of '
                                            f"torch's tensor rebuild functions. {_FIX}")
            self._check_call(inner, inner_args)
            if isinstance(new_type, _ForeignType):  # a tensor subclass we do not import: keep the tensor
                warnings.warn(f'a tensor of class {new_type.foreign_name} (not imported) was restored as torch.Tensor')
                args = (inner, torch.Tensor, inner_args, state)
        return args

    def _call(self, func, args, kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, _ForeignType):
            raise UnsafeCheckpointError(f'restoring it would call GLOBAL {func.foreign_name}{_preview(args)}. {_FIX}')
        if isinstance(func, _Helper):
            if func.name == 'copyreg._reconstructor' and len(args) == 3 and not kwargs:
                return self._reconstructor(*args)
            if func.name == 'copyreg.__newobj__' and args:
                return self._new(args[0], args[1:], kwargs)
            if func.name == 'copyreg.__newobj_ex__' and len(args) == 3 and type(args[2]) is dict:
                return self._new(args[0], args[1], args[2])
            raise UnsafeCheckpointError(f'{func.name}{_preview(args)} is not how pickle describes an object. {_FIX}')
        if not self._is_allowed(func) or not callable(func):
            raise UnsafeCheckpointError(f'restoring it would call {_describe(func)}{_preview(args)}, which is not a '
                                        f'function vit_backbones allows. {_FIX}')
        args = self._check_call(func, tuple(args))
        return func(*args, **kwargs)

    def _new(self, cls, args, kwargs):
        if isinstance(cls, _ForeignType):
            return _new_record(cls, args, kwargs)
        if isinstance(cls, type) and self._is_allowed(cls):
            args = self._check_call(cls, tuple(args))
            return cls.__new__(cls, *args, **kwargs)
        raise UnsafeCheckpointError(f'restoring it would create an object of {_describe(cls)}. {_FIX}')

    def _reconstructor(self, cls, base, state):
        """``copyreg._reconstructor(cls, base, state)``: how protocols 0 and 1 describe plain objects."""
        if isinstance(base, _ForeignType):
            base_name = base.foreign_name
        else:
            base_name = {id(OrderedDict): 'collections.OrderedDict', id(Counter): 'collections.Counter'}.get(id(base))
        if isinstance(cls, _ForeignType) and base_name is not None and base_name.startswith(('builtins.', 'collections.')):
            rec = _new_record(cls)
            if base_name in ('builtins.dict', 'collections.OrderedDict', 'collections.Counter') and isinstance(state, dict):
                dict.update(rec, state)
            elif base_name == 'builtins.list' and type(state) is list:
                rec.listitems.extend(state)
            elif state is not None:
                rec.args = (state, )
            return rec
        if base_name == 'builtins.object' and state is None:
            return self._new(cls, (), {})
        raise UnsafeCheckpointError(f'copyreg._reconstructor{_preview((cls, base, state))} would run code. {_FIX}')

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, {}))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    def _instantiate(self, klass, args):  # INST / OBJ (protocols 0 and 1)
        if isinstance(klass, _ForeignType) and not args:
            self.append(_new_record(klass))
        else:
            self.append(self._call(klass, tuple(args)))

    # -------------------------------------------------------------- filling objects
    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        kind = type(inst)
        if isinstance(inst, ForeignObject):
            inst.state = state
        elif kind is torch.Tensor:
            inst.set_(*state)
        elif kind is torch.nn.Parameter:
            inst.__setstate__(state)
        elif kind is OrderedDict:
            inst.__dict__.update(state or {})
        elif self._is_allowed(kind) and hasattr(kind, '__setstate__'):
            inst.__setstate__(state)
        else:
            raise UnsafeCheckpointError(f'restoring it would set the state of {_describe(inst)}{_preview((state, ))}, '
                                        f'which vit_backbones does not allow. {_FIX}')

    def _list_target(self, opcode):
        target = self.stack[-1]
        if type(target) is list:
            return target
        if isinstance(target, ForeignObject):
            return target.listitems
        raise UnsafeCheckpointError(f'{opcode} on {_describe(target)}: only lists and records are filled. {_FIX}')

    def load_append(self):
        item = self.stack.pop()
        self._list_target('APPEND').append(item)

    def load_appends(self):
        items = self.pop_mark()
        self._list_target('APPENDS').extend(items)

    def _dict_target(self, opcode):
        target = self.stack[-1]
        if type(target) in (dict, OrderedDict, Counter) or isinstance(target, ForeignObject):
            return target
        raise UnsafeCheckpointError(f'{opcode} on {_describe(target)}: only dicts and records are filled. {_FIX}')

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._dict_target('SETITEM')[key] = value

    def load_setitems(self):
        items = self.pop_mark()
        target = self._dict_target('SETITEMS')
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_additems(self):
        items = self.pop_mark()
        if type(self.stack[-1]) is not set:
            raise UnsafeCheckpointError(f'ADDITEMS on {_describe(self.stack[-1])}: only sets are filled. {_FIX}')
        self.stack[-1].update(items)

    # -------------------------------------------------------------- other opcodes
    def load_persid(self):
        raise pickle.UnpicklingError('text persistent ids (protocol 0) are not written by torch.save')

    def load_binpersid(self):
        pid = self.stack.pop()
        self.append(self._persistent(pid))

    def _persistent(self, pid):
        """Only torch's storage records (and legacy module records, returned as they are) are accepted."""
        if type(pid) is not tuple or not pid:
            raise pickle.UnpicklingError(f'persistent id {_preview((pid, ))} is not a torch.save storage record')
        typename = pid[0].decode('ascii') if isinstance(pid[0], bytes) else pid[0]
        if type(typename) is str and typename == 'module' and len(pid) > 1:
            return pid[1]  # the container class of a legacy whole-module save; its source check is skipped
        if type(typename) is not str or typename != 'storage' or len(pid) not in (5, 6):
            raise pickle.UnpicklingError(f'persistent id {_preview(pid)} is not a torch.save storage record')
        storage_type, numel = pid[1], pid[4]
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, 'dtype', None)
        if not isinstance(dtype, torch.dtype) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f'persistent id {_preview(pid)} is not a torch.save storage record')
        if numel * torch._utils._element_size(dtype) > self.max_bytes:
            raise pickle.UnpicklingError(f'a tensor storage claims {numel} elements of {dtype}, more than the whole '
                                         f'file ({self.max_bytes} bytes)')
        return self.persistent_load(pid)

    def get_extension(self, code):
        raise UnsafeCheckpointError(f'the pickle uses extension code {code} (EXT opcodes), which resolve globals '
                                    f'through the process-wide copyreg registry. {_FIX}')

    def load_bytearray8(self):
        n, = struct.unpack('<Q', self.read(8))
        if n > self.max_bytes:
            raise pickle.UnpicklingError(f'a bytearray claims {n} bytes, more than the whole file')
        b = bytearray(n)
        self.readinto(b)
        self.append(b)

    for _op, _fn in ((pickle.REDUCE, load_reduce), (pickle.NEWOBJ, load_newobj), (pickle.NEWOBJ_EX, load_newobj_ex),
                     (pickle.BUILD, load_build), (pickle.APPEND, load_append), (pickle.APPENDS, load_appends),
                     (pickle.SETITEM, load_setitem), (pickle.SETITEMS, load_setitems),
                     (pickle.ADDITEMS, load_additems), (pickle.PERSID, load_persid),
                     (pickle.BINPERSID, load_binpersid), (pickle.BYTEARRAY8, load_bytearray8)):
        dispatch[_op[0]] = _fn
    del _op, _fn


def restricted_pickle_module(max_bytes: int) -> SimpleNamespace:
    """A ``pickle_module`` for ``torch.load`` (``Unpickler`` and ``load``) bound to a file of ``max_bytes``."""
    unpickler = type('RestrictedUnpickler', (RestrictedUnpickler, ), {'max_bytes': int(max_bytes)})

    def load(file, **kwargs):
        return unpickler(file, **kwargs).load()

    return SimpleNamespace(__name__=__name__, Unpickler=unpickler, load=load)


def foreign_objects(obj: Any, max_paths: int = 20) -> Dict[str, List[str]]:
    """``{class or global name: [first paths]}`` of the records and placeholder globals inside ``obj``."""
    found: Dict[str, List[str]] = {}

    def note(name, path):
        paths = found.setdefault(name, [])
        if len(paths) < max_paths:
            paths.append(path or '<top>')

    seen = set()
    todo = [(obj, '')]
    while todo:
        x, path = todo.pop()
        if isinstance(x, _ForeignType):
            note(f'{x.foreign_name} (a reference)', path)
            continue
        if not isinstance(x, (dict, list, tuple, set, frozenset)) or id(x) in seen:
            continue
        seen.add(id(x))
        children = []
        if isinstance(x, ForeignObject):
            note(x.foreign_name, path)
            children += [(x.args, f'{path}.args'), (x.kwargs, f'{path}.kwargs'), (x.state, f'{path}.state'),
                         (x.listitems, f'{path}.listitems')]
        if isinstance(x, dict):
            children += [(v, f'{path}[{k!r}]') for k, v in x.items()]
            children += [(k, f'{path}.keys()') for k in x if isinstance(k, (tuple, frozenset, _ForeignType))]
        elif isinstance(x, (list, tuple)):
            children += [(v, f'{path}[{i}]') for i, v in enumerate(x)]
        else:
            children += [(v, f'{path}{{...}}') for v in x]
        todo.extend(reversed(children))
    return found
