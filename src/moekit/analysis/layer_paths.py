"""A token's route through a language model's MoE layers: the recorded routing of T tokens as
(T, L, K) expert indices, checked the way every layer statistic needs it
(:func:`check_routing_indices`, :func:`check_routing_values`), and its paths, the tuple of first
choices over chosen layers, as exact int64 codes (:func:`path_codes`, :func:`decode_path`) counted
in bounded memory (:class:`CodeCounter`).

Shape legend: T tokens, L MoE layers, E experts, K experts chosen per token in rank order
([..., 0] is the first choice), P distinct codes.

The path of a token over n layers with first choices f_0 .. f_(n-1) is the integer
sum_l f_l E^(n-1-l): counted exactly, 16 bytes per distinct path, at most min(T, E^n) of them; E^n
must fit an int64 (:data:`INT64_CODES`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

INT64_CODES = 2**63 - 1


def check_routing_indices(owner: str, name: str, indices: Any, *, n_experts: int,
                          shape_LK: tuple[int, ...] | None = None) -> np.ndarray:
    """``indices`` as an array of shape (T, L, K) of integers, K <= n_experts (values unchecked)."""
    arr = np.asarray(indices)
    if arr.ndim != 3:
        hint = f" For one layer pass {name}[:, None, :]." if arr.ndim == 2 else ""
        raise ValueError(f"{owner}: {name} must be 3-D (tokens T, layers L, top_k K); got "
                         f"{name}.shape={arr.shape}.{hint}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{owner}: {name} must hold integer expert indices; got dtype={arr.dtype}. "
                        "Pass the chosen experts (Routing.experts_NK), not their weights.")
    if shape_LK is not None and arr.shape[1:] != shape_LK:
        raise ValueError(f"{owner}: {name} has (L, K) = {arr.shape[1:]} but earlier chunks had "
                         f"(L, K) = {shape_LK}; got {name}.shape={arr.shape}. Record every chunk "
                         "from the same layers with the same top_k.")
    if arr.shape[2] > n_experts:
        raise ValueError(f"{owner}: {name} chooses K={arr.shape[2]} experts per token but "
                         f"n_experts={n_experts}; got {name}.shape={arr.shape}. Pass n_experts= "
                         "the layer's expert count.")
    return arr


def check_routing_values(owner: str, name: str, idx_TLK: np.ndarray, n_experts: int,
                         offset: int = 0) -> None:
    """Raise unless every index lies in [0, n_experts) and each token's K experts are distinct
    (the set statistics count an expert once per token). ``offset``: the chunk's first token."""
    bad_TLK = (idx_TLK < 0) | (idx_TLK >= n_experts)
    if bad_TLK.any():
        t, layer, k = np.argwhere(bad_TLK)[0]
        raise ValueError(f"{owner}: {name} must lie in [0, n_experts={n_experts}); got "
                         f"{name}[{t + offset}, {layer}, {k}]={idx_TLK[t, layer, k]}. Pass "
                         "n_experts= the layer's expert count, and drop dropped assignments "
                         "(-1) first.")
    top_k = idx_TLK.shape[2]
    for i, j in itertools.combinations(range(top_k), 2):
        dup_TL = idx_TLK[:, :, i] == idx_TLK[:, :, j]
        if dup_TL.any():
            t, layer = np.argwhere(dup_TL)[0]
            raise ValueError(f"{owner}: each token's K experts must be distinct; got "
                             f"{name}[{t + offset}, {layer}]={idx_TLK[t, layer].tolist()}. Pass "
                             "the top-k indices of one router call per layer.")


def check_path_layers(owner: str, path_layers: Sequence[int] | None, n_layers: int,
                      n_experts: int) -> list[int]:
    """The layers a path runs through (None: all L of them), each in [0, n_layers), few enough that
    ``n_experts`` ** len(layers) codes fit an int64."""
    layers = list(range(n_layers)) if path_layers is None else list(path_layers)
    if not layers or any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"{owner}: path_layers must be layers in [0, L={n_layers}); got "
                         f"path_layers={path_layers}.")
    if n_experts ** len(layers) > INT64_CODES:
        fit = 1
        while n_experts ** (fit + 1) <= INT64_CODES:
            fit += 1
        raise ValueError(f"{owner}: a path over {len(layers)} layers of "
                         f"n_experts={n_experts} has {n_experts}**{len(layers)} values, more than "
                         f"an int64 holds; pass path_layers= at most {fit} layers, e.g. "
                         f"path_layers=range({fit}).")
    return layers


def path_codes(idx_TLK: np.ndarray, path_layers: Sequence[int], n_experts: int) -> np.ndarray:
    """Each token's path: its first choices over ``path_layers`` as one int64 code,
    sum_l f_l E^(n-1-l) (shape (T,)).

    Example (first choices 2 then 1 of E = 3 experts: 2 * 3 + 1):
        >>> path_codes(np.array([[[2], [1]]]), [0, 1], 3).tolist()
        [7]
    """
    path_T = np.zeros(idx_TLK.shape[0], dtype=np.int64)
    for layer in path_layers:
        path_T = path_T * n_experts + idx_TLK[:, layer, 0]
    return path_T


def decode_path(code: int, n_layers: int, n_experts: int) -> list[int]:
    """The first choices, layer by layer, of a :func:`path_codes` code over ``n_layers`` layers.

    Example:
        >>> decode_path(7, 2, 3)
        [2, 1]
    """
    path = []
    for _ in range(n_layers):
        code, expert = divmod(int(code), n_experts)
        path.append(expert)
    return path[::-1]


class CodeCounter:
    """Exact counts of int64 codes: each chunk's distinct codes wait in a list, merged into two
    sorted arrays once they outnumber the codes already held (at most 2 x 16 bytes per distinct
    code, and O(T log T) work in all).

    Example:
        >>> counter = CodeCounter()
        >>> counter.add(np.array([3, 1, 3])); counter.add(np.array([3, 7]))
        >>> counter.most_common(2), counter.n_distinct
        ((array([3, 1]), array([3, 1])), 3)
    """

    MIN_MERGE = 1 << 16

    def __init__(self) -> None:
        self.codes_P = np.zeros(0, dtype=np.int64)
        self.counts_P = np.zeros(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._n_pending = 0

    def add(self, codes: np.ndarray) -> None:
        self._pending.append(np.unique(codes, return_counts=True))
        self._n_pending += self._pending[-1][0].size
        if self._n_pending >= max(self.codes_P.size, self.MIN_MERGE):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        codes, inverse = np.unique(np.concatenate([self.codes_P, *(c for c, _ in self._pending)]),
                                   return_inverse=True)
        counts = np.concatenate([self.counts_P, *(n for _, n in self._pending)])
        self.counts_P = np.zeros(codes.size, dtype=np.int64)
        np.add.at(self.counts_P, inverse, counts)
        self.codes_P, self._pending, self._n_pending = codes, [], 0

    @property
    def n_distinct(self) -> int:
        self._merge()
        return int(self.codes_P.size)

    def most_common(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` most frequent codes and their counts; ties in increasing code order."""
        self._merge()
        order = np.argsort(-self.counts_P, kind="stable")[:n]
        return self.codes_P[order], self.counts_P[order]
