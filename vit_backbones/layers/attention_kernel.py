"""The attention kernels of the package: softmax(q k^T * scale + bias) v, fused or explicit.

``scaled_dot_product`` is the one attention kernel. It takes an optional additive ``bias``
(relative-position bias, shift mask, attention biases) that broadcasts against the (B, heads, Nq, Nk)
score matrix, and falls back to :func:`explicit_attention` (matmul + softmax) when the caller needs the
attention matrix itself or a gradient for a learned bias. :func:`attention_scores` is the logit half of
that explicit path, which the head-mixing attentions (talking heads, re-attention) also build on.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .tracing import tracing


def attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q k^T * scale (+ bias) as a (..., N, M) tensor in ``q``'s dtype: the logits of every explicit path
    (:func:`explicit_attention`, talking heads, re-attention).

    The bias is written once into the score buffer and q k^T is accumulated onto it in place
    (``baddbmm_``), so adding the bias costs no extra pass.
    """
    *lead, n, d = q.shape
    m = k.shape[-2]
    q3, k3 = q.reshape(-1, n, d), k.reshape(-1, m, d)
    if bias is None:
        return torch.bmm(q3, k3.transpose(1, 2)).mul_(scale).view(*lead, n, m)
    scores = torch.empty(q3.shape[0], n, m, dtype=q.dtype, device=q.device)
    scores.view(*lead, n, m).copy_(bias.expand(*lead, n, m))
    return scores.baddbmm_(q3, k3.transpose(1, 2), alpha=scale).view(*lead, n, m)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       dropout_p: float = 0., scale: Optional[float] = None, return_attn: bool = False):
    """softmax(q k^T * scale + bias) v with batched matmuls, materialising the attention matrix
    (:func:`attention_scores`, then the plain softmax)."""
    *lead, n, d = q.shape
    m = k.shape[-2]
    scale = d**-0.5 if scale is None else scale
    dtype = torch.get_autocast_dtype('cpu') if (q.device.type == 'cpu' and torch.is_autocast_enabled('cpu')) else q.dtype
    if q.device.type == 'cuda' and torch.is_autocast_enabled('cuda'):
        dtype = torch.get_autocast_dtype('cuda')
    attn = attention_scores(q.to(dtype), k.to(dtype), scale, bias).softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, dropout_p)
    out = torch.bmm(attn.view(-1, n, m), v.to(dtype).reshape(-1, m, v.shape[-1])).view(*lead, n, v.shape[-1])
    if return_attn:
        return out, attn
    return out


