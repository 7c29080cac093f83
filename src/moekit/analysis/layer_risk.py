"""Experts tied to one set of tokens against another: the risk difference of their activation rates
(SteerMoE: Fayyaz et al. 2025, "Steering MoE LLMs via Expert (De)Activation").

Shape legend: T tokens, L MoE layers, E experts, K experts chosen per token in rank order.

For each layer l and expert e, with S_t token t's K experts at l (or its first choice alone,
``rank='first'``), A and B two sets of tokens (a category against the rest, or the tokens of two
prompts):

    rate_A(l, e) = #{t in A : e in S_t} / |A|,   rate_B likewise,   RD(l, e) = rate_A - rate_B,

with the standard error sqrt(rate_A (1 - rate_A) / |A| + rate_B (1 - rate_B) / |B|). RD > 0: e
fires more on A (SteerMoE activates such experts to steer toward A's behaviour); RD < 0: more on B.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moekit._checks import check_choice, check_int
from moekit.io.files import jsonable

RANKS = ("any", "first")


@dataclass(frozen=True)
class RiskDifference:
    """:func:`risk_difference`'s tables, (L, E) each, and the set sizes.

    Attributes:
        n_a, n_b: tokens in A and in B. count_a_LE, count_b_LE: those that chose e at layer l.
        rate_a_LE, rate_b_LE: the activation rates. rd_LE: rate_a - rate_b. se_LE: its standard
        error. rank: 'any' (e among the K) or 'first' (e the first choice).
    """

    n_a: int
    n_b: int
    count_a_LE: np.ndarray
    count_b_LE: np.ndarray
    rate_a_LE: np.ndarray
    rate_b_LE: np.ndarray
    rd_LE: np.ndarray
    se_LE: np.ndarray
    rank: str

    def ranked(self, top_n: int | None = None, *, toward: str = "a") -> list[dict[str, Any]]:
        """(layer, expert) rows by risk difference: largest first (tied to A, ``toward='a'``) or
        smallest first (tied to B, ``toward='b'``); ties by the larger count. ``top_n`` rows, all
        by default."""
        check_choice("RiskDifference.ranked", "toward", toward, ("a", "b"))
        if top_n is not None:
            check_int("RiskDifference.ranked", "top_n", top_n, minimum=0)
        sign = 1.0 if toward == "a" else -1.0
        rd, count = self.rd_LE.ravel(), (self.count_a_LE + self.count_b_LE).ravel()
        order = np.lexsort((-count, -sign * rd))[:top_n]
        n_experts = self.rd_LE.shape[1]
        return [{"layer": int(i // n_experts), "expert": int(i % n_experts),
                 "risk_difference": float(rd[i]), "se": float(self.se_LE.ravel()[i]),
                 "rate_a": float(self.rate_a_LE.ravel()[i]),
                 "rate_b": float(self.rate_b_LE.ravel()[i]),
                 "count_a": int(self.count_a_LE.ravel()[i]),
                 "count_b": int(self.count_b_LE.ravel()[i])} for i in order]

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


def _mask(name: str, values: Any, n_tokens: int) -> np.ndarray:
    mask = np.asarray(values)
    if mask.dtype != bool or mask.shape != (n_tokens,):
        raise ValueError(f"risk_difference: {name} must be a bool array with one entry per token, "
                         f"shape ({n_tokens},); got dtype={mask.dtype}, shape={mask.shape}. "
                         f"Build it as e.g. recording.categories_T == 3.")
    return mask


def risk_difference(indices_TLK: Any, in_a_T: Any, in_b_T: Any = None, *, n_experts: int,
                    rank: str = "any", chunk_tokens: int = 65536) -> RiskDifference:
    """The risk difference of every expert's activation rate between tokens in A and in B (module
    docstring), read ``chunk_tokens`` at a time (``indices_TLK`` may be a memory map).

    Args:
        indices_TLK: recorded experts, rank order (``LayerRecording.indices_TLK``).
        in_a_T: bool (T,), True for tokens of A. in_b_T: bool (T,) for B; None: every token not
            in A. A token in both counts in both.
        n_experts: E. rank: 'any' or 'first'.

    Example (one layer, K = 1: A = tokens 0-1 on expert 0, B = tokens 2-3 split 0 / 1):
        >>> rd = risk_difference(np.array([[[0]], [[0]], [[0]], [[1]]]),
        ...                      np.array([True, True, False, False]), n_experts=2)
        >>> rd.rd_LE.tolist(), rd.ranked(1)[0]["expert"]
        ([[0.5, -0.5]], 0)
    """
    owner = "risk_difference"
    check_int(owner, "n_experts", n_experts, minimum=1)
    check_choice(owner, "rank", rank, RANKS)
    check_int(owner, "chunk_tokens", chunk_tokens, minimum=1)
    shape = getattr(indices_TLK, "shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(f"{owner}: indices_TLK must have shape (T, L, K); got shape={shape}. "
                         "Pass recording.indices_TLK.")
    n_tokens, n_layers, _ = shape
    in_a = _mask("in_a_T", in_a_T, n_tokens)
    in_b = ~in_a if in_b_T is None else _mask("in_b_T", in_b_T, n_tokens)
    n_a, n_b = int(in_a.sum()), int(in_b.sum())
    if not n_a or not n_b:
        raise ValueError(f"{owner}: both sets need tokens; got {n_a} in A and {n_b} in B. "
                         "Choose sets that the recording holds.")
    count_a, count_b = (np.zeros((n_layers, n_experts), dtype=np.int64) for _ in range(2))
    cells = np.arange(n_layers)[:, None] * n_experts  # code (l, e) -> l * E + e
    for start in range(0, n_tokens, chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        idx_TLK = np.asarray(indices_TLK[chunk], dtype=np.int64)
        if rank == "first":
            idx_TLK = idx_TLK[:, :, :1]
        if idx_TLK.size and (idx_TLK.min() < 0 or idx_TLK.max() >= n_experts):
            raise ValueError(f"{owner}: indices_TLK must hold experts in [0, n_experts="
                             f"{n_experts}); got values from {idx_TLK.min()} to "
                             f"{idx_TLK.max()}.")
        codes_TLK = idx_TLK + cells
        for mask, count_LE in ((in_a[chunk], count_a), (in_b[chunk], count_b)):
            # a token's K experts are distinct, so counting assignments counts tokens
            chunk_LE = np.bincount(codes_TLK[mask].ravel(), minlength=n_layers * n_experts)
            np.add(count_LE, chunk_LE.reshape(n_layers, n_experts), out=count_LE)
    rate_a, rate_b = count_a / n_a, count_b / n_b
    se = np.sqrt(rate_a * (1 - rate_a) / n_a + rate_b * (1 - rate_b) / n_b)
    return RiskDifference(n_a=n_a, n_b=n_b, count_a_LE=count_a, count_b_LE=count_b,
                          rate_a_LE=rate_a, rate_b_LE=rate_b, rd_LE=rate_a - rate_b, se_LE=se,
                          rank=rank)
