"""Reading checkpoint files without running code from them."""
import os
import pickle
from collections import OrderedDict
from typing import Dict, Mapping, Union

import torch

# Containers in which training frameworks nest the weights, tried in order.
_NESTED_KEYS = ('state_dict', 'model', 'module', 'model_state', 'state_dict_ema', 'model_ema')


def read_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """Load a checkpoint file (``.pth``/``.pt``/``.bin``/``.ckpt`` or ``.safetensors``) onto the CPU.

    Pickle-based files are read with ``torch.load(weights_only=True)``: tensors, containers and plain
    Python values load, while any object that would need code to be run is refused.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    if path.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f'reading {path} needs the safetensors package: pip install safetensors') from e
        return dict(load_file(path, device='cpu'))
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(
            f'{path} holds objects that can only be restored by running code from the file, which '
            f'vit_backbones never does (torch.load(weights_only=True) refused it: {str(e).splitlines()[0]}). '
            'Re-save its state_dict with plain tensors, e.g. '
            "torch.save(ckpt['state_dict'], 'weights.pth') in a trusted environment.") from e


def extract_state_dict(ckpt: Mapping) -> Dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint and strip DataParallel's ``module.`` prefix."""
    sd = ckpt
    while isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        for key in _NESTED_KEYS:
            if key in sd and isinstance(sd[key], Mapping):
                sd = sd[key]
                break
        else:
            raise ValueError('no tensors found in the checkpoint (looked in the top level and in '
                             f'{", ".join(_NESTED_KEYS)}); top-level keys: {list(ckpt)[:10]}')
    out = OrderedDict()
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        if k.startswith('module.'):
            k = k[len('module.'):]
        out[k] = v
    return out
