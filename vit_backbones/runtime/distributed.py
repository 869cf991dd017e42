"""Distributed training on machines without CUDA (gloo backend, DDP without ``device_ids``)."""
import datetime
import os
import subprocess
from typing import Any, Dict, Optional

import torch
import torch.distributed as torch_dist
from mmengine.config import Config, ConfigDict

__all__ = ['init_cpu_distributed', 'prepare_distributed']

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
