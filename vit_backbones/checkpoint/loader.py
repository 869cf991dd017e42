"""Load classification / detection checkpoints of any supported layout into our backbones.

Each backbone class provides ``convert_checkpoint(state_dict) -> (state_dict_in_our_names, format,
dropped)`` that recognises the layout (official repository, timm, HF transformers, mmdet/mmseg, ours)
and renames keys; this module then resizes tensors whose shape depends on the input or window size
(through the backbone's ``resize_checkpoint_tensor``), loads, and reports.
"""
import os
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .io import extract_state_dict, read_checkpoint
from .report import LoadReport


class CheckpointMismatchError(ValueError):
    """The checkpoint does not belong to this backbone (or to this variant of it)."""


def strip_prefix(sd: Mapping[str, torch.Tensor], prefixes=('backbone.', 'encoder.')) -> dict:
    """Keep the keys under the first of ``prefixes`` that occurs (detector/segmentor checkpoints)."""
    for p in prefixes:
        if any(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    return dict(sd)


def load_pretrained(model: nn.Module,
                    checkpoint: Union[str, os.PathLike, Mapping],
                    strict: Optional[bool] = False,
                    min_match: float = 0.5,
                    logger=None) -> LoadReport:
    """Load ``checkpoint`` (a path or a state dict) into ``model`` and return a :class:`LoadReport`.

    ``strict``: False (default) accepts exactly the gaps a classification checkpoint has (the
    backbone's ``optional_checkpoint_keys``, e.g. per-level output norms) and refuses any other
    mismatch; True refuses any missing parameter; None loads whatever fits.

    Raises:
        CheckpointMismatchError: the file is for another model or another variant (fewer than
            ``min_match`` of the parameters found a tensor, a block is missing or extra, a shape
            cannot be resized), with the keys that show it.
    """
    name = type(model).__name__
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    sd = extract_state_dict(ckpt)
    converted, fmt, dropped = model.convert_checkpoint(sd)
    report = LoadReport(source_format=fmt, dropped=dict(dropped))
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
        to_load[k] = v.to(own[k].dtype)
    params = [k for k, _ in model.named_parameters()]
    matched = sum(k in to_load for k in params)
    optional = set(model.optional_checkpoint_keys())
    missing = [k for k in params if k not in to_load]
    structural = [k for k in missing if k not in optional]
    extra = [k for k, why in report.dropped.items() if why == 'not a parameter of this model']
    if strict is not None and matched < min_match * len(params):
        detail = '; '.join(shape_errors[:3])
        raise CheckpointMismatchError(
            f'the checkpoint does not fit {name}(arch={getattr(model, "arch_name", "?")}): only {matched} of '
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
            f'the checkpoint ({fmt} layout) does not match {name}(arch={getattr(model, "arch_name", "?")}): '
            + '; '.join(problems) + '. Is it another variant? Build the backbone with the arch the checkpoint '
            'was trained with (or call load_pretrained(..., strict=None) to load what fits).')
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = missing
    if strict and report.missing:
        raise CheckpointMismatchError(f'{name}: the checkpoint lacks {report.missing}')
    if logger is not None:
        logger.info(report.summary())
    return report
