"""Experts against token categories, per layer of a language model: which experts a category of
tokens (keywords, names, strings...) goes to, more or less often than all tokens do.

Shape legend: L MoE layers, E experts, C token categories; S is a token's set of K chosen experts,
f its first choice.

- ``counts_LEC``: assignments (all ranks) of category c to expert e; ``top1_counts_LEC``: first
  choices; ``share_LEC`` = P(e in S | c) (a category's column sums to K), ``top1_share_LEC`` =
  P(f = e | c) (sums to 1);
- NMI(top-1 expert, category), normalised by the arithmetic mean of the two entropies (sklearn's
  default; :func:`~moekit.analysis.stats.nmi_from_contingency`); ``nmi_L`` over depth is the
  selectivity curve;
- lift(e, c) = P(e in S | c) / P(e in S) (P(f = e | c) / P(f = e) when K = 1): 1 when category c
  uses e as often as all tokens do; the top pairs are the highest lifts among pairs with at least
  ``min_count`` assignments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moekit.analysis.stats import nmi_from_contingency


def lift_table(counts_EC: np.ndarray) -> np.ndarray:
    """lift(e, c) = P(e | c) / P(e) of an expert x category table of assignments: the count over
    what independence gives, counts_EC * total / (row sum * column sum); nan where e or c is empty.

    Example (category 0 always on expert 0, category 1 split):
        >>> lift_table(np.array([[2, 1], [0, 1]])).tolist()
        [[1.3333333333333333, 0.6666666666666666], [0.0, 2.0]]
    """
    counts_EC = np.asarray(counts_EC, dtype=np.float64)
    expected_EC = np.outer(counts_EC.sum(1), counts_EC.sum(0)) / max(counts_EC.sum(), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(expected_EC > 0, counts_EC / expected_EC, np.nan)


def top_lift_pairs(counts_EC: np.ndarray, *, category_names: Sequence[str] | None = None,
                   top_k: int = 1, top_n: int = 10, min_count: int = 1) -> list[dict[str, Any]]:
    """The ``top_n`` expert-category pairs with the highest lift among those with at least
    ``min_count`` assignments (ties: more assignments first). ``share_of_category`` is
    P(e in S | c) (``top_k`` assignments per token), ``share_of_expert`` the share of e's
    assignments that come from c.

    Example:
        >>> pair = top_lift_pairs(np.array([[2, 1], [0, 1]]), category_names=["a", "b"])[0]
        >>> pair["expert"], pair["category"], pair["lift"], pair["count"]
        (1, 'b', 2.0, 1)
    """
    counts_EC = np.asarray(counts_EC, dtype=np.float64)
    names = category_names or [str(c) for c in range(counts_EC.shape[1])]
    lift_EC = lift_table(counts_EC)
    experts, categories = np.nonzero((counts_EC >= min_count) & np.isfinite(lift_EC))
    order = np.lexsort((-counts_EC[experts, categories], -lift_EC[experts, categories]))[:top_n]
    tokens_C, assignments_E = counts_EC.sum(0) / top_k, counts_EC.sum(1)
    return [{"expert": int(e), "category": names[c], "lift": float(lift_EC[e, c]),
             "count": int(counts_EC[e, c]),
             "share_of_category": float(counts_EC[e, c] / tokens_C[c]),
             "share_of_expert": float(counts_EC[e, c] / assignments_E[e])}
            for e, c in zip(experts[order], categories[order], strict=True)]


@dataclass(frozen=True)
class CategoryTables:
    """Experts against token categories, per layer (definitions in the module docstring)."""

    names: list[str]
    tokens_C: np.ndarray
    counts_LEC: np.ndarray
    top1_counts_LEC: np.ndarray
    share_LEC: np.ndarray
    top1_share_LEC: np.ndarray
    lift_LEC: np.ndarray
    nmi_L: np.ndarray
    top_pairs: list[list[dict[str, Any]]]


def category_tables(counts_LEC: np.ndarray, top1_counts_LEC: np.ndarray, tokens_C: np.ndarray,
                    names: Sequence[str], *, top_k: int, top_n: int = 10,
                    min_count: int = 1) -> CategoryTables:
    """The tables of :class:`CategoryTables` from the counts of assignments and of first choices
    per layer, and the tokens per category (``top_k`` assignments per token).

    Example (one layer, K = 1: category a always on expert 0, b always on expert 1):
        >>> counts_LEC = np.array([[[3, 0], [0, 1]]])
        >>> tables = category_tables(counts_LEC, counts_LEC, np.array([3, 1]), ["a", "b"], top_k=1)
        >>> tables.nmi_L.tolist(), tables.top1_share_LEC[0].tolist()
        ([1.0], [[1.0, 0.0], [0.0, 1.0]])
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        share_LEC = np.where(tokens_C > 0, counts_LEC / tokens_C, 0.0)
        top1_share_LEC = np.where(tokens_C > 0, top1_counts_LEC / tokens_C, 0.0)
    return CategoryTables(
        names=list(names), tokens_C=tokens_C.copy(),
        counts_LEC=counts_LEC.copy(), top1_counts_LEC=top1_counts_LEC.copy(),
        share_LEC=share_LEC, top1_share_LEC=top1_share_LEC,
        lift_LEC=np.stack([lift_table(c_EC) for c_EC in counts_LEC]),
        nmi_L=np.array([nmi_from_contingency(c_EC) for c_EC in top1_counts_LEC]),
        top_pairs=[top_lift_pairs(c_EC, category_names=list(names), top_k=top_k, top_n=top_n,
                                  min_count=min_count)
                   for c_EC in counts_LEC])
