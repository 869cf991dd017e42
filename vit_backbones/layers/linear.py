"""Linear layers on CPU through oneDNN: inference with GELU fused into the matmul, fp32 training.

Without autograd (eval under ``torch.no_grad`` / ``inference_mode``, or frozen layers on inputs that need
no gradient), :func:`inference_linear` runs ``layer(x)`` (optionally followed by the exact GELU) as one
oneDNN matmul whose bias and GELU are applied to the accumulator (``torch.ops.mkldnn._linear_pointwise``),
instead of ``addmm`` (which first copies the bias into the output) and a separate GELU pass over the
hidden-size tensor. Under CPU autocast it computes in the autocast dtype, as autocast's own Linear
would, with the weights cast once per weight version and kept (not once per call), in oneDNN's blocked
layout (packed once, where a plain weight would be reordered by every matmul).

With autograd, in float32 on CPU (no autocast), :func:`inference_linear` (despite its name) and the MLP's
training function run the forward product and the input gradient through oneDNN as well (the weight
gradient too, except where it is narrow: :func:`matmul_tn`): on this project's AMD CPU PyTorch's float32
``addmm``/``mm`` (MKL) reach about half of oneDNN's rate at these shapes, while in bfloat16 both already
run oneDNN.

A BatchNorm in eval mode after a linear layer or a convolution (LeViT, CeiT's LeFF) is an affine map per
channel: :func:`linear_bn_act` / :func:`conv_bn_act` fold it into the layer's weight and bias, one fused
oneDNN call (with the following activation on the accumulator) without autograd, one linear / convolution
through the differentiable fold with autograd (frozen statistics, ``norm_eval=True``).

Everywhere else (other devices, traced / exported graphs, dtypes other than float32 and
bfloat16, a subclass of ``nn.Linear`` or a layer with forward hooks, a PyTorch without the op) it calls
the layer (+ ``F.gelu``).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals  # the global forward hooks

from .tracing import tracing

_ONEDNN_LINEAR = getattr(getattr(torch.ops, 'mkldnn', None), '_linear_pointwise', None)
_ONEDNN_CONV = getattr(getattr(torch.ops, 'mkldnn', None), '_convolution_pointwise', None)
_REORDER = getattr(getattr(torch.ops, 'mkldnn', None), '_reorder_linear_weight', None)
_DTYPES = (torch.float32, torch.bfloat16)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def onednn_usable(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """oneDNN's linear can run ``x`` (on CPU, in ``dtype``) outside any tracer."""
    return (_ONEDNN_LINEAR is not None and x.device.type == 'cpu' and dtype in _DTYPES and not tracing()
            and torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available())


def needs_autograd(x: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, ) + params)


def _fast_path(x: torch.Tensor, layer: nn.Linear, dtype: torch.dtype) -> bool:
    if not onednn_usable(x, dtype):
        return False
    if type(layer) is not nn.Linear or _has_hooks(layer):  # a subclass's own forward, a user's hook: run it
        return False
    return layer.weight.device.type == 'cpu' and layer.weight.dtype in _DTYPES


def _conv_fast_path(x: torch.Tensor, conv: nn.Module, dtype: torch.dtype) -> bool:
    """oneDNN's pointwise convolution can run the plain ``nn.Conv2d`` ``conv`` on ``x`` in ``dtype``."""
    return (_ONEDNN_CONV is not None and onednn_usable(x, dtype) and type(conv) is nn.Conv2d and not _has_hooks(conv)
            and conv.padding_mode == 'zeros' and not isinstance(conv.padding, str)
            and conv.weight.device.type == 'cpu' and conv.weight.dtype in _DTYPES)


def _has_hooks(layer: nn.Module) -> bool:
    m = _module_globals
    return bool(layer._forward_hooks or layer._forward_pre_hooks or m._global_forward_hooks or
                m._global_forward_pre_hooks)


