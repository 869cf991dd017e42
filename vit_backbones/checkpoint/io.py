"""Reading checkpoint files without running code from them."""
import os
import pickle
import re
import tarfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Dict, Union

import torch

from .errors import CheckpointError, CheckpointFileError, CheckpointNotFoundError, UnsafeCheckpointError
from .unpickler import ForeignObject, restricted_pickle_module

# Containers in which training frameworks nest the weights, tried in order.
_NESTED_KEYS = ('state_dict', 'model', 'module', 'model_state', 'state_dict_ema', 'model_ema')
_ZIP_MAGIC = b'PK\x03\x04'
_REFETCH = 'Fetch or copy the file again (compare its size and checksum with the source).'


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f'{type(e).__name__}: {text.splitlines()[0] if text else ""}'


def read_checkpoint(path: Union[str, os.PathLike]) -> Any:
    """Load a checkpoint file (``.pth``/``.pt``/``.bin``/``.ckpt`` or ``.safetensors``) onto the CPU.

    Pickle-based files are read by ``torch.load`` with :mod:`vit_backbones.checkpoint.unpickler`:
    tensors, containers and plain values load; objects of other classes (training ``args``, configs)
    become inert :class:`ForeignObject` records; a file that would call any function or class beyond
    PyTorch's weights-only allowlist is refused. No code from the file is imported or run.

    Raises:
        CheckpointFileError: the file is missing, empty, damaged, not a checkpoint, a TorchScript archive
            (:class:`CheckpointNotFoundError`, or :class:`UnsafeCheckpointError` for refused code),
            with the path, the problem and the fix.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f'checkpoint file not found: {path} (working directory {os.getcwd()}). '
                                      'Check the path.')
    if os.path.isdir(path):
        inside = sorted(n for n in os.listdir(path) if n.endswith(('.safetensors', '.bin', '.pth', '.pt', '.ckpt')))
        raise CheckpointFileError(f'{path} is a directory, not a checkpoint file. Pass the weights file inside it'
                                  + (f' (e.g. {os.path.join(path, inside[0])}).' if inside else '.'))
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointFileError(f'{path} is empty (0 bytes): the download or copy did not finish. {_REFETCH}')
    with open(path, 'rb') as f:
        head = f.read(16)
    if path.endswith('.safetensors'):
        return _read_safetensors(path, head)
    if head.startswith(_ZIP_MAGIC):
        _check_zip(path, size)
    elif _is_tar(path):
        raise CheckpointFileError(f'{path} is a tar archive: either the legacy format of PyTorch < 0.4, which '
                                  'vit_backbones does not read, or not a checkpoint. Re-save it with a current '
                                  "PyTorch (torch.save(state_dict, 'weights.pth')).")
    module = restricted_pickle_module(size)
    forced = os.getenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', '0').lower() in ('1', 'y', 'yes', 'true')
    try:
        if forced:  # torch then refuses any pickle module; its own weights-only reader is safe too, but stricter
            return torch.load(path, map_location='cpu', weights_only=True)
        return torch.load(path, map_location='cpu', weights_only=False, pickle_module=module, mmap=False)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f'refusing {path}: {e}') from None
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        if forced and 'Weights only load failed' in str(e):
            found = re.search(r'GLOBAL (\S+)', str(e))
            raise UnsafeCheckpointError(
                f'refusing {path}: TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, so it was read with torch\'s weights-only '
                f'reader, which refuses {"GLOBAL " + found.group(1) if found else "an object in it"}. Unset the '
                'variable to read training checkpoints with their args/configs as inert records.') from None
        raise _unreadable(path, head, e) from e
    except Exception as e:  # noqa: BLE001  (anything a damaged or foreign file makes torch or pickle raise)
        raise _unreadable(path, head, e) from e


def _unreadable(path: str, head: bytes, e: BaseException) -> CheckpointFileError:
    if head.startswith(_ZIP_MAGIC):
        return CheckpointFileError(f'{path} is a zip archive whose data could not be read ({_first_line(e)}): '
                                   f'a damaged file, or not a torch.save checkpoint. {_REFETCH}')
    looks = ' It looks like a text or HTML page (a failed download?).' if head.lstrip()[:1] in (b'<', b'{') else ''
    return CheckpointFileError(
        f'{path} is not a readable PyTorch checkpoint ({_first_line(e)}; first bytes {head[:8].hex(" ")}): '
        f'neither a torch.save zip archive nor a legacy torch.save stream, or one that was cut short.{looks} '
        f'Check that this is the weights file; if it is, it is damaged. {_REFETCH}')


def _is_tar(path: str) -> bool:
    try:
        with tarfile.open(path, mode='r:'):
            return True
    except (tarfile.TarError, OSError, ValueError):
        return False


def _check_zip(path: str, size: int) -> None:
    try:
        records = torch._C.PyTorchFileReader(path).get_all_records()
    except RuntimeError as e:
        raise CheckpointFileError(f'{path} is a truncated or damaged zip archive ({size} bytes; '
                                  f'{str(e).split(".")[0]}). {_REFETCH}') from None
    if 'constants.pkl' in records:
        raise UnsafeCheckpointError(f'refusing {path}: it is a TorchScript archive (torch.jit.save), and loading one '
                                    "runs its code. Save the model's weights instead: "
                                    "torch.save(model.state_dict(), 'weights.pth').")
    if 'data.pkl' not in records:
        raise CheckpointFileError(f'{path} is a zip archive but not a torch.save checkpoint (no data.pkl; it holds '
                                  f'{sorted(records)[:5]}). Check that this is the weights file.')


def _read_safetensors(path: str, head: bytes) -> Dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - depends on the environment
        raise CheckpointFileError(f'reading {path} needs the safetensors package: pip install safetensors') from None
    try:
        return dict(load_file(path, device='cpu'))
    except Exception as e:  # noqa: BLE001  (SafetensorError and the I/O errors behind it)
        hint = (' It starts like a torch.save zip archive: rename it to .pth.' if head.startswith(_ZIP_MAGIC) else '')
        raise CheckpointFileError(f'{path} is not a valid safetensors file ({_first_line(e)}): damaged or truncated.'
                                  f'{hint} {_REFETCH}') from None


def _not_a_state_dict(ckpt: Any, source: str) -> CheckpointFileError:
    if isinstance(ckpt, torch.Tensor):
        what = f'a single tensor of shape {tuple(ckpt.shape)}'
    elif isinstance(ckpt, (list, tuple)):
        what = f'a {type(ckpt).__name__} of {len(ckpt)} items'
    else:
        what = f'a {type(ckpt).__name__}'
    return CheckpointFileError(f'{source} holds {what}, not a state dict (a dict of parameter name -> tensor, '
                               f'possibly under one of {", ".join(_NESTED_KEYS)}). Save one with '
                               "torch.save(model.state_dict(), 'weights.pth').")


def extract_state_dict(ckpt: Any, source: str = 'the checkpoint') -> Dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint and strip DataParallel's ``module.`` prefix.

    Raises:
        CheckpointFileError: ``ckpt`` is no mapping (a list, a tensor ...) or holds no tensors; ``source``
            (the file name) is named in the message.
    """
    if not isinstance(ckpt, Mapping):
        raise _not_a_state_dict(ckpt, source)
    sd = ckpt
    while not any(isinstance(v, torch.Tensor) for v in sd.values()):
        for key in _NESTED_KEYS:
            if key in sd and isinstance(sd[key], Mapping):
                sd = sd[key]
                break
        else:
            whole = (f' It holds a whole pickled {sd.foreign_name} object, not its weights: save its state_dict() '
                     'instead.' if isinstance(sd, ForeignObject) and not len(sd) else '')
            raise CheckpointFileError(f'no tensors found in {source} (looked in the top level and in '
                                      f'{", ".join(_NESTED_KEYS)}); top-level keys: {list(ckpt)[:10]}.{whole}')
    out = OrderedDict()
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        if isinstance(k, str) and k.startswith('module.'):
            k = k[len('module.'):]
        out[k] = v
    return out
