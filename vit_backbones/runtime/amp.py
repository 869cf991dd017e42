"""Mixed-precision training on the CPU (bfloat16 autocast), and the ``--amp`` switch of our tools."""
import warnings
from contextlib import contextmanager
from typing import Optional, Union

import torch
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from ..registry import register_real

__all__ = ['BF16AutocastOptimWrapper', 'cpu_bf16_support', 'enable_amp']

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


register_real(OPTIM_WRAPPERS, BF16AutocastOptimWrapper)


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
