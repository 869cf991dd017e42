"""Runtime fixes for training and testing with mmengine 0.10.x on recent PyTorch.

Everything here imports with torch, mmengine and numpy alone; mmdet and mmseg are imported lazily,
only by :func:`register_scope_modules`.

* :func:`allow_mmengine_checkpoints` lets ``torch.load(..., weights_only=True)`` (PyTorch's default
  since 2.6) read the checkpoints that mmengine's ``Runner`` writes, by allow-listing exactly the
  non-tensor objects mmengine puts in them. Arbitrary classes and functions stay refused.
* :class:`BF16AutocastOptimWrapper` is mixed-precision training for CPUs: mmengine's
  ``AmpOptimWrapper`` refuses to run without an accelerator.
* :func:`init_cpu_distributed` and :func:`prepare_distributed` make ``--launcher pytorch|slurm|mpi``
  work on machines without CUDA (gloo backend, DDP without ``device_ids``).
* :func:`resolve_scope` decides from a config whether it is an mmdet or an mmseg config.
"""
import datetime
import os
import subprocess
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as torch_dist
from mmengine.config import Config, ConfigDict
from mmengine.logging import HistoryBuffer
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

__all__ = [
    'allow_mmengine_checkpoints', 'mmengine_safe_globals', 'BF16AutocastOptimWrapper', 'SUPPORTED_SCOPES',
    'resolve_scope', 'register_scope_modules', 'enable_amp', 'init_cpu_distributed', 'prepare_distributed'
]

# --------------------------------------------------------------------------------------------------
# Checkpoint loading under weights_only=True
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Mixed precision on CPU
# --------------------------------------------------------------------------------------------------


class BF16AutocastOptimWrapper(OptimWrapper):
    """An ``OptimWrapper`` that runs the forward pass and loss under ``torch.autocast`` (bfloat16).

    mmengine's ``AmpOptimWrapper`` asserts that CUDA (or NPU/MLU/MUSA) is available, so it cannot be
    used for CPU training. bfloat16 has float32's exponent range, so no loss scaling is needed:
    parameters, gradients and optimizer state stay float32, and only autocast-eligible ops
    (matmul, conv, linear) run in bfloat16.

    Args:
        dtype: Autocast dtype, ``'bfloat16'`` (default) or a ``torch.dtype``.
        device_type: Device type for ``torch.autocast``; ``'cpu'`` by default.
        **kwargs: ``OptimWrapper`` arguments (``optimizer``, ``clip_grad``, ``accumulative_counts``).
    """

    def __init__(self, dtype: Union[str, torch.dtype] = 'bfloat16', device_type: str = 'cpu', **kwargs):
        super().__init__(**kwargs)
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f'BF16AutocastOptimWrapper: unknown dtype {dtype!r}; use "bfloat16"')
            dtype = getattr(torch, dtype)
        self.cast_dtype = dtype
        self.device_type = device_type

    @contextmanager
    def optim_context(self, model: torch.nn.Module):
        """Gradient-accumulation context of ``OptimWrapper`` plus autocast to ``cast_dtype``."""
        with super().optim_context(model), torch.autocast(device_type=self.device_type, dtype=self.cast_dtype):
            yield


if 'BF16AutocastOptimWrapper' not in OPTIM_WRAPPERS.module_dict:
    OPTIM_WRAPPERS.register_module(module=BF16AutocastOptimWrapper)


