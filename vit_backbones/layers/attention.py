"""The attention family: one base class for every multi-head attention module of the package.

:class:`AttentionBase` owns what they share: the head split (``dim`` divisible by ``num_heads``,
``head_dim``, the score ``scale``), the attention-dropout probability ``attn_drop``, the optional fused
``qkv`` projection and the output projection ``proj`` + ``proj_drop``. The modules built on it:

* :class:`Attention`: plain multi-head self-attention (ViT, DeiT and their relatives);
* :class:`WindowAttention`: the same inside windows with a learned relative-position bias (Swin, Shuffle);
* :class:`~.head_mixing.TalkingHeadAttention` (CaiT) and :class:`~.head_mixing.ReAttention` (DeepViT);
* :class:`~.sra.SpatialReductionAttention` (PVT) and :class:`~.conv_proj.ConvProjectionAttention` (CvT).

Modules that attend over a sequence with an additive bias (``forward(x, bias)``) share one call for
windowed attention, ``forward_windows(x, plan, rel_bias, mask)`` on raster tokens: by default the
windows are cut out as a batch and ``forward`` runs on them; :class:`Attention` overrides it with
:func:`~.window_attention.window_attention`, which projects only the real tokens. The kernels are in
:mod:`.attention_kernel`.
"""
from typing import Optional, Tuple

import torch
from torch import nn

from .attention_kernel import scaled_dot_product, split_heads
from .linear import inference_linear
from .rel_pos import RelativePositionBias
from .window import WindowPlan, tokens_to_windows, windows_to_tokens
from .window_attention import window_attention


class AttentionBase(nn.Module):
    """The shared part of the attention modules.

    Args:
        dim: channels (input and output).
        num_heads: attention heads (``dim`` must be divisible by it).
        qk_scale: score scale (default ``head_dim ** -0.5``).
        attn_drop: dropout probability on the attention weights (kept as a float, applied in training).
        qkv_bias: bias of the fused ``qkv`` projection.
        fused_qkv: build the fused ``qkv`` Linear(dim, 3 * dim); modules with their own q/k/v
            projections pass False.

    A subclass calls ``super().__init__``, builds its own modules, then :meth:`_build_output` (``proj`` and
    ``proj_drop``), so that the modules are created in the order of the official implementations.
    """

    #: ``forward(x, bias)`` on (B, N, C) tokens with an additive bias on the logits, so that
    #: :meth:`forward_windows` can run it inside windows
    takes_bias = True

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 qk_scale: Optional[float] = None,
                 attn_drop: float = 0.,
                 qkv_bias: bool = True,
                 fused_qkv: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        if fused_qkv:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop

    def _build_output(self, dim: int, proj_drop: float) -> None:
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    @property
    def dropout_p(self) -> float:
        """The attention dropout to apply now (0 in eval)."""
        return self.attn_drop if self.training else 0.

    def qkv_heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) tokens -> q, k, v of the fused projection, each (B, heads, N, head_dim)."""
        return split_heads(inference_linear(x, self.qkv), self.num_heads)

    def to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, heads * head_dim) -> (B, heads, N, head_dim)."""
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, d) attention output -> heads merged, ``proj``, ``proj_drop``: (B, N, C)."""
        b, h, n, d = out.shape
        return self.project(out.transpose(1, 2).reshape(b, n, h * d))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``proj_drop(proj(x))`` on (B, N, C) tokens whose heads are merged."""
        return self.proj_drop(inference_linear(x, self.proj))

    def forward_windows(self, x: torch.Tensor, plan: WindowPlan, rel_bias: Optional[torch.Tensor] = None,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This attention inside the windows of ``plan``, for raster tokens (B, H*W, C) -> (B, H*W, C).

        ``rel_bias`` (heads, N, N) is shared by all windows; ``mask`` is a constant per-window additive mask,
        (nW, N, N) or (nW, 1, N). Windows are cut out as a batch (zero tokens in the padding) and
        ``forward(windows, bias)`` runs on them.
        """
        if not self.takes_bias:
            raise TypeError(f'{type(self).__name__} has no windowed form (its forward takes a token grid, not '
                            f'an additive bias)')
        windows = tokens_to_windows(x, plan)
        bias = None if rel_bias is None else rel_bias.unsqueeze(0)
        if mask is not None:
            per_window = mask.unsqueeze(1).repeat(x.shape[0], 1, 1, 1)  # (B*nW, 1, N or 1, N), batch-major
            bias = per_window if bias is None else bias + per_window
        return windows_to_tokens(self(windows, bias), plan)


class Attention(AttentionBase):
    """Multi-head self-attention with a fused qkv projection (``qkv``) and an output projection (``proj``).

    ``forward(x, bias)`` takes (B, N, C) tokens and an optional additive bias broadcastable to
    (B, heads, N, N).
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__(dim, num_heads, qk_scale, attn_drop, qkv_bias)
        self._build_output(dim, proj_drop)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        return self.output(scaled_dot_product(q, k, v, bias, self.dropout_p, self.scale))

    def forward_windows(self, x: torch.Tensor, plan: WindowPlan, rel_bias: Optional[torch.Tensor] = None,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As :meth:`AttentionBase.forward_windows`, straight from the tokens: see
        :func:`~vit_backbones.layers.window_attention.window_attention` (projections on real tokens only)."""
        qkv = inference_linear(x, self.qkv)
        out = window_attention(qkv, plan, self.num_heads, self.scale, rel_bias, mask, self.qkv.bias,
                               self.dropout_p)
        return self.project(out)


class WindowAttention(Attention):
    """Multi-head attention inside windows with a learned relative position bias (Swin, Shuffle).

    ``forward(x, plan, mask)`` takes raster tokens (B, H*W, C) of a ``plan.hw`` map and an optional
    constant per-window mask ((nW, N, N) shift mask or (nW, 1, N) key-padding mask); the qkv and output
    projections run on the real tokens only (:meth:`Attention.forward_windows`).
    """

    def __init__(self, dim: int, num_heads: int, window: Tuple[int, int], **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.rel_pos = RelativePositionBias(num_heads, window)

    def forward(self, x: torch.Tensor, plan: WindowPlan, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_windows(x, plan, self.rel_pos(plan.window), mask)
