"""Attention biases indexed by absolute token offsets (LeViT-style), at any grid size.

The learned table of one attention layer holds, per head, one value for every offset
``(|dy|, |dx|)`` with ``0 <= |dy| < th`` and ``0 <= |dx| < tw``, where ``(th, tw)`` is the key grid the
model was built for (14x14 for a stage-1 LeViT layer at 224x224); it is stored flattened as
``(heads, th * tw)`` with entry ``|dy| * tw + |dx|``.

At run time the key grid ``(h, w)`` may differ:

- a side no larger than the table's reuses the learned values of the offsets it needs (a crop of the
  table; no interpolation), so the pre-training grid gives exactly the learned biases;
- a larger side needs offsets the table never saw: the table is mirrored into its signed form
  (offsets ``-(t-1) .. t-1``, a ``(2th-1) x (2tw-1)`` relative-position table, symmetric about offset 0),
  resampled the way relative position tables are (:func:`resize_rel_pos_table`: bicubic by default,
  ``align_corners=False``, float32) to ``(2h-1) x (2w-1)``, and folded back to its non-negative half. The
  centre (offset 0) maps onto itself, so the resampled table keeps the learned value of offset 0 and
  stays symmetric.

Queries may sit on a strided sub-grid of the keys (shrink attention: query ``(i, j)`` is at key position
``(stride * i, stride * j)``).
"""
from typing import Tuple

import torch

from .rel_pos import resize_rel_pos_table
from .tracing import refuse_static_trace, tracing


def _fit_side(table: torch.Tensor, dim: int, src: int, dst: int) -> torch.Tensor:
    """Crop the offsets axis ``dim`` of a (heads, th, tw) table to ``dst`` entries (dst <= src)."""
    return table.narrow(dim, 0, dst) if dst < src else table


def resize_offset_bias_table(table: torch.Tensor, src_hw: Tuple[int, int], dst_hw: Tuple[int, int],
                             mode: str = 'bicubic') -> torch.Tensor:
    """(heads, sh*sw) offset table of an ``src_hw`` key grid -> (heads, dh*dw) table for ``dst_hw``.

    Sides that shrink are cropped (the learned values of the offsets kept); sides that grow are resampled
    on the mirrored (signed-offset) table, see the module docstring. ``dst_hw == src_hw`` returns
    ``table`` itself. Differentiable, so it can run in every forward pass.
    """
    sh, sw = (int(s) for s in src_hw)
    dh, dw = (int(s) for s in dst_hw)
    heads = table.shape[0]
    if table.shape[-1] != sh * sw:
        raise ValueError(f'attention bias table has {table.shape[-1]} offsets per head, expected {sh}x{sw}={sh * sw}')
    if (sh, sw) == (dh, dw):
        return table
    t = table.reshape(heads, sh, sw)
    t = _fit_side(_fit_side(t, 1, sh, dh), 2, sw, dw)
    ch, cw = t.shape[1:]
    gh, gw = max(ch, dh), max(cw, dw)
    if (gh, gw) != (ch, cw):
        full = torch.cat([t.flip(1)[:, :-1], t], 1)  # signed offsets -(ch-1) .. ch-1
        full = torch.cat([full.flip(2)[:, :, :-1], full], 2)
        rel = resize_rel_pos_table(full.reshape(heads, -1).t(), (ch, cw), (gh, gw), mode=mode)
        t = rel.t().reshape(heads, 2 * gh - 1, 2 * gw - 1)[:, gh - 1:, gw - 1:]
    return t.reshape(heads, dh * dw)