def cpu_bf16_support() -> Optional[str]:
    """The CPU's native bfloat16 matmul instructions ('amx_bf16', 'avx512_bf16'), '' if it has none, or
    None if that cannot be read (not Linux). Without them bf16 matmuls are emulated and run several
    times slower than float32 (measured here: 2048x2048 matmul 0.24x of fp32 on an AVX-512 Xeon
    without AVX512-BF16)."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    except OSError:
        return None
    for name in ('amx_bf16', 'avx512_bf16'):
        if name in flags:
            return name
    return ''


def enable_amp(cfg: Config) -> str:
    """Switch a config's optimizer wrapper to mixed precision, in place.

    On CUDA: mmengine's ``AmpOptimWrapper`` (float16 autocast, dynamic loss scaling), as mmdet's and
    mmseg's ``--amp`` do. Without CUDA: :class:`BF16AutocastOptimWrapper` (bfloat16 autocast on the
    CPU, no loss scaling); a config written for GPUs with ``AmpOptimWrapper`` is switched to it too,
    since ``AmpOptimWrapper`` refuses to run without CUDA. Otherwise a config whose wrapper already is
    one of the two is left alone.

    Args:
        cfg: The config; must have ``optim_wrapper``.

    Returns:
        The wrapper type now in the config.
    """
    if 'optim_wrapper' not in cfg:
        raise KeyError('--amp needs an "optim_wrapper" in the config to switch to mixed precision')
    wrapper = cfg.optim_wrapper
    current = wrapper.get('type', 'OptimWrapper')
    cuda = torch.cuda.is_available()
    if not cuda and cpu_bf16_support() == '':
        warnings.warn('--amp: this CPU has no native bfloat16 instructions (no AMX-BF16 / AVX512-BF16), so '
                      'bf16 autocast will be SLOWER than float32 here; drop --amp on this machine.')
    if current == 'BF16AutocastOptimWrapper' or (current == 'AmpOptimWrapper' and cuda):
        return current
    if current == 'AmpOptimWrapper':  # no CUDA: AmpOptimWrapper would fail, use bf16 autocast instead
        for key in ('loss_scale', 'use_fsdp', 'dtype'):
            wrapper.pop(key, None)
        wrapper.type = 'BF16AutocastOptimWrapper'
        wrapper.dtype = 'bfloat16'
        return wrapper.type
    if current != 'OptimWrapper':
        raise ValueError(f'--amp only replaces a plain OptimWrapper, but the config uses {current!r}; '
                         'set a mixed-precision wrapper in the config instead')
    if cuda:
        wrapper.type = 'AmpOptimWrapper'
        wrapper.loss_scale = 'dynamic'
    else:
        wrapper.type = 'BF16AutocastOptimWrapper'
        wrapper.dtype = 'bfloat16'
    return wrapper.type


# --------------------------------------------------------------------------------------------------
# Which OpenMMLab library a config belongs to
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Distributed training without CUDA
# --------------------------------------------------------------------------------------------------


def _dist_env_from_launcher(launcher: str) -> Dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* for ``launcher``, from the launcher's environment."""
    env: Dict[str, str] = {}
    if launcher == 'pytorch':
        missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if k not in os.environ]
        if missing:
            raise RuntimeError(f'--launcher pytorch needs the environment variables {missing}; start the script '
                               'with "python -m torch.distributed.run --nproc_per_node N tools/train.py ..."')
        env['LOCAL_RANK'] = os.environ.get('LOCAL_RANK', '0')
    elif launcher == 'slurm':
        proc_id = int(os.environ['SLURM_PROCID'])
        env['RANK'] = str(proc_id)
        env['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
        env['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', str(proc_id))
        os.environ.setdefault('MASTER_PORT', '29500')
        if 'MASTER_ADDR' not in os.environ:
            nodes = os.environ['SLURM_NODELIST']
            env['MASTER_ADDR'] = subprocess.getoutput(f'scontrol show hostname {nodes} | head -n1').strip()
    elif launcher == 'mpi':
        env['RANK'] = os.environ['OMPI_COMM_WORLD_RANK']
        env['WORLD_SIZE'] = os.environ['OMPI_COMM_WORLD_SIZE']
        env['LOCAL_RANK'] = os.environ.get('OMPI_COMM_WORLD_LOCAL_RANK', '0')
        os.environ.setdefault('MASTER_PORT', '29500')
        if 'MASTER_ADDR' not in os.environ:
            raise RuntimeError('--launcher mpi needs the environment variable MASTER_ADDR')
    else:
        raise ValueError(f'unknown launcher {launcher!r}; expected none, pytorch, slurm or mpi')
    return env


def init_cpu_distributed(launcher: str, backend: str = 'gloo', timeout: Optional[float] = None) -> None:
    """Initialise ``torch.distributed`` for CPU processes.

    mmengine's ``init_dist`` calls ``torch.cuda.set_device`` first, which fails without CUDA
    (``module 'torch._C' has no attribute '_cuda_setDevice'``). This sets the standard environment
    variables from the launcher's own (as ``init_dist`` does) and calls ``init_process_group``
    with ``env://``. The Runner then sees an initialised group and skips its own ``init_dist``.

    Args:
        launcher: ``'pytorch'``, ``'slurm'`` or ``'mpi'``.
        backend: Process-group backend; ``'gloo'`` (default) or ``'mpi'``.
        timeout: Collective timeout in seconds; PyTorch's default when None.
    """
    if torch_dist.is_initialized():
        return
    os.environ.update(_dist_env_from_launcher(launcher))
    kwargs: Dict[str, Any] = {}
    if timeout is not None:
        kwargs['timeout'] = datetime.timedelta(seconds=timeout)
    torch_dist.init_process_group(backend=backend, init_method='env://', **kwargs)


def prepare_distributed(cfg: Config, launcher: str) -> None:
    """Set ``cfg.launcher`` and, on machines without CUDA, make distributed training work on the CPU.

    With a launcher other than ``'none'`` and no CUDA, this (1) sets ``env_cfg.dist_cfg.backend`` to
    ``'gloo'`` (mmengine's default, nccl, needs GPUs), (2) initialises the process group itself with
    :func:`init_cpu_distributed`, and (3) sets ``model_wrapper_cfg`` so that DDP is built with
    ``device_ids=None``: mmengine passes ``device_ids=[LOCAL_RANK]``, which DDP rejects for a CPU module.
    With CUDA, mmengine's own path is used unchanged.

    Args:
        cfg: The config, modified in place.
        launcher: ``'none'``, ``'pytorch'``, ``'slurm'`` or ``'mpi'``.
    """
    if launcher not in ('none', 'pytorch', 'slurm', 'mpi'):
        raise ValueError(f'unknown launcher {launcher!r}; expected none, pytorch, slurm or mpi')
    cfg.launcher = launcher
    if launcher == 'none' or torch.cuda.is_available():
        return
    env_cfg = cfg.setdefault('env_cfg', ConfigDict())
    dist_cfg = env_cfg.setdefault('dist_cfg', ConfigDict())
    if dist_cfg.get('backend', 'nccl') not in ('gloo', 'mpi'):
        dist_cfg.backend = 'gloo'
    wrapper_cfg = cfg.get('model_wrapper_cfg')
    if wrapper_cfg is None:
        cfg.model_wrapper_cfg = ConfigDict(
            type='MMDistributedDataParallel',
            device_ids=None,
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    elif wrapper_cfg.get('type', 'MMDistributedDataParallel') in ('MMDistributedDataParallel',
                                                                   'DistributedDataParallel'):
        wrapper_cfg.device_ids = None
    init_cpu_distributed(launcher, backend=dist_cfg.backend, timeout=dist_cfg.get('timeout'))
