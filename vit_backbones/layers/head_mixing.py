"""Attention whose heads exchange information through the attention matrix itself.

Both variants need the (B, heads, Nq, Nk) matrix materialised, so they run the explicit path (batched
matmuls + softmax) rather than a fused kernel, and mix it across the head axis with a learned
heads x heads matrix (plus a bias per output head):

* :class:`TalkingHeadAttention` (CaiT; Shazeer et al., "Talking-Heads Attention"): the logits are mixed
  before the softmax (``proj_l``) and the probabilities after it (``proj_w``);
* :class:`ReAttention` (DeepViT): the probabilities are mixed by a 1x1 convolution over the heads
  (``reatten_matrix``), normalised by a BatchNorm over the heads (``var_norm``) and optionally
  multiplied by the score scale.

Module and parameter names follow the official implementations so that their checkpoints load unchanged.
Each accepts an additive ``bias`` on the logits (relative position bias of ViTDet windows), added before
any mixing.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBase
from .attention_kernel import attention_scores


def mix_heads(attn: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``out[:, g] = sum_h weight[g, h] * attn[:, h] + bias[g]`` for a (B, H, N, M) tensor.

    One batched matmul of the (H, H) matrix with the (B, H, N*M) view of ``attn`` (no permutes);
    ``weight`` may also be a 1x1 convolution kernel (H, H, 1, 1).
    """
    b, h = attn.shape[:2]
    flat = attn.reshape(b, h, -1)
    w = weight.reshape(h, h).to(flat.dtype).expand(b, h, h)
    if bias is None:
        out = torch.bmm(w, flat)
    else:
        out = torch.baddbmm(bias.to(flat.dtype).view(1, h, 1), w, flat)
    return out.view(attn.shape)


def _apply(attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, N, M) @ (B, H, M, d) -> (B, H, N, d)."""
    b, h, n, m = attn.shape
    d = v.shape[-1]
    return torch.bmm(attn.reshape(b * h, n, m), v.to(attn.dtype).reshape(b * h, m, d)).view(b, h, n, d)


class TalkingHeadAttention(AttentionBase):
    """Multi-head self-attention with talking heads (CaiT's self-attention layers).

    ``softmax(proj_l(q k^T * scale)) -> proj_w -> attention dropout -> @ v -> proj``, where ``proj_l`` and
    ``proj_w`` are Linear(heads, heads) maps applied across the head axis at every (query, key) position.
    With identity ``proj_l`` / ``proj_w`` and zero biases it is ordinary multi-head attention.

    Args:
        dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop: as :class:`~.attention.Attention`.
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__(dim, num_heads, qk_scale, attn_drop, qkv_bias)
        self.proj_l = nn.Linear(num_heads, num_heads)
        self.proj_w = nn.Linear(num_heads, num_heads)
        self._build_output(dim, proj_drop)

    def attention_matrix(self, q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The mixed (B, H, N, M) attention weights (before dropout)."""
        logits = mix_heads(attention_scores(q, k, self.scale, bias), self.proj_l.weight, self.proj_l.bias)
        return mix_heads(logits.softmax(dim=-1), self.proj_w.weight, self.proj_w.bias)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        attn = self.attention_matrix(q, k, bias)
        if self.training and self.attn_drop > 0:
            attn = F.dropout(attn, self.attn_drop)
        return self.output(_apply(attn, v))


class ReAttention(AttentionBase):
    """DeepViT's re-attention: ``softmax(q k^T * scale)`` -> attention dropout -> 1x1 conv over the heads
    (``reatten_matrix``, the learnable transformation Theta) -> BatchNorm2d over the heads (``var_norm``)
    -> times ``reatten_scale`` -> ``@ v`` -> ``proj``.

    With an identity kernel, zero bias and a BatchNorm that is the identity (eval mode, mean 0, var 1,
    weight 1, bias 0, up to its eps) it is ordinary multi-head attention.

    Args:
        dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop: as :class:`~.attention.Attention`.
        transform_scale: multiply the re-attention map by the score scale ``head_dim ** -0.5`` (DeepViT-S);
            otherwise by 1.
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 transform_scale: bool = False):
        super().__init__(dim, num_heads, qk_scale, attn_drop, qkv_bias)
        self.reatten_matrix = nn.Conv2d(num_heads, num_heads, 1, 1)
        self.var_norm = nn.BatchNorm2d(num_heads)
        self.reatten_scale = self.scale if transform_scale else 1.0
        self._build_output(dim, proj_drop)

    def attention_matrix(self, q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The re-attention map (B, H, N, M) that multiplies v."""
        attn = attention_scores(q, k, self.scale, bias).softmax(dim=-1)
        if self.training and self.attn_drop > 0:
            attn = F.dropout(attn, self.attn_drop)
        attn = self.var_norm(mix_heads(attn, self.reatten_matrix.weight, self.reatten_matrix.bias))
        return attn * self.reatten_scale if self.reatten_scale != 1.0 else attn

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        return self.output(_apply(self.attention_matrix(q, k, bias), v))
