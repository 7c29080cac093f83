"""The parts of a transformer block other than the mixture of experts: causal self-attention with
rotary positions, and the dense SwiGLU feed-forward (:mod:`moekit.nn.lm` assembles the blocks).

Shape legend: B batch, T positions, D model width, H heads, A = D / H features per head,
F = A / 2 rotary frequencies.

Attention itself is PyTorch's ``scaled_dot_product_attention(is_causal=True)`` (position t attends
to positions <= t); rotary positions (RoPE, Su et al. 2021, "RoFormer") rotate each (i, i + A/2)
feature pair of queries and keys by the angle t * base^(-2i/A), so that q_t . k_s depends on the
positions only through t - s.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def rotary(x_BHTA: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate the feature pairs (i, i + A/2) of ``x`` at position t by t * base^(-2i/A).

    The "rotate half" pairing of GPT-NeoX and LLaMA. Angles are computed in float32 at least (in
    float64 for float64 inputs): bfloat16 angles would lose the position at long contexts.

    Example:
        >>> x = torch.ones(1, 1, 3, 2)  # position 0 is not rotated; A = 2 has one frequency, 1
        >>> rotary(x)[0, 0, :, 0]       # cos t - sin t
        tensor([ 1.0000, -0.3012, -1.3254])
    """
    n_pos, n_feat = x_BHTA.shape[-2], x_BHTA.shape[-1]
    dtype = torch.float64 if x_BHTA.dtype == torch.float64 else torch.float32
    freq_F = base ** (-torch.arange(0, n_feat, 2, dtype=dtype, device=x_BHTA.device) / n_feat)
    angle_TF = torch.arange(n_pos, dtype=dtype, device=x_BHTA.device).outer(freq_F)
    cos_TF, sin_TF = angle_TF.cos().to(x_BHTA.dtype), angle_TF.sin().to(x_BHTA.dtype)
    x1, x2 = x_BHTA.chunk(2, dim=-1)
    return torch.cat([x1 * cos_TF - x2 * sin_TF, x1 * sin_TF + x2 * cos_TF], dim=-1)


def _normal(shape: tuple[int, ...], std: float, generator: torch.Generator | None) -> nn.Parameter:
    """A weight drawn from N(0, std^2) with the caller's generator (nn.Linear's own init would
    draw from the global RNG)."""
    w = torch.empty(shape)
    with torch.no_grad():
        w.normal_(0.0, std, generator=generator)
    return nn.Parameter(w)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, (B, T, D) -> (B, T, D), without biases (as LLaMA).

    Args:
        d_model: D. n_heads: H (D must be a multiple of H; A = D / H even for rotary positions).
        rotary_base: the RoPE base, or None for no rotation (positions then come from elsewhere,
            e.g. learned position embeddings added to the input).
        std, residual_std: the initial weights' standard deviations, N(0, std^2) for ``w_qkv_FD``
            and N(0, residual_std^2) for ``w_out_DD`` (default: ``std``), from ``generator``.

    Weights, as nn.Linear stores them (output features first): ``w_qkv_FD`` (F = 3D: queries,
    keys, values) and ``w_out_DD`` (the projection back into the residual stream).

    Example:
        >>> attn = CausalSelfAttention(16, 4)
        >>> attn(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, d_model: int, n_heads: int, *, rotary_base: float | None = 10000.0,
                 std: float = 0.02, residual_std: float | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"CausalSelfAttention: d_model must be a multiple of n_heads; got "
                             f"d_model={d_model}, n_heads={n_heads}.")
        self.n_heads, self.rotary_base = n_heads, rotary_base
        self.w_qkv_FD = _normal((3 * d_model, d_model), std, generator)
        self.w_out_DD = _normal((d_model, d_model), residual_std or std, generator)

    def forward(self, h_BTD: Tensor) -> Tensor:
        n_batch, n_pos, d_model = h_BTD.shape
        # (B, T, 3D) -> three (B, H, T, A)
        q_BHTA, k_BHTA, v_BHTA = (
            t.reshape(n_batch, n_pos, self.n_heads, -1).transpose(1, 2)
            for t in F.linear(h_BTD, self.w_qkv_FD).chunk(3, dim=-1))
        if self.rotary_base is not None:
            q_BHTA, k_BHTA = rotary(q_BHTA, self.rotary_base), rotary(k_BHTA, self.rotary_base)
        y_BHTA = F.scaled_dot_product_attention(q_BHTA, k_BHTA, v_BHTA, is_causal=True)
        return F.linear(y_BHTA.transpose(1, 2).reshape(n_batch, n_pos, d_model), self.w_out_DD)


class SwiGLU(nn.Module):
    """The dense feed-forward block, (..., D) -> (..., D): W2 (silu(W1 h) * W3 h), no biases
    (Shazeer 2020). Weights as the experts store them: ``w13_FD`` (F = 2H; rows [0, H) are W1,
    [H, 2H) W3) and ``w2_DH``, drawn from N(0, std^2) and N(0, residual_std^2).

    Example:
        >>> SwiGLU(8, 12)(torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, d_model: int, hidden: int, *, std: float = 0.02,
                 residual_std: float | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.w13_FD = _normal((2 * hidden, d_model), std, generator)
        self.w2_DH = _normal((d_model, hidden), residual_std or std, generator)

    def forward(self, h: Tensor) -> Tensor:
        gate, up = F.linear(h, self.w13_FD).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2_DH)
