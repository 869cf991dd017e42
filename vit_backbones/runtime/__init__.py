"""Running mmdet / mmseg training and testing with mmengine 0.10 on recent PyTorch, one module per job.

* :mod:`.safe_globals`: ``torch.load(weights_only=True)`` (PyTorch's default since 2.6) reads the
  checkpoints mmengine's ``Runner`` writes; nothing else that needs code to run is allowed.
* :mod:`.checkpoint_hook`: crash-safe checkpoints (atomic writes, retention after the new file is
  durable) that carry the RNG states, so a killed run resumes exactly; ``--resume`` that finds the
  newest checkpoint that loads.
* :mod:`.amp`: bfloat16 autocast training on the CPU (mmengine's ``AmpOptimWrapper`` needs CUDA).
* :mod:`.scope`: whether a config is an mmdet or an mmseg one, and registering that library's modules.
* :mod:`.distributed`: ``--launcher pytorch|slurm|mpi`` on machines without CUDA.

Everything imports with torch, mmengine and numpy alone; mmdet and mmseg are imported lazily.
"""
from .amp import BF16AutocastOptimWrapper, cpu_bf16_support, enable_amp
from .checkpoint_hook import SafeCheckpointHook, find_resume_checkpoint, use_safe_checkpoint_hook
from .distributed import init_cpu_distributed, prepare_distributed
from .safe_globals import allow_mmengine_checkpoints, mmengine_safe_globals
from .scope import SUPPORTED_SCOPES, register_scope_modules, resolve_scope

__all__ = [
    'allow_mmengine_checkpoints', 'mmengine_safe_globals', 'BF16AutocastOptimWrapper', 'cpu_bf16_support',
    'enable_amp', 'SUPPORTED_SCOPES', 'resolve_scope', 'register_scope_modules', 'init_cpu_distributed',
    'prepare_distributed', 'SafeCheckpointHook', 'find_resume_checkpoint', 'use_safe_checkpoint_hook'
]