def scaled_dot_product(q: torch.Tensor,
                       k: torch.Tensor,
                       v: torch.Tensor,
                       bias: Optional[torch.Tensor] = None,
                       dropout_p: float = 0.,
                       scale: Optional[float] = None,
                       return_attn: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """softmax(q k^T * scale + bias) v.

    This is ``F.scaled_dot_product_attention`` (the fused flash kernel, reading strided q/k/v in place,
    with a fused backward) unless the bias itself needs a gradient (a learned relative-position bias in
    training) or the attention matrix is wanted: then it is :func:`explicit_attention`. PyTorch's fused
    CPU kernels give no gradient for an additive bias, and its fallback makes q, k, v contiguous and runs
    a NaN-guarded softmax, slower than the explicit path. (Measured on this project's CPU, one thread,
    forward+backward: without a bias or with a constant mask the fused kernel is 2.0-2.2x faster than the
    explicit path at 1024 tokens and 1.1-1.9x at 49; with a learned bias the two are within 10%.)

    Args:
        q, k, v: (..., N, d) tensors (usually (B, heads, N, d)).
        bias: additive term broadcastable to (..., Nq, Nk), or None.
        dropout_p: attention dropout probability (pass 0 in eval).
        scale: score scale; defaults to d ** -0.5.
        return_attn: also return the attention probabilities.
    """
    if not return_attn and dropout_p == 0. and _explicit_trains_faster(q, k, v, bias):
        return _SlicedAttention.apply(q, k.to(q.dtype), v.to(q.dtype), bias, q.shape[-1]**-0.5 if scale is None else scale)
    if return_attn or (bias is not None and bias.requires_grad and torch.is_grad_enabled()):
        return explicit_attention(q, k, v, bias, dropout_p, scale, return_attn)
    if v.shape[-1] != q.shape[-1] and not tracing():
        # (LeViT: v heads 4x wider than q/k) the fused CPU kernels need one head width; SDPA would fall back
        # to its NaN-guarded math path, slower than the explicit one
        return explicit_attention(q, k, v, bias, dropout_p, scale)
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    if dropout_p == 0. and _explicit_is_faster(q, k, v, bias):
        return _inference_attention(q, k, v, bias, q.shape[-1]**-0.5 if scale is None else scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


#: the largest score matrix (bytes) that the inference path below materialises in one piece (shapes it
#: cannot slice)
EXPLICIT_MAX_BYTES = 64 * 2**20


def _explicit_is_faster(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """bfloat16 inference on CPU, where the explicit kernel beats PyTorch's fused one (flash).

    The fused CPU kernel runs its small per-block matmuls with a conversion each; oneDNN's bfloat16 batched
    matmuls and one softmax over the materialised scores are faster. Measured without autograd, 2 threads,
    AMD EPYC with AVX512-BF16, same strided inputs, a slice of scores at a time: the attention call alone
    2.0-2.4x faster at 49-1025 keys (windows, PVT v2's reduced keys at 224x224 b8 and 800x1216 b1, ViT-B at
    224 and 512, CvT stage 1 at 800x1216 with 15200 keys); Swin-T eval at 224x224 b8 1.18x as a whole
    (interleaved in one process). In float32 the fused kernel was as fast or faster (0.7-0.93x) beyond 49
    keys, so float32 keeps it.
    """
    if q.dtype != torch.bfloat16 or q.device.type != 'cpu' or tracing() or torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad or bias is not None and bias.requires_grad):
        return False
    return _sliceable(q, k, v, bias) or _score_bytes(q, k) <= EXPLICIT_MAX_BYTES


def _score_bytes(q: torch.Tensor, k: torch.Tensor) -> int:
    """Size of the (..., Nq, Nk) score matrix the explicit kernel materialises, in q's dtype."""
    rows = 1
    for s in torch.broadcast_shapes(tuple(q.shape[:-2]), tuple(k.shape[:-2])):
        rows *= s
    return rows * q.shape[-2] * k.shape[-2] * q.element_size()


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis of a (batch, N, M) score tensor, in place, no autograd.

    PyTorch's CPU softmax kernel is slow for bfloat16 rows of few keys (windows, PVT's reduced keys); those
    go through the float32 kernel a slice at a time (about 1 MiB of float32, reused by the allocator) and
    are written back, 1.6-1.75x faster for 49-key rows (measured, 2 threads, AMD EPYC); the same rounding
    (the probabilities are computed in float32 either way and rounded once)."""
    n, m = scores.shape[-2:]
    if scores.dtype != torch.bfloat16 or m > 64:
        return torch.softmax(scores, -1, out=scores)
    for part in scores.split(max(1, 2**18 // (n * m))):
        part.copy_(torch.softmax(part, -1, dtype=torch.float32))
    return scores


#: bfloat16 training: the largest total of attention probabilities (bytes) one call of the explicit kernel
#: keeps for its backward (beyond it: the fused kernel, which keeps none)
EXPLICIT_TRAIN_MAX_BYTES = 256 * 2**20
#: the explicit training kernel works a slice of about this many score bytes at a time
SLICE_BYTES = 8 * 2**20


def _explicit_trains_faster(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            bias: Optional[torch.Tensor] = None) -> bool:
    """bfloat16 training on CPU, where :class:`_SlicedAttention` (two batched matmuls and the softmax per slice,
    the probabilities kept for a hand-written backward) beats the fused kernel's forward + backward.

    Measured forward + backward of the call alone, 2 threads, AMD EPYC with AVX512-BF16: 2.4-3.5x faster at
    197-1025 keys (ViT-B, DeiT-S), 1.9-2.9x at PVT v2's 49-950 reduced keys (224x224 b8 and 800x1216 b1),
    2.3-2.5x for CvT at 224x224 b8. In float32 the two were within 5%, so float32 keeps the fused kernel.
    The kept probabilities are bounded by ``EXPLICIT_TRAIN_MAX_BYTES``."""
    if q.dtype != torch.bfloat16 or q.device.type != 'cpu' or tracing() or not _sliceable(q, k, v, bias):
        return False
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias))):
        return False
    return _score_bytes(q, k) <= EXPLICIT_TRAIN_MAX_BYTES


def _slices(b: int, h: int, n: int, m: int, esize: int, budget: int = None):
    """(b0, b1, h0, h1, n0, n1) blocks covering a (b, h, n, m) score tensor, each of about ``budget`` bytes:
    whole images when they fit, else heads of one image, else query rows of one head."""
    budget = SLICE_BYTES if budget is None else budget
    row = n * m * esize
    if row * h <= budget:
        step = max(1, budget // (row * h))
        return [(i, min(b, i + step), 0, h, 0, n) for i in range(0, b, step)]
    if row <= budget:
        step = max(1, budget // row)
        return [(i, i + 1, j, min(h, j + step), 0, n) for i in range(b) for j in range(0, h, step)]
    step = max(1, budget // (m * esize))
    return [(i, i + 1, j, j + 1, r, min(n, r + step)) for i in range(b) for j in range(h) for r in range(0, n, step)]


def _bias_slice(bias: Optional[torch.Tensor], sl) -> Optional[torch.Tensor]:
    """The part of a 4-D bias (broadcast axes of size 1) that a slice of the score tensor adds."""
    if bias is None:
        return None
    b0, b1, h0, h1, n0, n1 = sl
    whole = slice(None)
    return bias[slice(b0, b1) if bias.shape[0] > 1 else whole, slice(h0, h1) if bias.shape[1] > 1 else whole,
                slice(n0, n1) if bias.shape[2] > 1 else whole]


def _as_4d(bias: torch.Tensor) -> torch.Tensor:
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def _sliceable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """(B, heads, N, d) q, k, v with the same leading axes and a bias of at most 4 axes: what the sliced
    kernels take."""
    return q.dim() == 4 and k.shape[:-2] == q.shape[:-2] and v.shape[:-2] == q.shape[:-2] and (
        bias is None or bias.dim() <= 4)


def _sliced_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
                    keep: bool):
    """softmax(q k^T * scale + bias) v of (B, heads, N, d) tensors of one dtype a slice at a time
    (:func:`_slices`): the logits (bias written first, q k^T accumulated onto it) rounded to q's dtype once,
    the softmax in place. Returns the output, the slices and (``keep``) each slice's probabilities."""
    b, h, n, d = q.shape
    m, e = k.shape[-2], v.shape[-1]
    bias4 = None if bias is None else _as_4d(bias)
    plan = _slices(b, h, n, m, q.element_size())
    out = q.new_empty(b, h, n, e)
    probs = []
    with torch.autocast(q.device.type, enabled=False):
        for sl in plan:
            b0, b1, h0, h1, n0, n1 = sl
            p = attention_scores(q[b0:b1, h0:h1, n0:n1], k[b0:b1, h0:h1], scale, _bias_slice(bias4, sl))
            p = softmax_(p.view(-1, n1 - n0, m))
            torch.bmm(p, v[b0:b1, h0:h1].reshape(-1, m, e), out=out[b0:b1, h0:h1, n0:n1].view(-1, n1 - n0, e))
            if keep:
                probs.append(p)
    return out, plan, probs


class _SlicedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v for (B, heads, N, d) tensors of one dtype, a slice of about
    ``SLICE_BYTES`` of scores at a time (:func:`_slices`); the probabilities are kept per slice for the
    textbook backward (dS = P * (dP - rowsum(dP * P)), computed in place of dP).

    Slices keep every buffer small, so the C allocator reuses freed memory instead of mapping (and
    zero-filling) fresh pages for each large score tensor; that, not the arithmetic, made the unsliced
    explicit kernel slower than the fused one beyond a few hundred keys. Same roundings as the explicit
    path under autocast: the logits (bias added in the matmul) are rounded to q's dtype once, the softmax
    computes in float32 and rounds once. A bias (broadcastable, any dtype, may be learned) gets its gradient
    summed in float32 (or wider); so are the k/v gradients where query rows are split.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        out, plan, probs = _sliced_forward(q, k, v, bias, scale, keep=True)
        ctx.plan, ctx.scale = plan, scale
        ctx.bias_shape = None if bias is None else (bias.shape, _as_4d(bias).shape, bias.dtype)
        ctx.save_for_backward(q, k, v, *probs)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *probs = ctx.saved_tensors
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        n, m, d, e = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
        split_rows = any(sl[5] - sl[4] < n for sl in ctx.plan)
        wide = torch.promote_types(q.dtype, torch.float32)
        acc = wide if split_rows else k.dtype
        dq = q.new_empty(q.shape) if need_q else None
        new = torch.zeros if split_rows else torch.empty  # (unsplit: each (image, head) block written once)
        dk = new(k.shape, dtype=acc, device=k.device) if need_k else None
        dv = new(v.shape, dtype=acc, device=v.device) if need_v else None
        dbias = torch.zeros(ctx.bias_shape[1], dtype=wide, device=q.device) if need_bias else None
        for sl, p in zip(ctx.plan, probs):
            b0, b1, h0, h1, n0, n1 = sl
            shape = (b1 - b0, h1 - h0)
            g = grad[b0:b1, h0:h1, n0:n1].reshape(-1, n1 - n0, e)
            ks, vs = k[b0:b1, h0:h1].reshape(-1, m, d), v[b0:b1, h0:h1].reshape(-1, m, e)
            if need_v and split_rows:
                dv[b0:b1, h0:h1] += torch.bmm(p.transpose(1, 2), g).view(*shape, m, e)
            elif need_v:
                torch.bmm(p.transpose(1, 2), g, out=dv[b0:b1, h0:h1].view(-1, m, e))
            if not (need_q or need_k or need_bias):
                continue
            ds = torch.bmm(g, vs.transpose(1, 2))
            ds = torch._softmax_backward_data(ds, p, -1, p.dtype, grad_input=ds)
            if need_bias:
                axes = [a for a, size in enumerate(dbias.shape) if size == 1 and (shape + (n1 - n0, m))[a] > 1]
                part = ds.view(*shape, n1 - n0, m)
                _bias_slice(dbias, sl).add_(part.sum(axes, keepdim=True, dtype=wide) if axes else part)
            if need_q:
                torch.bmm(ds, ks, out=dq[b0:b1, h0:h1, n0:n1].view(-1, n1 - n0, d))
            if need_k:
                qs = q[b0:b1, h0:h1, n0:n1].reshape(-1, n1 - n0, d)
                if split_rows:
                    dk[b0:b1, h0:h1] += torch.bmm(ds.transpose(1, 2), qs).view(*shape, m, d)
                else:
                    torch.bmm(ds.transpose(1, 2), qs, out=dk[b0:b1, h0:h1].view(-1, m, d))
        for t in (dq, dk):
            if t is not None:
                t.mul_(ctx.scale)
        if dbias is not None:
            shape, _, dtype = ctx.bias_shape
            dbias = dbias.view(shape).to(dtype)
        return dq, None if dk is None else dk.to(k.dtype), None if dv is None else dv.to(v.dtype), dbias, None


def _inference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                         scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v without autograd, in q's dtype: the logits (bias accumulated onto
    in the matmul, :func:`attention_scores`) are rounded to that dtype once, as autocast's matmuls do, and
    the softmax (computed in float32 inside the kernel) overwrites them with the probabilities. (B, heads,
    N, d) inputs go a slice of scores at a time (:func:`_sliced_forward`); other shapes in one piece."""
    *lead, n, d = q.shape
    m = k.shape[-2]
    if _sliceable(q, k, v, bias):
        return _sliced_forward(q, k.to(q.dtype), v.to(q.dtype), bias, scale, keep=False)[0]
    lead = torch.broadcast_shapes(tuple(lead), tuple(k.shape[:-2]))
    with torch.autocast('cpu', enabled=False):
        q, k, v = q.expand(*lead, n, d), k.to(q.dtype).expand(*lead, m, d), v.to(q.dtype).expand(*lead, m, v.shape[-1])
        attn = softmax_(attention_scores(q, k, scale, bias).view(-1, n, m))
        return torch.bmm(attn, v.reshape(-1, m, v.shape[-1])).view(*lead, n, v.shape[-1])


class _SplitHeads(torch.autograd.Function):
    """(B, N, 3*C) fused projection -> contiguous q, k, v of shape (B, heads, N, d) in one copy; the
    backward writes the three gradients straight into the (B, N, 3*C) layout (one pass, no stack)."""

    @staticmethod
    def forward(ctx, qkv, heads):
        b, n, c3 = qkv.shape
        d = c3 // (3 * heads)
        ctx.dims = (b, n, heads, d)
        out = qkv.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4).contiguous()
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, gq, gk, gv):
        b, n, heads, d = ctx.dims
        g = gq.new_empty(b, n, 3, heads, d) if gq is not None else gk.new_empty(b, n, 3, heads, d)
        for i, gi in enumerate((gq, gk, gv)):
            if gi is None:
                g[:, :, i].zero_()
            else:
                g[:, :, i].copy_(gi.transpose(1, 2))
        return g.view(b, n, 3 * heads * d), None


def split_heads(qkv: torch.Tensor, heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused (B, N, 3*C) projection -> q, k, v each (B, heads, N, d).

    Without gradients they are strided views (the fused SDPA kernel reads them in place); with
    gradients they are made contiguous once, for the batched matmuls of :func:`explicit_attention`.
    """
    b, n, c3 = qkv.shape
    if torch.is_grad_enabled() and qkv.requires_grad and not tracing():  # traced: plain views (plain autograd)
        return _SplitHeads.apply(qkv, heads)
    return qkv.view(b, n, 3, heads, c3 // (3 * heads)).transpose(1, 3).unbind(2)
