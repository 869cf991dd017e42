"""Window partitioning for (shifted-, shuffled-)window attention on NHWC maps and raster tokens.

The maps are padded at the bottom/right to a multiple of the window *before* any cyclic shift, and
the shift mask is built on the padded size: the convention of the official Swin detection and
segmentation code, mmdet and HF transformers.

Everything here is computed with tensor operations on the sizes (``arange``, ``%``, ``//``, comparisons),
with no Python branch on their values, so the same code traces symbolically (torch.compile,
torch.export, ONNX dynamo export: one graph for every input size). In eager mode the results are cached
per (size, window, shift, device[, dtype]), so a forward pass builds each plan and mask once, not once
per block; tracing never goes through those caches (:func:`get_window_plan`, :func:`shift_mask`,
:func:`key_padding_mask`).
"""
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .tracing import ceil_div, pad_amount, refuse_static_trace, symbolic_tracing, tracing


def pad_to_window(x: torch.Tensor, window: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Zero-pad an NHWC map at the bottom/right so H and W are multiples of ``window``.

    Returns the padded map and the padding ``(pad_h, pad_w)``.
    """
    _, h, w, _ = x.shape
    pad_h, pad_w = pad_amount(h, window[0]), pad_amount(w, window[1])
    if symbolic_tracing():
        return F.pad(x, (0, 0, 0, pad_w, 0, pad_h)), (pad_h, pad_w)
    refuse_static_trace('the window padding')
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x, (pad_h, pad_w)


def window_partition(x: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of the window -> (B, num_windows, wh*ww, C)."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(windows: torch.Tensor, window: Tuple[int, int], hw: Tuple[int, int]) -> torch.Tensor:
    """(B, num_windows, wh*ww, C) -> (B, H, W, C); inverse of :func:`window_partition`."""
    b, _, _, c = windows.shape
    h, w = hw
    wh, ww = window
    x = windows.view(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def _mod(t: torch.Tensor, n) -> torch.Tensor:
    """``t % n`` for a non-negative integer tensor and a size ``n`` that may be symbolic, written as
    ``t - (t // n) * n`` (the ONNX exporter cannot take a remainder by a symbolic scalar)."""
    return t % n if isinstance(n, int) else t - (t // n) * n


def _shift_mask(hw, window, shift, device, dtype, fill: float) -> torch.Tensor:
    h, w = hw
    # bands [0, H-wh), [H-wh, H-sh), [H-sh, H) per axis, numbered 0, 1, 2 (band 2 is empty without a shift)
    band_r = (torch.arange(h, device=device) >= h - window[0]).long() + (torch.arange(h, device=device) >= h - shift[0]).long()
    band_c = (torch.arange(w, device=device) >= w - window[1]).long() + (torch.arange(w, device=device) >= w - shift[1]).long()
    region = (band_r.view(1, h, 1, 1) * 3 + band_c.view(1, 1, w, 1))
    win = window_partition(region, window).squeeze(0).squeeze(-1)  # (nW, N)
    mask = win.unsqueeze(1) != win.unsqueeze(2)
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask, fill)


_cached_shift_mask = lru_cache(maxsize=64)(_shift_mask)


def shifted_window_mask(hw: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int],
                        device: torch.device, dtype: torch.dtype, fill: float = -100.) -> torch.Tensor:
    """Additive mask (num_windows, N, N) for attention over cyclically shifted windows.

    A padded map of size ``hw`` is split into three bands per axis: ``[0, H-wh)``, ``[H-wh, H-sh)`` and
    ``[H-sh, H)``. After the shift, tokens of one window that came from different bands must not attend
    to each other: such pairs get ``fill`` (-100, as the reference implementations use), others 0.
    In eager mode the result is cached; do not modify it in place. Traced code should use
    :func:`shift_mask`, whose (nW*N, N) layout has no axis of windows alone.
    """
    if symbolic_tracing():
        return _shift_mask(tuple(hw), tuple(window), tuple(shift), device, dtype, fill)
    if torch.jit.is_tracing():
        refuse_static_trace('the shifted-window mask')
        return _shift_mask(tuple(int(s) for s in hw), tuple(window), tuple(shift), device, dtype, fill)
    return _cached_shift_mask(tuple(hw), tuple(window), tuple(shift), device, dtype, fill)


class WindowPlan:
    """Index maps between a raster token sequence (B, H*W, C) and (shifted or shuffled, padded) windows.

    ``gather`` holds, for every window slot, the raster index of its token (padding slots point to
    token 0); ``pad_mask`` is True at the padding slots, which eager code also has as the index list
    ``pad_slots`` (None when nothing is padded; traced code always uses ``pad_mask``);
    ``scatter`` holds, for every raster token, its window slot. Padding, cyclic shift and partition (and
    their inverses) thereby become one gather each way, and the backward of each is the other gather.

    Regular windows (``shuffled=False``, Swin and ViTDet) hold neighbouring tokens, after a cyclic shift
    by ``shift`` (a roll by ``-shift``) of the padded map. Shuffled windows (Shuffle Transformer) hold,
    at window (a, b) and position (i, j), the token at row ``i * Hp/wh + a`` and column ``j * Wp/ww + b``.

    Every map is computed with tensor operations on the sizes, which may be symbolic, and every tensor
    is indexed by window slot (length nW*N) or by token (length H*W): none has an axis of windows alone,
    whose length is 1 at common sizes (Swin's last stage up to 224 px), which would make torch.export
    specialise on it.
    """

    def __init__(self, hw: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int] = (0, 0),
                 device: Optional[torch.device] = None, shuffled: bool = False):
        h, w = hw
        wh, ww = window
        nh, nw = ceil_div(h, wh), ceil_div(w, ww)
        hp, wp = nh * wh, nw * ww
        self.hw, self.window, self.padded_hw, self.shift = (h, w), (wh, ww), (hp, wp), tuple(shift)
        self.num_windows = nh * nw
        self.shuffled = shuffled
        rows, cols = self.slot_coords(device)
        # window slot -> coordinates in the shifted padded map -> source coordinates (the shift is a roll by -s)
        src_r, src_c = _mod(rows + shift[0], hp), _mod(cols + shift[1], wp)
        valid = (src_r < h) & (src_c < w)
        self.gather = torch.where(valid, src_r * w + src_c, 0)
        self.pad_mask = ~valid
        # raster token -> its position in the shifted padded map -> its window slot
        t = torch.arange(h * w, device=device)
        pr, pc = _mod(t // w + (hp - shift[0]), hp), _mod(_mod(t, w) + (wp - shift[1]), wp)  # (r - shift) mod hp
        (wr, ir), (wc, jc) = ((_mod(pr, nh), pr // nh), (_mod(pc, nw), pc // nw)) if shuffled else (
            (pr // wh, pr % wh), (pc // ww, pc % ww))
        self.scatter = ((wr * nw + wc) * wh + ir) * ww + jc
        self.pad_slots = None
        # (meta tensors hold no values: a meta-device model, e.g. for FLOP counting, takes the mask path)
        if not tracing() and self.pad_mask.device.type != 'meta' and bool(self.pad_mask.any()):
            self.pad_slots = torch.nonzero(self.pad_mask).squeeze(1)

    @property
    def window_area(self) -> int:
        return self.window[0] * self.window[1]

    def slot_coords(self, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(row, column) in the (shifted) padded map of every window slot, each of length nW*N."""
        wh, ww = self.window
        nh, nw = self.padded_hw[0] // wh, self.padded_hw[1] // ww
        s = torch.arange(self.num_windows * wh * ww, device=device)
        win, pos = s // (wh * ww), s % (wh * ww)
        a, b, i, j = win // nw, _mod(win, nw), pos // ww, pos % ww
        return (i * nh + a, j * nw + b) if self.shuffled else (a * wh + i, b * ww + j)

    def window_keys(self, device=None) -> torch.Tensor:
        """(nW*N, N): for every window slot, the slots of its window (the keys its query attends to)."""
        n = self.window_area
        s = torch.arange(self.num_windows * n, device=device)
        return (s // n * n).unsqueeze(1) + torch.arange(n, device=device)


_cached_plan = lru_cache(maxsize=128)(WindowPlan)


def get_window_plan(hw: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int] = (0, 0),
                    device: Optional[torch.device] = None, shuffled: bool = False) -> WindowPlan:
    """A :class:`WindowPlan`: cached per size in eager mode, built in the graph under symbolic tracing."""
    if symbolic_tracing():
        return WindowPlan(tuple(hw), tuple(window), tuple(shift), device, shuffled)
    if torch.jit.is_tracing():  # fixed_size_trace(): the plan is a constant of the graph
        refuse_static_trace('the window partition (which token sits in which window)')
        return WindowPlan(tuple(int(s) for s in hw), tuple(window), tuple(shift), device, shuffled)
    return _cached_plan(tuple(hw), tuple(window), tuple(shift), device, shuffled)


def window_plan(hw: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int], device: torch.device) -> WindowPlan:
    """A regular (shifted) :class:`WindowPlan` for a map size, window and shift (see :func:`get_window_plan`)."""
    return get_window_plan(hw, window, shift, device)


def key_padding_mask(plan: WindowPlan, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask, -inf on padding key slots and 0 elsewhere: (num_windows, 1, N) in eager mode;
    traced, (num_windows * N, N) (one row per query slot: no axis of windows alone)."""
    device = plan.gather.device
    if tracing():
        pad = plan.pad_mask[plan.window_keys(device)]
    else:
        pad = plan.pad_mask.view(plan.num_windows, 1, plan.window_area)
    return torch.zeros(pad.shape, dtype=dtype, device=device).masked_fill(pad, float('-inf'))


def shift_mask(plan: WindowPlan, dtype: torch.dtype = torch.float32, fill: float = -100.) -> torch.Tensor:
    """:func:`shifted_window_mask` for the windows of ``plan``: (num_windows, N, N), cached, in eager mode;
    traced, (num_windows * N, N) rows per query slot, computed from the slot coordinates."""
    if not tracing():
        return shifted_window_mask(plan.padded_hw, plan.window, plan.shift, plan.gather.device, dtype, fill)
    device = plan.gather.device
    (hp, wp), (wh, ww), (sh, sw) = plan.padded_hw, plan.window, plan.shift
    rows, cols = plan.slot_coords(device)
    region = ((rows >= hp - wh).long() + (rows >= hp - sh).long()) * 3 + (cols >= wp - ww).long() + (cols >= wp - sw).long()
    differ = region.unsqueeze(1) != region[plan.window_keys(device)]
    return torch.zeros(differ.shape, dtype=dtype, device=device).masked_fill(differ, fill)


def zero_pad_slots(x: torch.Tensor, plan: WindowPlan, dim: int, value=0.) -> torch.Tensor:
    """``x`` with its window slots along ``dim`` that are padding set to ``value`` (a scalar, or a tensor
    that broadcasts against ``x``); in place in eager mode, out of place when traced."""
    if tracing():
        shape = [1] * x.ndim
        shape[dim] = -1
        return torch.where(plan.pad_mask.view(shape), torch.as_tensor(value, dtype=x.dtype, device=x.device), x)
    if plan.pad_slots is None:
        return x
    if isinstance(value, torch.Tensor):
        shape = list(x.shape)
        shape[dim] = plan.pad_slots.numel()
        return x.index_copy_(dim, plan.pad_slots, value.to(x.dtype).expand(shape))
    return x.index_fill_(dim, plan.pad_slots, value)


class _TokenGather(torch.autograd.Function):
    """out = x[:, index] with the padding slots of out set to 0 (``zero_out``: the plan whose padding
    slots are zeroed, or None). Every source token lands in exactly one non-padding slot, so the
    gradient is again a gather (``back_index``, zeroing ``back_zero``'s padding) rather than a scatter-add."""

    @staticmethod
    def forward(ctx, x, index, zero_out, back_index, back_zero):
        ctx.back_index, ctx.back_zero = back_index, back_zero
        out = x.index_select(1, index)
        return out if zero_out is None else zero_pad_slots(out, zero_out, 1)

    @staticmethod
    def backward(ctx, grad):
        out = grad.index_select(1, ctx.back_index)
        return (out if ctx.back_zero is None else zero_pad_slots(out, ctx.back_zero, 1)), None, None, None, None


def tokens_to_windows(x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """(B, H*W, C) raster tokens -> (B * num_windows, N, C) windows (zero tokens in the padding)."""
    b, _, c = x.shape
    if tracing():  # plain differentiable ops
        out = zero_pad_slots(x.index_select(1, plan.gather), plan, 1)
    else:
        out = _TokenGather.apply(x, plan.gather, plan, plan.scatter, None)
    return out.view(b * plan.num_windows, plan.window[0] * plan.window[1], c)


def windows_to_tokens(windows: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """(B * num_windows, N, C) windows -> (B, H*W, C) raster tokens (padding dropped, shift undone)."""
    c = windows.shape[-1]
    b = windows.shape[0] // plan.num_windows
    y = windows.reshape(b, -1, c)
    if tracing():
        return y.index_select(1, plan.scatter)
    return _TokenGather.apply(y, plan.scatter, None, plan.gather, plan)
