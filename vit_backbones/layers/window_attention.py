"""Multi-head attention inside windows, computed straight from raster tokens and back.

A :class:`~vit_backbones.layers.window.WindowPlan` (Swin's padded + shifted windows, Shuffle
Transformer's shuffled windows, ViTDet-style plain windows) says which raster token sits in which window
slot. :func:`window_attention` takes the fused ``qkv`` projection of the *real* tokens (B, H*W, 3C) and
returns the attention output for the real tokens (B, H*W, C):

* one gather moves q, k and v into windows *and* splits the heads, giving a (3, B, heads, nW*N, d)
  buffer whose every (B, heads, window) block is a contiguous (N, d) matrix for the batched matmuls;
  padding slots get the projection of a zero token (the qkv bias), exactly what projecting a
  zero-padded map gives, so the projections never run on padding;
* one gather brings the output back to raster order and merges the heads; the output projection then
  also runs on real tokens only;
* in training with a learned bias, softmax(q k^T * scale + bias) v runs as one autograd function that
  keeps only q, k, v and the attention matrix, computes the softmax in place, and writes the q/k/v
  gradients into one buffer that the gather's backward turns back into the (B, H*W, 3C) layout (the
  fused CPU kernels give no bias gradient). Without gradients, or when the bias is constant, it is
  the fused ``scaled_dot_product_attention`` kernel (and its fused backward).

The bias is a per-head relative-position bias (heads, N, N) plus an optional per-window mask
((nW, N, N) shift mask or (nW, 1, N) key-padding mask), kept apart so the gradient of the learned part
is one reduction.
"""
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F

from .attention_kernel import _slices, attention_scores, explicit_attention, scaled_dot_product, softmax_
from .tracing import tracing
from .window import WindowPlan, _mod, zero_pad_slots


def _combined_bias(rel: Optional[torch.Tensor], mask: Optional[torch.Tensor], num_windows: int,
                   n: int) -> Optional[torch.Tensor]:
    """(heads or 1, nW or 1, N, N) additive bias from a (heads, N, N) table and an (nW, N|1, N) mask."""
    bias = None if rel is None else rel.unsqueeze(1)
    if mask is not None:
        m = mask.reshape(1, num_windows, -1, n)
        bias = m if bias is None else bias + m
    return bias


def _gather_qkv(qkv: torch.Tensor, plan: WindowPlan, heads: int, qkv_bias: Optional[torch.Tensor]) -> torch.Tensor:
    b, n, c3 = qkv.shape
    d = c3 // (3 * heads)
    out = qkv.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4).index_select(3, plan.gather)
    fill = 0. if qkv_bias is None else qkv_bias.detach().to(out.dtype).view(3, 1, heads, 1, d)
    return zero_pad_slots(out, plan, 3, fill)


def _row_index(plan: WindowPlan, kind: str, batch: int, heads: int) -> torch.Tensor:
    """Cached row indices that turn a head-interleaving gather into one ``index_select`` over the rows
    (length-d vectors) of a contiguous buffer; a strided ``index_select`` would first copy its source.

    'out': (B, heads, nW*N, d) windows -> (B, H*W, heads, d) tokens.
    'qkv_grad': (3, B, heads, nW*N, d) window gradients -> (B, H*W, 3, heads, d) token gradients.
    """
    cache = plan.__dict__.setdefault('_row_index', {})
    key = (kind, batch, heads)
    if key not in cache:
        hw, length = plan.scatter.numel(), plan.gather.numel()
        scatter = plan.scatter.view(1, hw, 1)
        b = torch.arange(batch, device=scatter.device).view(batch, 1, 1)
        h = torch.arange(heads, device=scatter.device)
        if kind == 'out':
            index = (b * heads + h.view(1, 1, heads)) * length + scatter
        else:
            s = torch.arange(3, device=scatter.device).view(1, 1, 3, 1)
            index = ((s * batch + b.unsqueeze(-1)) * heads + h.view(1, 1, 1, heads)) * length + scatter.unsqueeze(-1)
        rows = (3 if kind == 'qkv_grad' else 1) * batch * heads * length
        cache[key] = index.reshape(-1).to(torch.int32 if rows < 2**31 else torch.int64)
    return cache[key]


