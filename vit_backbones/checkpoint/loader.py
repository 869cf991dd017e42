"""Load classification / detection checkpoints of any supported layout into our backbones.

Each backbone class provides ``convert_checkpoint(state_dict) -> (state_dict_in_our_names, format,
dropped)`` that recognises the layout (official repository, timm, HF transformers, mmdet/mmseg, ours)
and renames keys; this module then resizes tensors whose shape depends on the input or window size
(through the backbone's ``resize_checkpoint_tensor``), checks the values, loads, and reports.
"""
import math
import os
import warnings
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .errors import CheckpointFileError, CheckpointMismatchError
from .io import extract_state_dict, read_checkpoint
from .report import LoadReport
from .unpickler import foreign_objects

__all__ = ['CheckpointMismatchError', 'CheckpointResizeWarning', 'load_pretrained', 'strip_prefix']


class CheckpointResizeWarning(UserWarning):
    """A checkpoint tensor was interpolated to the model's grid or window: close, but not exact."""


def strip_prefix(sd: Mapping[str, torch.Tensor], prefixes=('backbone.', 'encoder.')) -> dict:
    """Keep the keys under the first of ``prefixes`` that occurs (detector/segmentor checkpoints)."""
    for p in prefixes:
        if any(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    return dict(sd)


def _square_grids(old: int, new: int, max_prefix: int = 2) -> Optional[Tuple[int, int]]:
    """Sides of the square token grids of two position embeddings of ``old`` and ``new`` tokens."""
    for prefix in range(max_prefix + 1):
        a, b = math.isqrt(max(old - prefix, 0)), math.isqrt(max(new - prefix, 0))
        if a and b and a * a == old - prefix and b * b == new - prefix:
            return a, b
    return None


def _resize_note(model: nn.Module, key: str, old: tuple, new: tuple) -> Optional[Tuple[str, str]]:
    """(what was interpolated, how to keep it exact) for a lossy resize, or None if not one we know."""
    from ..layers.rel_pos import window_from_table_len
    if key.endswith('pos_embed') and len(old) == 3 and (sides := _square_grids(old[1], new[1])):
        a, b = sides
        what = f'the position embedding {key} was resampled from a {a}x{a} to a {b}x{b} grid'
        if key == 'pos_embed' and hasattr(model, 'patch_size'):
            return what, f'building the backbone with img_size={a * model.patch_size} keeps it exact'
        if hasattr(model, 'pretrain_img_size'):
            return what, f'building the backbone with pretrain_img_size={round(model.pretrain_img_size * a / b)} ' \
                         'keeps it exact'
        return what, 'building the backbone for the resolution the checkpoint was trained at keeps it exact'
    if key.endswith('relative_position_bias_table') and len(old) == 2:
        try:
            (a, _), (b, _) = window_from_table_len(old[0]), window_from_table_len(new[0])
        except ValueError:
            return None
        return (f'relative position bias tables were resampled from window {a}x{a} to {b}x{b}',
                f'building the backbone with window_size={a} keeps them exact')
    if key.endswith('attention_biases') and len(old) == 2:
        a, b = math.isqrt(old[1]), math.isqrt(new[1])
        if a * a == old[1] and b * b == new[1]:
            return (f'attention bias tables were resampled from {a}x{a} to {b}x{b} offsets',
                    'building the backbone for the resolution the checkpoint was trained at keeps them exact')
    return None


def _resize_notes(model: nn.Module, resized: Dict[str, Tuple[tuple, tuple]]) -> List[str]:
    groups: Dict[Tuple[str, str], List[str]] = {}
    for key, (old, new) in resized.items():
        note = _resize_note(model, key, tuple(old), tuple(new))
        if note is not None:
            groups.setdefault(note, []).append(key)
    notes = []
    for (what, fix), keys in groups.items():
        where = '' if len(keys) == 1 and keys[0] in what else f' ({len(keys)}: {", ".join(keys[:3])}' + (
            ', ...)' if len(keys) > 3 else ')')
        notes.append(f'{what}{where} (interpolated, not exact); {fix}')
    return notes


def load_pretrained(model: nn.Module,
                    checkpoint: Union[str, os.PathLike, Mapping],
                    strict: Optional[bool] = False,
                    min_match: float = 0.5,
                    logger=None,
                    allow_nonfinite: bool = False) -> LoadReport:
    """Load ``checkpoint`` (a path or a state dict) into ``model`` and return a :class:`LoadReport`.

    ``strict``: False (default) accepts exactly the gaps a classification checkpoint has (the
    backbone's ``optional_checkpoint_keys``, e.g. per-level output norms) and refuses any other
    mismatch; True refuses any missing parameter; None loads whatever fits. Missing buffers are
    reported (``missing_buffers``), not refused. An interpolated position embedding or bias table
    warns (:class:`CheckpointResizeWarning`) and is noted in the report.

    Raises:
        CheckpointMismatchError: the file is for another model or another variant (fewer than
            ``min_match`` of the parameters found a tensor, a block is missing or extra, a shape
            cannot be resized), or it holds integer / bool / complex tensors where the model has
            floating-point ones, with the keys that show it.
        CheckpointFileError: the file cannot be read (see :func:`read_checkpoint`), is not a state
            dict, or holds NaN / inf values (unless ``allow_nonfinite``).
    """
    name = type(model).__name__
    arch = getattr(model, 'arch_name', '?')
    source = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else 'the checkpoint'
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    sd = extract_state_dict(ckpt, source)
    try:
        converted, fmt, dropped = model.convert_checkpoint(sd)
    except CheckpointMismatchError as e:
        if source in str(e) or not isinstance(checkpoint, (str, os.PathLike)):
            raise
        raise CheckpointMismatchError(f'{source}: {e}') from None
    report = LoadReport(source_format=fmt, dropped=dict(dropped), foreign=foreign_objects(ckpt))
    own = model.state_dict()
    to_load = {}
    shape_errors = []
    for k, v in converted.items():
        if k not in own:
            report.dropped[k] = 'not a parameter of this model'
            continue
        if v.shape != own[k].shape:
            new = model.resize_checkpoint_tensor(k, v)
            if new is None or new.shape != own[k].shape:
                shape_errors.append(f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}')
                report.dropped[k] = 'shape mismatch'
                continue
            report.resized[k] = (tuple(v.shape), tuple(new.shape))
            v = new
        to_load[k] = v
    params = [k for k, _ in model.named_parameters()]
    matched = sum(k in to_load for k in params)
    optional = set(model.optional_checkpoint_keys())
    missing = [k for k in params if k not in to_load]
    structural = [k for k in missing if k not in optional]
    extra = [k for k, why in report.dropped.items() if why == 'not a parameter of this model']
    if strict is not None and matched < min_match * len(params):
        detail = '; '.join(shape_errors[:3])
        raise CheckpointMismatchError(
            f'{source} does not fit {name}(arch={arch}): only {matched} of '
            f'{len(params)} parameters found a tensor (recognised layout: {fmt}). '
            + (f'Shape mismatches: {detail}. ' if detail else '')
            + 'Is it a checkpoint of another model or another variant? Pass the matching arch.')
    if matched and (structural or extra or shape_errors) and strict is False:
        problems = []
        if structural:
            problems.append(f'{len(structural)} model parameters have no tensor (e.g. {structural[:3]})')
        if extra:
            problems.append(f'{len(extra)} checkpoint tensors have no place in the model (e.g. {extra[:3]})')
        if shape_errors:
            problems.append(f'shape mismatches: {"; ".join(shape_errors[:3])}')
        raise CheckpointMismatchError(
            f'{source} ({fmt} layout) does not match {name}(arch={arch}): '
            + '; '.join(problems) + '. Is it another variant? Build the backbone with the arch the checkpoint '
            'was trained with (or call load_pretrained(..., strict=None) to load what fits).')
    not_float = [f'{k} ({v.dtype})' for k, v in to_load.items() if own[k].is_floating_point() and not v.is_floating_point()]
    if not_float:
        raise CheckpointMismatchError(
            f'{source}: {len(not_float)} tensors are not floating point where {name} has floating-point weights: '
            f'{", ".join(not_float[:5])}{" ..." if len(not_float) > 5 else ""}. Converting them would silently change '
            'their values; is it a quantized, index or other non-weight file? Use a float checkpoint.')
    nonfinite = [k for k, v in to_load.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite and not allow_nonfinite:
        raise CheckpointFileError(
            f'{source}: {len(nonfinite)} tensors hold NaN or inf values: {", ".join(nonfinite[:5])}'
            f'{" ..." if len(nonfinite) > 5 else ""}. A diverged or damaged training run? Use another checkpoint, '
            'or pass allow_nonfinite=True (convert_checkpoint.py --allow-nonfinite) to load them anyway.')
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in to_load.items()}, strict=False)
    report.loaded = sorted(to_load)
    report.missing = missing
    param_set = set(params)
    report.missing_buffers = [k for k in own if k not in param_set and k not in to_load]
    report.nonfinite = nonfinite
    report.notes = _resize_notes(model, report.resized)
    for note in report.notes:
        warnings.warn(f'{name}: {note}', CheckpointResizeWarning, stacklevel=2)
    if strict and report.missing:
        raise CheckpointMismatchError(f'{name}: {source} lacks {report.missing}')
    if logger is not None:
        logger.info(report.summary())
    return report