def offset_bias_index(q_hw: Tuple[int, int], kv_hw: Tuple[int, int], stride: int = 1,
                      device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row and column offset indices for queries on a ``stride`` sub-grid of a ``kv_hw`` key grid.

    Returns ``(dy, dx)`` of shapes (qh, 1, kh, 1) and (1, qw, 1, kw): ``table3d[:, dy, dx]`` of a
    (heads, kh, kw) table broadcasts to (heads, qh, qw, kh, kw), i.e. (heads, Nq, Nk) after a reshape.
    The index tensors are tiny (one per axis), unlike a full (Nq, Nk) index.
    """
    (qh, qw), (kh, kw) = q_hw, kv_hw
    dy = (torch.arange(qh, device=device)[:, None] * stride - torch.arange(kh, device=device)[None]).abs()
    dx = (torch.arange(qw, device=device)[:, None] * stride - torch.arange(kw, device=device)[None]).abs()
    if torch.compiler.is_compiling():  # symbolic sizes: the caller guarantees the range (no data-dependent check)
        return dy.reshape(qh, 1, kh, 1), dx.reshape(1, qw, 1, kw)
    if qh and int(dy.max()) >= kh or qw and int(dx.max()) >= kw:
        raise ValueError(f'queries on a {q_hw} grid with stride {stride} reach outside the {kv_hw} key grid')
    return dy.reshape(qh, 1, kh, 1), dx.reshape(1, qw, 1, kw)


#: elements of the flat table index built at a time in the backward of the offset gather
_GATHER_GRAD_BLOCK = 2**22


class _OffsetGather(torch.autograd.Function):
    """``table3[:, dy, dx]`` with a backward that adds the (heads, qh, qw, kh, kw) gradient into the table with
    ``index_add_`` over a flat index built a block of query rows at a time. The backward of advanced indexing
    (``index_put_`` with accumulation) was 40% of a LeViT-256 bfloat16 training step at 800x1216 (1030 ms of
    2400; `tools/bench_profile.py --model levit --size 800x1216x1 --pass train --dtype bf16`); index_add_ is
    about 7x faster for the same sums (measured for 4 heads x 3800 x 3800, 2 threads)."""

    @staticmethod
    def forward(ctx, table3, dy, dx):
        ctx.save_for_backward(dy, dx)
        ctx.table_shape = table3.shape
        return table3[:, dy, dx]

    @staticmethod
    def backward(ctx, grad):
        dy, dx = ctx.saved_tensors
        heads, kh, kw = ctx.table_shape
        qh = dy.shape[0]
        out = grad.new_zeros(heads, kh * kw)
        rows = max(1, _GATHER_GRAD_BLOCK // max(1, grad[0, :1].numel()))
        for a in range(0, qh, rows):
            flat = (dy[a:a + rows] * kw + dx).reshape(-1)  # (rows, qw, kh, kw) table positions
            out.index_add_(1, flat, grad[:, a:a + rows].reshape(heads, -1))
        return out.view(heads, kh, kw), None, None


def gather_offset_bias(table: torch.Tensor, kv_hw: Tuple[int, int], index: Tuple[torch.Tensor, torch.Tensor]):
    """(heads, kh*kw) table (already fitted to ``kv_hw``) + :func:`offset_bias_index` -> (heads, Nq, Nk)."""
    kh, kw = kv_hw
    dy, dx = index
    heads = table.shape[0]
    table3 = table.reshape(heads, kh, kw)
    if torch.is_grad_enabled() and table.requires_grad and not tracing():
        bias = _OffsetGather.apply(table3, dy, dx)
    else:
        bias = table3[:, dy, dx]  # heads, qh, qw, kh, kw
    return bias.reshape(heads, dy.shape[0] * dx.shape[1], kh * kw)


def _cubic(t: torch.Tensor, a: float = -0.75):
    """The four cubic-convolution weights of taps -1, 0, 1, 2 at fraction ``t`` (PyTorch's bicubic kernel)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def offset_axis_weights(size, table_size: int, mode: str = 'bicubic', device=None) -> torch.Tensor:
    """(size, table_size) matrix ``W`` with ``W @ t`` the per-offset biases of one axis of a ``size``-long key
    grid from the ``table_size`` learned offsets ``t`` of that axis, as :func:`resize_offset_bias_table`
    computes them: the first ``size`` offsets when ``size <= table_size``; otherwise the mirrored
    (signed-offset) axis resampled from ``2 * table_size - 1`` to ``2 * size - 1`` entries
    (``align_corners=False``, PyTorch's interpolation weights and border clamping), folded back to its
    non-negative half. Built from tensor operations on ``size``, so it traces with a symbolic size (one
    graph for grids smaller and larger than the table); the choice between the two is a tensor ``where``.
    """
    t = int(table_size)
    dy = torch.arange(size, device=device)
    entries = torch.arange(t, device=device)
    crop = (dy[:, None] == entries[None]).float()
    # output position k-1+dy of the (2k-1)-entry signed axis, in the (2t-1)-entry source (float32, as F.interpolate)
    src_len = 2 * t - 1
    out_len = torch.zeros((), dtype=torch.float32, device=device) + (2 * size - 1)
    pos = (dy + (size - 1)).float()
    src = (src_len / out_len) * (pos + 0.5) - 0.5
    if mode == 'bicubic':
        base = src.floor()
        frac = src - base
        taps = [(base.long() + (m - 1)).clamp(0, src_len - 1) for m in range(4)]
        weights = _cubic(frac)
    elif mode == 'bilinear':
        src = src.clamp(min=0)
        base = src.floor()
        frac = src - base
        taps = [base.long(), (base.long() + 1).clamp(max=src_len - 1)]
        weights = [1 - frac, frac]
    else:
        raise ValueError(f"offset bias resampling mode must be 'bicubic' or 'bilinear', got {mode!r}")
    resampled = sum(wt[:, None] * ((tap - (t - 1)).abs()[:, None] == entries[None]).float()
                    for tap, wt in zip(taps, weights))
    grows = (torch.zeros((), dtype=torch.long, device=device) + size) > t
    return torch.where(grows, resampled, crop)


def traced_offset_bias(table: torch.Tensor, table_hw: Tuple[int, int], q_hw, kv_hw, stride: int = 1,
                       mode: str = 'bicubic') -> torch.Tensor:
    """(heads, Nq, Nk) bias from a (heads, th*tw) table for queries on a ``stride`` sub-grid of a ``kv_hw``
    key grid, with tensor operations only (sizes may be symbolic): :func:`offset_axis_weights` per axis,
    then the offset gather. Equals :func:`resize_offset_bias_table` + :func:`gather_offset_bias` (exactly
    where the grid fits the table; to float rounding where it is resampled, separably per axis)."""
    th, tw = (int(s) for s in table_hw)
    kh, kw = kv_hw
    heads = table.shape[0]
    t = table.reshape(heads, th, tw).float()
    wy = offset_axis_weights(kh, th, mode, table.device)
    wx = offset_axis_weights(kw, tw, mode, table.device)
    fitted = torch.matmul(torch.matmul(wy, t), wx.t()).to(table.dtype)  # heads, kh, kw
    dy, dx = offset_bias_index(q_hw, kv_hw, stride, table.device)
    bias = fitted[:, dy, dx]  # heads, qh, qw, kh, kw
    return bias.reshape(heads, dy.shape[0] * dx.shape[1], kh * kw)


def check_offset_bias_traceable():
    """Refuse a torch.jit trace: the crop-or-resample choice and the indices depend on the grid size."""
    refuse_static_trace('the attention-bias indices and the crop/resampling of the bias tables')