def _scatter_out(out: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    b, heads, _, d = out.shape
    rows = out.contiguous().view(-1, d).index_select(0, _row_index(plan, 'out', b, heads))
    return rows.view(b, -1, heads * d)


class _QKVToWindows(torch.autograd.Function):
    """(B, H*W, 3C) -> (3, B, heads, nW*N, d); padding slots hold the qkv bias."""

    @staticmethod
    def forward(ctx, qkv, qkv_bias, plan, heads):
        ctx.plan, ctx.shape = plan, qkv.shape
        ctx.bias_shape = None if qkv_bias is None else qkv_bias.shape
        return _gather_qkv(qkv, plan, heads, qkv_bias)

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        _, b, heads, _, d = grad.shape
        g_qkv = grad.contiguous().view(-1, d).index_select(0, _row_index(plan, 'qkv_grad', b, heads)).view(ctx.shape)
        g_bias = None
        if ctx.needs_input_grad[1] and plan.pad_slots is not None:
            g_bias = grad.index_select(3, plan.pad_slots).sum((1, 3)).reshape(ctx.bias_shape)
        return g_qkv, g_bias, None, None


class _WindowsToTokens(torch.autograd.Function):
    """(B, heads, nW*N, d) -> (B, H*W, heads*d): raster order, heads merged, padding dropped."""

    @staticmethod
    def forward(ctx, out, plan):
        ctx.plan, ctx.heads = plan, out.shape[1]
        return _scatter_out(out, plan)

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        b, n, c = grad.shape
        g = grad.view(b, n, ctx.heads, c // ctx.heads).permute(0, 2, 1, 3).index_select(2, plan.gather)
        return zero_pad_slots(g, plan, 2), None


class _WindowSoftmaxAttention(torch.autograd.Function):
    """softmax(q k^T * scale + rel + mask) v over (3, B, heads, nW*N, d) windows, few buffers.

    Works a slice of about ``SLICE_BYTES`` of scores at a time (whole images, heads of one image, or a run
    of windows of one head: :func:`~vit_backbones.layers.attention_kernel._slices` with windows as the rows),
    so the C allocator reuses the slices' memory instead of mapping fresh pages for one large score tensor.
    Saves q, k, v (the input buffer) and each slice's attention matrix; the backward is the textbook one
    (dS = P * (dP - rowsum(dP * P))) with dS computed in place of dP, dq, dk, dv written into one buffer
    laid out like the input, and the slices' bias gradients summed in float32 (or wider).
    """

    @staticmethod
    def forward(ctx, qkvw, rel, mask, scale, num_windows):
        _, b, heads, length, d = qkvw.shape
        n = length // num_windows
        q, k, v = (t.view(b, heads, num_windows, n, d) for t in qkvw.unbind(0))
        plan = _slices(b, heads, num_windows, n * n, qkvw.element_size())
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        probs = []
        for sl in plan:
            b0, b1, h0, h1, w0, w1 = sl
            bias = _combined_bias(None if rel is None else rel[h0:h1], None if mask is None else mask[w0:w1],
                                  w1 - w0, n)
            p = softmax_(attention_scores(q[b0:b1, h0:h1, w0:w1], k[b0:b1, h0:h1, w0:w1], scale, bias).view(-1, n, n))
            torch.bmm(p, v[b0:b1, h0:h1, w0:w1].reshape(-1, n, d), out=out[b0:b1, h0:h1, w0:w1].view(-1, n, d))
            probs.append(p)
        ctx.save_for_backward(qkvw, *probs)
        ctx.scale, ctx.num_windows, ctx.plan = scale, num_windows, plan
        ctx.rel_dtype = None if rel is None else rel.dtype
        return out.view(b, heads, length, d)

    @staticmethod
    def backward(ctx, grad):
        qkvw, *probs = ctx.saved_tensors
        _, b, heads, length, d = qkvw.shape
        nw = ctx.num_windows
        n = length // nw
        q, k, v = (t.view(b, heads, nw, n, d) for t in qkvw.unbind(0))
        g5 = grad.reshape(b, heads, nw, n, d)
        dqkv = torch.empty(qkvw.shape, dtype=qkvw.dtype, device=qkvw.device)
        dq, dk, dv = (t.view(b, heads, nw, n, d) for t in dqkv.unbind(0))
        need_rel = ctx.needs_input_grad[1]
        wide = torch.promote_types(qkvw.dtype, torch.float32)
        d_rel = torch.zeros(heads, n, n, dtype=wide, device=qkvw.device) if need_rel else None
        for (b0, b1, h0, h1, w0, w1), p in zip(ctx.plan, probs):
            g = g5[b0:b1, h0:h1, w0:w1].reshape(-1, n, d)
            dp = torch.bmm(g, v[b0:b1, h0:h1, w0:w1].reshape(-1, n, d).transpose(1, 2))
            torch.bmm(p.transpose(1, 2), g, out=dv[b0:b1, h0:h1, w0:w1].view(-1, n, d))
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype, grad_input=dp)
            if need_rel:  # one-axis sums: much faster than sum((0, 2))
                d_rel[h0:h1] += ds.view(b1 - b0, h1 - h0, w1 - w0, n, n).sum(2).sum(0)
            torch.bmm(ds, k[b0:b1, h0:h1, w0:w1].reshape(-1, n, d), out=dq[b0:b1, h0:h1, w0:w1].view(-1, n, d))
            torch.bmm(ds.transpose(1, 2), q[b0:b1, h0:h1, w0:w1].reshape(-1, n, d),
                      out=dk[b0:b1, h0:h1, w0:w1].view(-1, n, d))
        dq.mul_(ctx.scale)
        dk.mul_(ctx.scale)
        return dqkv, None if d_rel is None else d_rel.to(ctx.rel_dtype), None, None, None


def window_attention(qkv: torch.Tensor,
                     plan: WindowPlan,
                     num_heads: int,
                     scale: float,
                     rel_bias: Optional[torch.Tensor] = None,
                     mask: Optional[torch.Tensor] = None,
                     qkv_bias: Optional[torch.Tensor] = None,
                     dropout_p: float = 0.) -> torch.Tensor:
    """Attention inside the windows of ``plan`` for raster tokens.

    Args:
        qkv: (B, H*W, 3C) fused projection of the real tokens, laid out (3, heads, d) per token.
        plan: the windows (``plan.hw == (H, W)``).
        num_heads: number of heads; ``scale``: score scale.
        rel_bias: (heads, N, N) bias shared by all windows (N = window area), may require grad.
        mask: constant per-window additive mask, (nW, N, N) or (nW, 1, N) (key padding).
        qkv_bias: the projection's bias, the q/k/v of the zero tokens in padding slots (None: zeros).
        dropout_p: attention dropout (pass 0 in eval).

    Returns (B, H*W, C), heads merged, in raster order.
    """
    b, hw, c3 = qkv.shape
    if hw != plan.hw[0] * plan.hw[1] or c3 % (3 * num_heads):
        raise ValueError(f'qkv {tuple(qkv.shape)} does not fit a {plan.hw} map with {num_heads} heads')
    nw, n = plan.num_windows, plan.window[0] * plan.window[1]
    d = c3 // (3 * num_heads)
    if tracing():
        return _traced_window_attention(qkv, plan, num_heads, scale, rel_bias, mask, qkv_bias, dropout_p)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (qkv, rel_bias, qkv_bias))
    learned_bias = needs_grad and rel_bias is not None and rel_bias.requires_grad
    qkvw = _QKVToWindows.apply(qkv, qkv_bias, plan, num_heads) if needs_grad else _gather_qkv(
        qkv, plan, num_heads, qkv_bias)
    if learned_bias and dropout_p == 0.:
        out = _WindowSoftmaxAttention.apply(qkvw, rel_bias, mask, scale, nw)
    elif learned_bias:  # attention dropout with a learned bias: composed explicit path
        q, k, v = (t.view(b, num_heads, nw, n, d) for t in qkvw.unbind(0))
        out = explicit_attention(q, k, v, _combined_bias(rel_bias, mask, nw, n), dropout_p, scale)
    else:  # no bias gradient needed: the fused kernel (with its fused backward in training)
        q, k, v = qkvw.unbind(0)
        out = _fused_attention(q, k, v, rel_bias, mask, nw, n, dropout_p, scale)
        if not needs_grad:
            return _scatter_out(out.view(b, num_heads, nw * n, d), plan)
    out = out.reshape(b, num_heads, nw * n, d)
    return _WindowsToTokens.apply(out, plan)


