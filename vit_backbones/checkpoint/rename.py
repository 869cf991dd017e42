"""Key renaming for checkpoint converters: ordered regex rules applied to state-dict keys.

A rule is ``(pattern, replacement)`` as :func:`re.sub` takes them (the replacement may be a function of
the match). Rules apply in order, each to the result of the previous one, so a converter lists them from
the most specific to the most general where they overlap.
"""
import re
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

Rule = Tuple[str, Union[str, Callable[[re.Match], str]]]


def rename_key(key: str, rules: Sequence[Rule]) -> str:
    """``key`` after every rule of ``rules``, in order."""
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def rename_keys(sd: Mapping[str, torch.Tensor],
                rules: Sequence[Rule] = (),
                drop: Optional[Callable[[str], Optional[str]]] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Rename every key of ``sd`` by ``rules``; returns ``(renamed, dropped)``.

    ``drop(key)`` (on the original key) gives the reason a key is left out (for the load report), or None
    to keep it; ``dropped`` maps each left-out key to its reason.
    """
    out, dropped = {}, {}
    for key, value in sd.items():
        why = drop(key) if drop is not None else None
        if why:
            dropped[key] = why
        else:
            out[rename_key(key, rules)] = value
    return out, dropped


def unwrap_keys(sd: Mapping[str, torch.Tensor], prefixes: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Remove each of ``prefixes`` (in order) from the keys that start with it, keep the other keys as they
    are (DDP's ``module.``, the ``swin.`` / ``levit.`` of HF task models)."""
    out = dict(sd)
    for prefix in prefixes:
        out = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in out.items()}
    return out


def any_key_matches(keys, pattern: str) -> bool:
    """Whether ``re.match(pattern, key)`` holds for one of ``keys`` (layout detection)."""
    return any(re.match(pattern, k) for k in keys)