class _DerivedWeights:
    """What :func:`_weights` keeps on a module (its ``__dict__``, not its state_dict): a key and the weights
    derived from the parameters. Copies and pickles of the module get an empty one (the weights are derived
    again on the next call; oneDNN's packed weights have no storage to copy)."""
    __slots__ = ('key', 'value')

    def __init__(self):
        self.key, self.value = None, None

    def __deepcopy__(self, memo):
        return _DerivedWeights()

    def __reduce__(self):
        return _DerivedWeights, ()


def _kept(module: nn.Module, name: str, key, build):
    """``build()`` (weights derived from parameters, without autograd), kept in ``module.__dict__[name]`` and
    rebuilt when ``key`` (versions and data pointers of what they derive from) changes."""
    cached = module.__dict__.get(name)
    if cached is None:
        cached = module.__dict__[name] = _DerivedWeights()
    if cached.key != key:
        with torch.no_grad():
            cached.key, cached.value = key, build()
    return cached.value


def _state(*tensors: Optional[torch.Tensor]) -> tuple:
    """What identifies the current values of ``tensors``: in-place changes bump ``_version``, reassignment
    or ``.to()`` changes the data pointer."""
    return tuple(None if t is None else (t._version, t.data_ptr(), t.dtype) for t in tensors)


def _weights(layer: nn.Module, dtype: torch.dtype, scale: float = 1., scale_bias: bool = True, packed: bool = False):
    """The layer's weight and bias in ``dtype`` (times ``scale``; the bias too unless ``scale_bias=False``):
    the parameters themselves where they already are that, else derived once per weight version and kept on
    the module. ``packed=True`` (a linear layer's weight for ``_ONEDNN_LINEAR``) keeps such a derived weight in
    oneDNN's blocked layout (``_reorder_linear_weight``), into which the matmul would otherwise reorder a plain
    weight on every call: the same numbers, bit for bit, in 2-8% less time per bf16 linear layer (2 threads,
    AMD EPYC)."""
    w, b = layer.weight, layer.bias
    if scale == 1. and w.dtype == dtype and (b is None or b.dtype == dtype):
        return w, b  # (packing the layer's own weight too would keep a second copy of it: not measured to pay)
    packed = packed and _REORDER is not None

    def build():
        bias = None if b is None else (b.detach() * scale if scale_bias and scale != 1. else b.detach()).to(dtype)
        weight = (w.detach() * scale if scale != 1. else w.detach()).to(dtype)
        return _REORDER(weight) if packed else weight, bias

    return _kept(layer, '_vb_derived_weights', (dtype, scale, scale_bias, packed) + _state(w, b), build)


def folds_bn(bn: nn.Module) -> bool:
    """Whether ``bn`` is a plain BatchNorm that normalises with its running statistics (eval mode, or kept in
    eval by ``norm_eval``): an affine map per channel that can be folded into the layer before it."""
    return (type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d) and not bn.training and bn.track_running_stats
            and bn.running_mean is not None and bn.running_var is not None and not _has_hooks(bn))


def fold_bn(layer: nn.Module, bn: nn.Module):
    """``layer``'s (weight, bias) with the eval-mode BatchNorm that follows it (:func:`folds_bn`) folded in,
    W' = W * s, b' = (b - running_mean) * s + beta with s = gamma / sqrt(running_var + eps), as differentiable
    functions of the layer's and the BatchNorm's affine parameters (the running statistics are constants
    there): training with frozen statistics (``norm_eval=True``) runs one matmul per layer, and autograd gives
    the gradients of W, b, gamma and beta that the two modules would."""
    w, b = layer.weight, layer.bias
    s = (bn.running_var + bn.eps).rsqrt()
    if bn.weight is not None:
        s = s * bn.weight
    shift = -bn.running_mean if b is None else b - bn.running_mean
    shift = shift * s
    if bn.bias is not None:
        shift = shift + bn.bias
    return w * s.view((-1, ) + (1, ) * (w.dim() - 1)).to(w.dtype), shift.to(w.dtype)


