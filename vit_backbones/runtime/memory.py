"""Keeping freed memory for reuse: glibc's malloc set up for the large buffers a training or inference loop
frees and asks for again every step.

By default glibc's ``malloc`` serves a request above its mmap threshold (dynamic, at most 32 MiB on
64-bit Linux) with a fresh ``mmap`` and unmaps it on ``free``; the next step's buffer of the same size
then faults in and zero-fills new pages. It also returns free memory at the top of the heap to the
system once more than twice that threshold is free, so even smaller buffers are refilled from the
kernel after every step that freed its activations. On this project's CPU that was 12-18% of a Swin-T
bfloat16 training step at 800x1216 and a quarter of a ViT-B one at 512x512 (see the README's speed
section). :func:`keep_freed_memory` raises both thresholds, so freed blocks stay in the process and are
reused: the resident set then stays at the loop's high-water mark between steps instead of dropping
and refilling. ``tools/train.py``, ``tools/test.py``, ``tools/extract_features.py`` and the benchmarks
call it; set ``VIT_BACKBONES_MALLOC=default`` to keep glibc's behaviour (inputs whose sizes vary a
lot, e.g. multi-scale detection training, may fragment a heap that is never trimmed).
"""
import ctypes
import ctypes.util
import os
import sys

__all__ = ['keep_freed_memory']

#: glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: environment switch: ``default`` leaves malloc as it is
ENV = 'VIT_BACKBONES_MALLOC'
_DONE = []


def _libc():
    if not sys.platform.startswith('linux'):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        return libc if hasattr(libc, 'mallopt') else None
    except (OSError, AttributeError):  # not glibc (musl has no gnu_get_libc_version)
        return None


def keep_freed_memory(mmap_threshold: int = 2**30) -> str:
    """Have glibc's malloc keep freed memory for reuse (see the module docstring); idempotent.

    Requests below ``mmap_threshold`` bytes come from the heap, and the heap's top is no longer trimmed
    (``M_TRIM_THRESHOLD`` -1). Returns a line for the log saying what was done, or why nothing was (not
    glibc, or ``VIT_BACKBONES_MALLOC=default``).
    """
    if _DONE:
        return _DONE[0]
    choice = os.environ.get(ENV, 'keep').strip().lower()
    if choice not in ('keep', 'default'):
        raise ValueError(f'{ENV}={os.environ[ENV]!r}: use "keep" (reuse freed memory, the default) or "default" '
                         '(glibc malloc as configured by the environment)')
    libc = None if choice == 'default' else _libc()
    if choice == 'default':
        msg = f'malloc: glibc defaults ({ENV}=default)'
    elif libc is None:
        msg = 'malloc: left as it is (not glibc)'
    elif not (libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(min(mmap_threshold, 2**31 - 1)))
              and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(-1))):
        msg = 'malloc: glibc refused the thresholds; left as it is'
    else:
        msg = (f'malloc: freed memory kept for reuse (glibc {libc.gnu_get_libc_version().decode()}: mmap threshold '
               f'{min(mmap_threshold, 2**31 - 1) >> 20} MiB, no trimming; {ENV}=default to leave it)')
    _DONE.append(msg)
    return msg
