"""Routing statistics of a language model's MoE layers, each layer alone and across layers, from
the recorded routing of T tokens, accumulated chunk by chunk in bounded memory.

Shape legend: T tokens, L MoE layers, E experts, K experts chosen per token in rank order
([..., 0] is the first choice), C token categories, P distinct top-1 paths.

Definitions, per layer (S_t: token t's set of K experts, f_t its first choice):

- load_e: the share of the T*K assignments that go to e (sums to 1); top-1 load: the share of
  tokens whose first choice is e (sums to 1). They agree for K = 1; for K > 1 the top-1 load says
  which expert leads, the load which experts run. q_e = P(e in S) = K load_e. Weighted load: e's
  share of the summed combine weights;
- entropy of a load: -sum_e load_e log load_e in nats, and its ratio to log E (1: balanced);
- dead expert: chosen by no token at any rank (``RoutingStats.dead_experts`` uses a threshold
  instead); never-first expert: never a first choice;
- transitions: tokens with first choice i at layer l and j at layer l + 1, (L-1) x E x E, and the
  rows normalised, P(j at l + 1 | i at l);
- paths: the tuple of first choices over ``path_layers`` (all layers by default), counted exactly
  (:mod:`moekit.analysis.layer_paths`);
- experts against token categories (shares, NMI, lift): :mod:`moekit.analysis.layer_categories`;
- consecutive-token repeats and their chance rates: :mod:`moekit.analysis.layer_repeats`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import entropy as scipy_entropy

from moekit._checks import check_int
from moekit.analysis.layer_categories import CategoryTables, category_tables
from moekit.analysis.layer_paths import (
    CodeCounter,
    check_path_layers,
    check_routing_indices,
    check_routing_values,
    decode_path,
    path_codes,
)
from moekit.analysis.layer_repeats import (
    MAX_EXACT_SET_EXPERTS,
    RepeatRates,
    TokenSample,
    count_repeats,
    intersect_chance_exact,
    intersect_chance_sampled,
    repeat_rates,
)
from moekit.io.files import jsonable


@dataclass(frozen=True)
class LayerRoutingResult:
    """Every statistic of :class:`LayerRoutingStats`; ``to_dict`` makes it JSON-ready.

    ``transitions_LEE`` and ``transition_probs_LEE`` have L - 1 rows (layer l to l + 1);
    ``top_paths`` lists ``{"path": [f_l for l in path_layers], "count", "share"}``.
    """

    n_tokens: int
    n_layers: int
    n_experts: int
    top_k: int
    load_LE: np.ndarray
    top1_load_LE: np.ndarray
    weighted_load_LE: np.ndarray | None
    load_entropy_L: np.ndarray
    load_entropy_ratio_L: np.ndarray
    top1_load_entropy_L: np.ndarray
    top1_load_entropy_ratio_L: np.ndarray
    dead_experts: list[list[int]]
    never_first_experts: list[list[int]]
    transitions_LEE: np.ndarray
    transition_probs_LEE: np.ndarray
    path_layers: list[int]
    n_distinct_paths: int
    top_paths: list[dict[str, Any]]
    repeats: RepeatRates
    categories: CategoryTables | None

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


class LayerRoutingStats:
    """Running counts over the routing of every token seen through L layers, and the statistics
    derived from them (:meth:`result`). Memory: O(L E^2 + L E C + distinct paths), plus L 2^E set
    counts for E <= 16 (else a sample of ``sample_tokens`` tokens); no T x E array is built.

    Consecutive chunks continue one token stream: the last token of one chunk pairs with the first
    of the next unless ``doc_T`` (document ids) or ``starts_T`` (True where a document starts) say
    otherwise.

    Example (layer 0 routes category c to expert c, layer 1 sends everything to expert 3):
        >>> stats = LayerRoutingStats(4, category_names=["code", "prose"])
        >>> indices_TLK = np.array([[[0], [3]], [[1], [3]], [[0], [3]], [[1], [3]]])
        >>> result = stats.update(indices_TLK, categories_T=np.array([0, 1, 0, 1])).result()
        >>> result.categories.nmi_L.tolist(), result.dead_experts
        ([1.0, 0.0], [[2, 3], [0, 1, 2]])
        >>> result.top_paths[0]
        {'path': [0, 3], 'count': 2, 'share': 0.5}
    """

    def __init__(self, n_experts: int, *, category_names: Sequence[str] | None = None,
                 path_layers: Sequence[int] | None = None, chunk_tokens: int = 65536,
                 sample_tokens: int = 2048,
                 random_state: int | np.random.Generator | None = 0) -> None:
        owner = "LayerRoutingStats"
        self.n_experts = check_int(owner, "n_experts", n_experts, minimum=1)
        self.category_names = None if category_names is None else [str(c) for c in category_names]
        self.path_layers = None if path_layers is None else [int(i) for i in path_layers]
        self.chunk_tokens = check_int(owner, "chunk_tokens", chunk_tokens, minimum=1)
        self.sample_tokens = check_int(owner, "sample_tokens", sample_tokens, minimum=2)
        self._rng = np.random.default_rng(random_state)  # only draws the sample for E > 16
        self.exact_sets = n_experts <= MAX_EXACT_SET_EXPERTS
        self.n_tokens = self.n_pairs = 0
        self.shape_LK: tuple[int, ...] | None = None  # (L, K), fixed by the first chunk
        self.weighted: bool | None = None
        self.paths = CodeCounter()
        self._last_LK: np.ndarray | None = None  # the previous token, to pair across chunks
        self._last_doc: Any = None

    # --- accumulation -------------------------------------------------------------------------

    def update(self, indices_TLK: Any, weights_TLK: Any = None, *, categories_T: Any = None,
               doc_T: Any = None, starts_T: Any = None) -> LayerRoutingStats:
        """Add the next T tokens of the stream; inputs may be memory maps (read a chunk at a time).
        A bad value raises before its chunk is counted; the chunks before it stay counted.

        Args:
            indices_TLK: each token's chosen experts at each layer, in rank order.
            weights_TLK: their combine weights (for the weighted load); every chunk or none.
            categories_T: each token's category, in [0, len(category_names)).
            doc_T: each token's document id; pairs across a change of id do not count.
            starts_T: True at a document's first token (instead of ``doc_T``).
        """
        owner = "LayerRoutingStats.update"
        idx = check_routing_indices(owner, "indices_TLK", indices_TLK, n_experts=self.n_experts,
                                    shape_LK=self.shape_LK)
        n = idx.shape[0]
        weights = self._check_weights(owner, weights_TLK, idx.shape)
        cats = self._check_categories(owner, categories_T, n)
        if doc_T is not None and starts_T is not None:
            raise ValueError(f"{owner}: pass doc_T or starts_T, not both.")
        doc = None if doc_T is None else _check_vector(owner, "doc_T", doc_T, n)
        starts = None if starts_T is None else _check_vector(owner, "starts_T", starts_T, n)
        if self.shape_LK is None:
            self._start(*idx.shape[1:])
        self.weighted = weights is not None
        for start in range(0, n, self.chunk_tokens):
            chunk = slice(start, start + self.chunk_tokens)
            idx_TLK = np.asarray(idx[chunk], dtype=np.int64)
            check_routing_values(owner, "indices_TLK", idx_TLK, self.n_experts, start)
            cat_T = None if cats is None else np.asarray(cats[chunk], dtype=np.int64)
            if cat_T is not None and ((cat_T < 0) | (cat_T >= len(self.category_names))).any():
                t = int(np.flatnonzero((cat_T < 0) | (cat_T >= len(self.category_names)))[0])
                raise ValueError(f"{owner}: categories_T must lie in [0, len(category_names)="
                                 f"{len(self.category_names)}); got categories_T[{start + t}]="
                                 f"{cat_T[t]}. Add its name to category_names.")
            continues_T = self._continues(None if doc is None else np.asarray(doc[chunk]),
                                          None if starts is None else np.asarray(starts[chunk]),
                                          idx_TLK.shape[0])
            w_TLK = None if weights is None else np.asarray(weights[chunk], dtype=np.float64)
            self._add(idx_TLK, w_TLK, cat_T, continues_T)
        return self

    def _check_weights(self, owner: str, weights_TLK: Any, shape: tuple[int, ...]) -> Any:
        if self.weighted is not None and self.weighted != (weights_TLK is not None):
            raise ValueError(f"{owner}: pass weights_TLK to every update or to none; the first "
                             f"update had {'weights' if self.weighted else 'none'}.")
        if weights_TLK is None:
            return None
        weights = np.asarray(weights_TLK)
        if weights.shape != shape:
            raise ValueError(f"{owner}: weights_TLK must have the shape of indices_TLK {shape}; "
                             f"got weights_TLK.shape={weights.shape}. Pass the weights_NK of the "
                             "same router calls, stacked like the indices.")
        return weights

    def _check_categories(self, owner: str, categories_T: Any, n: int) -> Any:
        if self.category_names is None and categories_T is not None:
            raise ValueError(f"{owner}: got categories_T but no category_names; build "
                             "LayerRoutingStats(n_experts, category_names=[...]) to count them.")
        if self.category_names is not None and categories_T is None:
            raise ValueError(f"{owner}: categories_T is required (category_names="
                             f"{self.category_names[:3]}...); pass each token's category id.")
        if categories_T is None:
            return None
        cats = _check_vector(owner, "categories_T", categories_T, n)
        if not np.issubdtype(cats.dtype, np.integer):
            raise TypeError(f"{owner}: categories_T must hold integer category ids; got "
                            f"dtype={cats.dtype}.")
        return cats

    def _start(self, n_layers: int, top_k: int) -> None:
        e = self.n_experts
        self.path_layers = check_path_layers("LayerRoutingStats", self.path_layers, n_layers, e)
        self.shape_LK = (n_layers, top_k)
        self.counts_LE = np.zeros((n_layers, e), dtype=np.int64)
        self.top1_counts_LE = np.zeros((n_layers, e), dtype=np.int64)
        self.weight_sum_LE = np.zeros((n_layers, e))
        c = len(self.category_names or [])
        self.tokens_C = np.zeros(c, dtype=np.int64)
        self.counts_LEC = np.zeros((n_layers, e, c), dtype=np.int64)
        self.top1_counts_LEC = np.zeros((n_layers, e, c), dtype=np.int64)
        self.transitions_LEE = np.zeros((max(n_layers - 1, 0), e, e), dtype=np.int64)
        self.repeats_4L = np.zeros((4, n_layers), dtype=np.int64)
        self.set_counts_LS = np.zeros((n_layers, 2**e if self.exact_sets else 0), dtype=np.int64)
        self.sample = TokenSample(self.sample_tokens, (n_layers, top_k), self._rng)

    def _continues(self, doc_T: np.ndarray | None, starts_T: np.ndarray | None,
                   n: int) -> np.ndarray:
        """True where token t continues the document of token t - 1 (the first one: the previous
        chunk's last token)."""
        continues_T = np.ones(n, dtype=bool)
        if doc_T is not None:
            continues_T[1:] = doc_T[1:] == doc_T[:-1]
            continues_T[0] = self._last_doc is not None and self._last_doc == doc_T[0]
        elif starts_T is not None:
            continues_T = ~starts_T.astype(bool)
        self._last_doc = None if doc_T is None or not n else doc_T[-1]
        continues_T[:1] &= self._last_LK is not None
        return continues_T

    def _add(self, idx_TLK: np.ndarray, w_TLK: np.ndarray | None, cat_T: np.ndarray | None,
             continues_T: np.ndarray) -> None:
        n, n_layers, _ = idx_TLK.shape
        if not n:
            return
        e = self.n_experts
        cell_TLK = idx_TLK + np.arange(n_layers)[:, None] * e  # code of (layer, expert): l * E + e
        first_TL = cell_TLK[:, :, 0]
        self.counts_LE += _bincount(cell_TLK, self.counts_LE.shape)
        self.top1_counts_LE += _bincount(first_TL, self.counts_LE.shape)
        if w_TLK is not None:
            self.weight_sum_LE += _bincount(cell_TLK, self.weight_sum_LE.shape, w_TLK)
        if cat_T is not None:
            c = self.tokens_C.size
            self.tokens_C += np.bincount(cat_T, minlength=c)
            self.counts_LEC += _bincount(cell_TLK * c + cat_T[:, None, None], self.counts_LEC.shape)
            self.top1_counts_LEC += _bincount(first_TL * c + cat_T[:, None],
                                              self.counts_LEC.shape)
        if n_layers > 1:
            self.transitions_LEE += _bincount(first_TL[:, :-1] * e + idx_TLK[:, 1:, 0],
                                              self.transitions_LEE.shape)
        self.paths.add(path_codes(idx_TLK, self.path_layers, e))
        if self.exact_sets:  # each set as its bit mask, per layer
            masks_TL = np.arange(n_layers) * 2**e
            for k in range(idx_TLK.shape[2]):
                masks_TL = masks_TL + (1 << idx_TLK[:, :, k])
            self.set_counts_LS += _bincount(masks_TL, self.set_counts_LS.shape)
        else:
            self.sample.add(idx_TLK)
        if self._last_LK is None:
            prev_TLK, next_TLK, valid_T = idx_TLK[:-1], idx_TLK[1:], continues_T[1:]
        else:
            prev_TLK = np.concatenate([self._last_LK[None], idx_TLK[:-1]])
            next_TLK, valid_T = idx_TLK, continues_T
        self.repeats_4L += count_repeats(prev_TLK, next_TLK, valid_T)
        self.n_pairs += int(np.count_nonzero(valid_T))
        self._last_LK = idx_TLK[-1].copy()
        self.n_tokens += n

    # --- statistics ---------------------------------------------------------------------------

    def result(self, *, top_n: int = 10, min_count: int = 1) -> LayerRoutingResult:
        """Every statistic of the tokens seen; ``top_n`` paths and lift pairs per layer, pairs with
        at least ``min_count`` assignments."""
        check_int("LayerRoutingStats.result", "top_n", top_n, minimum=0)
        check_int("LayerRoutingStats.result", "min_count", min_count, minimum=1)
        if not self.n_tokens or self.shape_LK is None:
            raise ValueError("LayerRoutingStats.result: no tokens yet; call "
                             "update(indices_TLK) first.")
        n, (n_layers, top_k), e = self.n_tokens, self.shape_LK, self.n_experts
        load_LE, top1_load_LE = self.counts_LE / (n * top_k), self.top1_counts_LE / n
        log_e = math.log(e) if e > 1 else math.nan
        rows_sum_LEE = self.transitions_LEE.sum(2, keepdims=True)
        codes_P, counts_P = self.paths.most_common(top_n)
        if self.exact_sets:
            chance_L, method = intersect_chance_exact(self.set_counts_LS), "exact (observed sets)"
        else:
            chance_L = intersect_chance_sampled(self.sample.sample_RLK, e)
            method = f"all pairs of {self.sample.sample_RLK.shape[0]} sampled tokens"
        return LayerRoutingResult(
            n_tokens=n, n_layers=n_layers, n_experts=e, top_k=top_k,
            load_LE=load_LE, top1_load_LE=top1_load_LE,
            weighted_load_LE=self.weight_sum_LE / np.maximum(
                self.weight_sum_LE.sum(1, keepdims=True), 1e-300) if self.weighted else None,
            load_entropy_L=scipy_entropy(load_LE, axis=1),
            load_entropy_ratio_L=scipy_entropy(load_LE, axis=1) / log_e,
            top1_load_entropy_L=scipy_entropy(top1_load_LE, axis=1),
            top1_load_entropy_ratio_L=scipy_entropy(top1_load_LE, axis=1) / log_e,
            dead_experts=[np.flatnonzero(c_E == 0).tolist() for c_E in self.counts_LE],
            never_first_experts=[np.flatnonzero(c_E == 0).tolist() for c_E in self.top1_counts_LE],
            transitions_LEE=self.transitions_LEE.copy(),
            transition_probs_LEE=self.transitions_LEE / np.maximum(rows_sum_LEE, 1),
            path_layers=list(self.path_layers), n_distinct_paths=self.paths.n_distinct,
            top_paths=[{"path": decode_path(code, len(self.path_layers), e), "count": int(count),
                        "share": float(count / n)} for code, count in zip(codes_P, counts_P,
                                                                           strict=True)],
            repeats=repeat_rates(self.repeats_4L, self.n_pairs, top1_load_LE, load_LE * top_k,
                                 top_k, chance_L, method),
            categories=None if self.category_names is None else self._categories(top_n, min_count))

    def _categories(self, top_n: int, min_count: int) -> CategoryTables:
        return category_tables(self.counts_LEC, self.top1_counts_LEC, self.tokens_C,
                               self.category_names or [], top_k=self.shape_LK[1], top_n=top_n,
                               min_count=min_count)


def _bincount(codes: np.ndarray, shape: tuple[int, ...], weights: np.ndarray | None = None
              ) -> np.ndarray:
    size = math.prod(shape)
    w = None if weights is None else weights.ravel()
    return np.bincount(codes.ravel(), weights=w, minlength=size).reshape(shape)


def _check_vector(owner: str, name: str, values: Any, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{owner}: {name} must have one entry per token, shape ({n},); got "
                         f"{name}.shape={arr.shape}. Pass it flat, in the tokens' order.")
    return arr