def train_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, w, b)`` for tensors that need gradients: in float32 on CPU outside autocast oneDNN's
    product and gradients (:class:`_TrainLinear`), else ``F.linear`` itself (bf16 autocast runs oneDNN too)."""
    if (x.dtype == torch.float32 and w.dtype == torch.float32 and _compute_dtype(x) == torch.float32
            and onednn_usable(x, torch.float32) and w.device.type == 'cpu'):
        return _TrainLinear.apply(x, w, b)
    return F.linear(x, w, b)


def foldable(layer: nn.Module, bn: nn.Module) -> bool:
    """A plain ``nn.Linear`` / ``nn.Conv2d`` without hooks followed by a BatchNorm that :func:`folds_bn`, outside
    any tracer (traced graphs keep the two modules)."""
    return (type(layer) in (nn.Linear, nn.Conv2d) and not _has_hooks(layer) and folds_bn(bn) and not tracing()
            and (type(layer) is nn.Linear or layer.padding_mode == 'zeros'))


def linear_bn_act(x: torch.Tensor, layer: nn.Linear, bn: nn.Module, act: Optional[nn.Module] = None) -> torch.Tensor:
    """``act(bn(layer(x)))`` over the last axis (a BatchNorm1d over every token; ``act`` None: none). A BatchNorm
    in eval mode (``model.eval()``, or ``norm_eval=True`` in training) is folded into the layer: without
    autograd one oneDNN matmul with the activation fused (:func:`inference_linear_bn`), with autograd one
    linear through the fold (:func:`fold_bn`); otherwise the modules."""
    y = None
    if folds_bn(bn):  # (a BatchNorm in training mode goes straight to the modules)
        y = inference_linear_bn(x, layer, bn, act)
        if y is not None:
            return y
        if foldable(layer, bn):
            y = train_linear(x, *fold_bn(layer, bn))
    if y is None:
        y = inference_linear(x, layer)
        y = bn(y.reshape(-1, y.shape[-1])).view(y.shape)
    return y if act is None else act(y)


def conv_bn_act(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module, act: Optional[nn.Module] = None) -> torch.Tensor:
    """``act(bn(conv(x)))`` with an eval-mode BatchNorm folded into the convolution as in :func:`linear_bn_act`
    (:func:`inference_conv_bn` without autograd); ``bn`` may also be any other module (then it is run)."""
    y = None
    if folds_bn(bn):
        y = inference_conv_bn(x, conv, bn, act)
        if y is not None:
            return y
        if foldable(conv, bn):
            y = F.conv2d(x, *fold_bn(conv, bn), conv.stride, conv.padding, conv.dilation, conv.groups)
    if y is None:
        y = bn(conv(x))
    return y if act is None else act(y)


def _bn_folded(layer: nn.Module, bn: nn.Module, dtype: torch.dtype):
    """``layer``'s weight and bias with the eval-mode BatchNorm that follows it folded in (computed in
    float64, then cast to ``dtype``): with s = gamma / sqrt(running_var + eps) per output channel,
    W' = W * s and b' = (b - running_mean) * s + beta. Kept on ``layer`` until any of them changes; a linear
    layer's (2-D) weight is kept packed for ``_ONEDNN_LINEAR``, as :func:`_weights` keeps its copies."""
    w, b = layer.weight, layer.bias
    packed = _REORDER is not None and w.dim() == 2

    def build():
        wide = torch.float64
        s = bn.running_var.detach().to(wide).add(bn.eps).rsqrt()
        if bn.weight is not None:
            s = s * bn.weight.detach().to(wide)
        shift = -bn.running_mean.detach().to(wide)
        if b is not None:
            shift = shift + b.detach().to(wide)
        shift = shift * s
        if bn.bias is not None:
            shift = shift + bn.bias.detach().to(wide)
        weight = (w.detach().to(wide) * s.view((-1, ) + (1, ) * (w.dim() - 1))).to(dtype)
        return _REORDER(weight) if packed else weight, shift.to(dtype)

    key = (dtype, packed, bn.eps) + _state(w, b, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return _kept(layer, '_vb_bn_folded', key, build)


def linear_nt(a: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ w.T (+ b)`` for tensors of one dtype, no autograd: oneDNN where usable, else ``F.linear``."""
    if onednn_usable(a, a.dtype):
        return _ONEDNN_LINEAR(a, w, b, 'none', [], '')
    return F.linear(a, w, b)


def matmul_nn(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w`` for 2-D tensors of one dtype, no autograd (an input gradient): oneDNN in float32 on CPU, given
    the transposed view of ``w`` (oneDNN reads it in place; a contiguous copy of it cost 10-50% more per call
    at LeViT's and Swin's sizes)."""
    if a.dtype == torch.float32 and onednn_usable(a, a.dtype):
        return _ONEDNN_LINEAR(a, w.t(), None, 'none', [], '')
    return a.mm(w)


#: weight gradients narrower than this (output columns) stay ``mm``: oneDNN was slower there at long reductions
WEIGHT_GRAD_MIN_COLUMNS = 128


def matmul_tn(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``g.T @ x`` for 2-D tensors of one dtype, no autograd (a weight gradient): in float32 on CPU oneDNN reads
    both transposed views in place where the result has at least ``WEIGHT_GRAD_MIN_COLUMNS`` columns; ``mm``
    (MKL) otherwise. On this project's AMD CPU (2 threads) oneDNN was 1.4-1.9x faster than ``mm`` at
    reductions up to ~6000 tokens (PVT v2, LeViT, ViT, Swin's later stages) and at 25088 tokens for 256
    columns, but 1.6x slower for 64 columns at 25088 tokens."""
    if g.dtype == torch.float32 and x.shape[1] >= WEIGHT_GRAD_MIN_COLUMNS and onednn_usable(g, g.dtype):
        return _ONEDNN_LINEAR(g.t(), x.t(), None, 'none', [], '')
    return g.t().mm(x)


class _TrainLinear(torch.autograd.Function):
    """float32 ``F.linear`` with oneDNN for the product and both gradients (:func:`matmul_nn`, :func:`matmul_tn`)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _ONEDNN_LINEAR(x, w, b, 'none', [], '')

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        gx = matmul_nn(g2, w).view(x.shape) if need[0] else None
        gw = matmul_tn(g2, x.reshape(-1, x.shape[-1])) if need[1] else None
        gb = g2.sum(0) if ctx.has_bias and need[2] else None
        return gx, gw, gb


def inference_linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """``layer(x)``, or ``F.gelu(layer(x))`` (exact GELU) with ``gelu=True``; see the module docstring."""
    if x.device.type != 'cpu':  # (meta tensors have no autocast state to ask)
        y = layer(x)
        return F.gelu(y) if gelu else y
    dtype = _compute_dtype(x)
    if not _fast_path(x, layer, dtype):
        y = layer(x)
        return F.gelu(y) if gelu else y
    if needs_autograd(x, layer.weight, layer.bias):
        y = train_linear(x, layer.weight, layer.bias)
        return F.gelu(y) if gelu else y
    w, b = _weights(layer, dtype, packed=True)
    return _ONEDNN_LINEAR(x.to(dtype), w, b, 'gelu' if gelu else 'none', [], 'none' if gelu else '')


def _post_op(act: Optional[nn.Module]):
    """oneDNN's (attr, algorithm) for an activation module it can apply to a matmul's accumulator, else None."""
    if act is None:
        return 'none', ''
    if type(act) is nn.Hardswish:
        return 'hardswish', ''
    if type(act) is nn.ReLU:
        return 'relu', ''
    if fuses_gelu(act):
        return 'gelu', 'none'
    return None


def _bn_fusion(x: torch.Tensor, layer: nn.Module, bn: nn.Module, act: Optional[nn.Module], fast_path):
    """What a fused oneDNN call of ``act(bn(layer(x)))`` without autograd takes: (x in the compute dtype, the
    folded weight, bias, post-op attr, algorithm), or None where it does not apply."""
    if x.device.type != 'cpu' or not folds_bn(bn):
        return None
    dtype = _compute_dtype(x)
    post = _post_op(act)
    if post is None or not fast_path(x, layer, dtype) or needs_autograd(x, layer.weight, layer.bias, bn.weight,
                                                                           bn.bias):
        return None
    return (x.to(dtype), ) + tuple(_bn_folded(layer, bn, dtype)) + post


def inference_linear_bn(x: torch.Tensor, layer: nn.Linear, bn: nn.Module,
                        act: Optional[nn.Module] = None) -> Optional[torch.Tensor]:
    """``act(bn(layer(x)))`` (``act`` None: ``bn(layer(x))``) over the last axis, without autograd, as one oneDNN
    matmul: an eval-mode BatchNorm folded into the layer's weight and bias (:func:`_bn_folded`, kept and packed
    as :func:`inference_linear` keeps its weights; in the autocast dtype under autocast), the activation
    (Hardswish, ReLU, exact GELU) applied to the accumulator. Returns None where that does not apply (training
    BatchNorm, autograd, another activation, the cases where :func:`inference_linear` calls the layer): the
    caller then runs its modules. Saves the BatchNorm's and the activation's passes over the output (LeViT)."""
    f = _bn_fusion(x, layer, bn, act, _fast_path)
    return None if f is None else _ONEDNN_LINEAR(f[0], f[1], f[2], f[3], [], f[4])


def inference_conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module,
                      act: Optional[nn.Module] = None) -> Optional[torch.Tensor]:
    """``act(bn(conv(x)))`` without autograd as one oneDNN convolution with the eval-mode BatchNorm folded into
    its weight and bias and the activation applied to its output before it is written; None where that does
    not apply (as :func:`inference_linear_bn`; also padding modes other than zeros, string paddings)."""
    f = _bn_fusion(x, conv, bn, act, _conv_fast_path)
    if f is None:
        return None
    return _ONEDNN_CONV(f[0], f[1], f[2], list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, f[3],
                        [], f[4])


def fuses_gelu(act: Optional[nn.Module]) -> bool:
    """Whether ``act`` is the exact GELU that :func:`inference_linear` can fuse."""
    return type(act) is nn.GELU and act.approximate == 'none'


def inference_conv(x: torch.Tensor, conv: nn.Conv2d, gelu: bool = False) -> torch.Tensor:
    """``conv(x)``, or ``F.gelu(conv(x))`` with ``gelu=True``: without autograd on CPU one oneDNN
    convolution with the exact GELU applied to its output before it is written (PVT v2's depthwise conv:
    one pass over the hidden-size map fewer), weights cast once per version under autocast; otherwise the
    layer (+ ``F.gelu``)."""
    dtype = _compute_dtype(x) if x.device.type == 'cpu' else x.dtype
    if not gelu or not _conv_fast_path(x, conv, dtype) or needs_autograd(x, conv.weight, conv.bias):
        y = conv(x)
        return F.gelu(y) if gelu else y
    w, b = _weights(conv, dtype)
    return _ONEDNN_CONV(x.to(dtype), w, b, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
                        'gelu', [], 'none')


#: QuickGELU's slope: x * sigmoid(QUICK_GELU_SLOPE * x)
QUICK_GELU_SLOPE = 1.702


def inference_quick_gelu_mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> Optional[torch.Tensor]:
    """``fc2(QuickGELU(fc1(x)))`` without autograd as two oneDNN linears, or None where that path does not
    apply (then the caller runs its layers).

    QuickGELU(y) = y * sigmoid(a y) = swish(a y) / a with a = 1.702, and oneDNN applies swish (z * sigmoid(z))
    to the accumulator: fc1 runs with its weight and bias scaled by a, fc2 with its weight divided by a
    (both kept, cast and scaled once per weight version). Saves the two elementwise passes over the
    hidden-size tensor (CvT's MLPs)."""
    dtype = _compute_dtype(x)
    if not (_fast_path(x, fc1, dtype) and _fast_path(x, fc2, dtype)) or needs_autograd(
            x, fc1.weight, fc1.bias, fc2.weight, fc2.bias):
        return None
    w1, b1 = _weights(fc1, dtype, QUICK_GELU_SLOPE, packed=True)
    w2, b2 = _weights(fc2, dtype, 1. / QUICK_GELU_SLOPE, scale_bias=False, packed=True)
    return _ONEDNN_LINEAR(_ONEDNN_LINEAR(x.to(dtype), w1, b1, 'swish', [], ''), w2, b2, 'none', [], '')