def _traced_window_attention(qkv, plan, num_heads, scale, rel_bias, mask, qkv_bias, dropout_p):
    """:func:`window_attention` as traced (compile / export): plain differentiable ops (SDPA also gives the
    gradient of a learned bias), one graph for every size.

    Every reshape only splits a flat axis into factors that divide it symbolically, and no tensor has an
    axis of windows alone (its length is 1 at common sizes, e.g. Swin's last stage up to 224 px): q, k, v
    are gathered row by row straight into (B, heads*nW, N, d) (one index for every batch element: nothing
    is built from the batch size), with padding slots reading an appended token that holds the
    projection of a zero token (the qkv bias); ``mask`` is (nW*N, N), one row per query slot. Otherwise
    the compiler or exporter guards on relations it cannot prove (``heads*nW != heads``) and recompiles
    or specialises at the sizes where they fail."""
    b, hw, c3 = qkv.shape
    nw, n = plan.num_windows, plan.window_area
    d = c3 // (3 * num_heads)
    length = nw * n
    device = qkv.device
    pad_token = (torch.zeros(c3, dtype=qkv.dtype, device=device) if qkv_bias is None else
                 qkv_bias.detach().to(qkv.dtype)).expand(b, 1, c3)
    rows = torch.cat([qkv, pad_token], 1).view(b, -1, d)  # (B, (HW+1) * 3 * heads, d)
    slot_token = plan.gather + plan.pad_mask.long() * hw  # padding slots (gather 0) read the appended token
    base = (slot_token.view(1, length) * (3 * num_heads) + torch.arange(num_heads, device=device).view(num_heads, 1)
            ).reshape(-1)  # (heads*nW*N,): the q row of every (head, window slot)
    q, k, v = (rows.index_select(1, base + i * num_heads).view(b, num_heads * nw, n, d) for i in range(3))
    bias = None
    if rel_bias is not None or mask is not None:
        r = torch.arange(num_heads * length, device=device)
        if rel_bias is not None:  # the (heads, N, N) table's row of every (head, query slot)
            bias = rel_bias.reshape(num_heads * n, n).index_select(0, r // length * n + _mod(r, length) % n)
        if mask is not None:
            m = mask.to(rel_bias.dtype if rel_bias is not None else q.dtype).index_select(0, _mod(r, length))
            bias = m if bias is None else bias + m
        bias = bias.view(1, num_heads * nw, n, n).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    # back to raster order, heads merged: the row of every (token, head)
    back = (torch.arange(num_heads, device=device).view(1, num_heads) * length + plan.scatter.view(hw, 1)).reshape(-1)
    return out.view(b, num_heads * length, d).index_select(1, back).view(b, hw, num_heads * d)


class _SdpaBiasCache:
    """The SDPA masks :func:`_fused_attention` builds from a constant relative-position bias (eval, or a
    frozen table: ``RelativePositionBias`` then returns the same tensor, marked ``_vb_constant``, until
    its table changes) and a cached window mask, kept in the attention dtype: with a shift mask that is a
    (1, heads*nW, N, N) copy per block and call otherwise, plus its cast under autocast.

    Least recently used entries go once the entries hold more than ``max_bytes``; every entry holds its
    source tensors, so the ids in its key cannot be reused while it lives.
    """

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes = max_bytes
        self.entries = OrderedDict()
        self.bytes = 0

    def get(self, rel, mask, key, build):
        if rel is None or not getattr(rel, '_vb_constant', False):
            return build()
        full_key = (id(rel), rel._version, id(mask)) + key
        hit = self.entries.get(full_key)
        if hit is not None:
            self.entries.move_to_end(full_key)
            return hit[0]
        value = build()
        size = value.numel() * value.element_size()
        if size <= self.max_bytes:
            self.entries[full_key] = (value, rel, mask)
            self.bytes += size
            while self.bytes > self.max_bytes:
                old, _, _ = self.entries.popitem(last=False)[1]
                self.bytes -= old.numel() * old.element_size()
        return value

    def clear(self):
        self.entries.clear()
        self.bytes = 0


_SDPA_BIAS = _SdpaBiasCache()


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel: Optional[torch.Tensor],
                     mask: Optional[torch.Tensor], nw, n: int, dropout_p: float, scale: float) -> torch.Tensor:
    """SDPA inside the windows of (B, heads, nW*N, d) q, k, v with the (heads, N, N) ``rel`` bias and the
    (nW, N|1, N) ``mask`` (either may be None)."""
    b, heads, _, d = q.shape
    if mask is not None:  # (heads|1, nW, N, N): windows x heads as one batch dim
        q, k, v = (t.reshape(b, heads * nw, n, d) for t in (q, k, v))

        def build():
            return _combined_bias(rel, mask, nw, n).to(q.dtype).expand(heads, nw, n, n).reshape(1, heads * nw, n, n)
        bias = _SDPA_BIAS.get(rel, mask, ('windows', heads, nw, q.dtype), build)
    else:  # (heads, 1, N, N) or none: batch x heads as the batch dim, windows as the "heads" dim
        q, k, v = (t.reshape(b * heads, nw, n, d) for t in (q, k, v))
        bias = None
        if rel is not None:
            def build():
                return rel.to(q.dtype).unsqueeze(0).expand(b, -1, -1, -1).reshape(b * heads, 1, n, n)
            bias = _SDPA_BIAS.get(rel, None, ('batch', b, q.dtype), build)
    return scaled_dot_product(q, k, v, bias, dropout_p, scale)
