"""Running mmdet / mmseg training and testing with mmengine 0.10 on recent PyTorch, one module per job.

* :mod:`.safe_globals`: ``torch.load(weights_only=True)`` (PyTorch's default since 2.6) reads the
  checkpoints mmengine's ``Runner`` writes; nothing else that needs code to run is allowed.
* :mod:`.checkpoint_hook`: crash-safe checkpoints (atomic writes, retention after the new file is
  durable) that carry the RNG states, so a killed run resumes exactly; ``--resume`` that finds the
  newest checkpoint that loads.
* :mod:`.amp`: bfloat16 autocast training on the CPU (mmengine's ``AmpOptimWrapper`` needs CUDA).
* :mod:`.scope`: whether a config is an mmdet or an mmseg one, and registering that library's modules.
* :mod:`.distributed`: ``--launcher pytorch|slurm|mpi`` on machines without CUDA.
* :mod:`.memory`: glibc's malloc keeping freed memory for reuse (what our tools run with).

Everything imports with torch, mmengine and numpy alone; mmdet and mmseg are imported lazily. The names
below are imported from their module when first used (``from vit_backbones.runtime import enable_amp``
imports ``.amp`` only), so that ``import vit_backbones`` needs :mod:`.safe_globals` alone.
"""
import importlib

_MODULE_OF = {
    'BF16AutocastOptimWrapper': 'amp', 'cpu_bf16_support': 'amp', 'enable_amp': 'amp',
    'SafeCheckpointHook': 'checkpoint_hook', 'find_resume_checkpoint': 'checkpoint_hook',
    'use_safe_checkpoint_hook': 'checkpoint_hook',
    'init_cpu_distributed': 'distributed', 'prepare_distributed': 'distributed',
    'keep_freed_memory': 'memory',
    'allow_mmengine_checkpoints': 'safe_globals', 'mmengine_safe_globals': 'safe_globals',
    'SUPPORTED_SCOPES': 'scope', 'register_scope_modules': 'scope', 'resolve_scope': 'scope',
}
__all__ = list(_MODULE_OF)


def __getattr__(name):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f'.{_MODULE_OF[name]}', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted(set(globals()) | set(_MODULE_OF))
