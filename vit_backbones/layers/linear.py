"""Linear layers for inference on CPU through oneDNN, with GELU fused into the matmul.

Without autograd (eval under ``torch.no_grad`` / ``inference_mode``, or frozen layers on inputs that need
no gradient), :func:`inference_linear` runs ``layer(x)`` (optionally followed by the exact GELU) as one
oneDNN matmul whose bias and GELU are applied to the accumulator (``torch.ops.mkldnn._linear_pointwise``),
instead of ``addmm`` (which first copies the bias into the output) and a separate GELU pass over the
hidden-size tensor. Under CPU autocast it computes in the autocast dtype, as autocast's own Linear
would, with the weights cast once per weight version and kept (not once per call).

Everywhere else (gradients needed, other devices, traced / exported graphs, dtypes other than float32 and
bfloat16, a subclass of ``nn.Linear`` or a layer with forward hooks, a PyTorch without the op) it calls
the layer (+ ``F.gelu``).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .tracing import tracing

_ONEDNN_LINEAR = getattr(getattr(torch.ops, 'mkldnn', None), '_linear_pointwise', None)
_DTYPES = (torch.float32, torch.bfloat16)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _fast_path(x: torch.Tensor, layer: nn.Linear, dtype: torch.dtype) -> bool:
    if _ONEDNN_LINEAR is None or x.device.type != 'cpu' or dtype not in _DTYPES or tracing():
        return False
    if not torch.backends.mkldnn.enabled or not torch.backends.mkldnn.is_available():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad or
                                    (layer.bias is not None and layer.bias.requires_grad)):
        return False
    if type(layer) is not nn.Linear or _has_hooks(layer):  # a subclass's own forward, a user's hook: run it
        return False
    return layer.weight.device.type == 'cpu' and layer.weight.dtype in _DTYPES


def _has_hooks(layer: nn.Module) -> bool:
    from torch.nn.modules import module as m
    return bool(layer._forward_hooks or layer._forward_pre_hooks or m._global_forward_hooks or
                m._global_forward_pre_hooks)


def _weights(layer: nn.Linear, dtype: torch.dtype):
    w, b = layer.weight, layer.bias
    if w.dtype == dtype and (b is None or b.dtype == dtype):
        return w, b
    key = (dtype, w._version, w.data_ptr(), None if b is None else (b._version, b.data_ptr()))
    cached = layer.__dict__.get('_vb_cast_weights')
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, w.detach().to(dtype), None if b is None else b.detach().to(dtype))
        layer.__dict__['_vb_cast_weights'] = cached
    return cached[1], cached[2]


def inference_linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """``layer(x)``, or ``F.gelu(layer(x))`` (exact GELU) with ``gelu=True``; see the module docstring."""
    dtype = _compute_dtype(x)
    if not _fast_path(x, layer, dtype):
        y = layer(x)
        return F.gelu(y) if gelu else y
    w, b = _weights(layer, dtype)
    return _ONEDNN_LINEAR(x.to(dtype), w, b, 'gelu' if gelu else 'none', [], 'none' if gelu else '')


def fuses_gelu(act: Optional[nn.Module]) -> bool:
    """Whether ``act`` is the exact GELU that :func:`inference_linear` can fuse."""
    return type(act) is nn.GELU and act.approximate == 'none'
