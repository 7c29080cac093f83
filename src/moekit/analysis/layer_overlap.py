"""Two routings of the same tokens compared, layer by layer: two checkpoints of one model with
experts taken as numbered (:func:`routing_saturation`), or two independently trained models
(seeds) after matching their experts (:func:`match_seed_experts`); :class:`RoutingOverlap`
accumulates the co-assignment counts both read, chunk by chunk.

Shape legend: T tokens, L MoE layers, E experts, K experts chosen per token in rank order
([..., 0] is the first choice), A and B the experts of the two routings compared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moekit._checks import check_int
from moekit.analysis.layer_paths import check_routing_indices, check_routing_values
from moekit.analysis.stats import match_experts
from moekit.io.files import jsonable


@dataclass(frozen=True)
class Saturation:
    """Two checkpoints of one model on the same tokens, experts taken as they are numbered.

    Attributes:
        overlap_L: mean over tokens of |A ∩ B| / K (1: the same sets; 0: disjoint).
        top1_agreement_L: share of tokens with the same first choice.
        chance_overlap_L: the overlap of independent tokens with these loads, sum_e qA_e qB_e / K.
    """

    n_tokens: int
    top_k: int
    overlap_L: np.ndarray
    top1_agreement_L: np.ndarray
    chance_overlap_L: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


@dataclass(frozen=True)
class ExpertMatch:
    """Two independently trained models (seeds) on the same tokens, experts matched per layer.

    Attributes:
        permutation_LE: the B expert matched to each A expert (Hungarian assignment maximising the
            co-assignment counts); ``np.argsort(permutation_LE[l])[b_indices]`` relabels B's
            experts in A's numbering.
        matched_overlap_L: mean |A ∩ matched B| / K; ``unmatched_overlap_L`` the same unmatched.
        matched_top1_agreement_L: share of tokens whose first choices correspond under the matching.
        chance_overlap_L: sum_e qA_e qB_(matched e) / K, the overlap of independent tokens.
        coassignment_LAB: tokens where A chose a and B chose b (any ranks).
    """

    n_tokens: int
    top_k: int
    permutation_LE: np.ndarray
    matched_overlap_L: np.ndarray
    unmatched_overlap_L: np.ndarray
    matched_top1_agreement_L: np.ndarray
    chance_overlap_L: np.ndarray
    coassignment_LAB: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


class RoutingOverlap:
    """Co-assignment counts of two routings of the same tokens, accumulated chunk by chunk
    (memory L x E x E); read them as :meth:`saturation` or :meth:`matched`.

    Example:
        >>> a_TLK = np.array([[[0, 1]], [[2, 3]]])
        >>> overlap = RoutingOverlap(4).update(a_TLK, a_TLK[:, :, ::-1])
        >>> overlap.saturation().overlap_L.tolist(), overlap.saturation().top1_agreement_L.tolist()
        ([1.0], [0.0])
    """

    def __init__(self, n_experts: int, *, chunk_tokens: int = 65536) -> None:
        self.n_experts = check_int("RoutingOverlap", "n_experts", n_experts, minimum=1)
        self.chunk_tokens = check_int("RoutingOverlap", "chunk_tokens", chunk_tokens, minimum=1)
        self.n_tokens = 0
        self.shape_LK: tuple[int, ...] | None = None  # (L, K), fixed by the first chunk
        self.co_LAB = self.top1_LAB = np.zeros((0, n_experts, n_experts), dtype=np.int64)
        self.count_a_LE = self.count_b_LE = np.zeros((0, n_experts), dtype=np.int64)

    def update(self, indices_a_TLK: Any, indices_b_TLK: Any) -> RoutingOverlap:
        """Add a chunk of the same tokens routed by A and by B (both (T, L, K))."""
        owner, e = "RoutingOverlap.update", self.n_experts
        a = check_routing_indices(owner, "indices_a_TLK", indices_a_TLK, n_experts=e,
                                  shape_LK=self.shape_LK)
        b = check_routing_indices(owner, "indices_b_TLK", indices_b_TLK, n_experts=e,
                                  shape_LK=a.shape[1:])
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"{owner}: indices_a_TLK and indices_b_TLK must route the same tokens;"
                             f" got shapes {a.shape} and {b.shape}. Record both on one token set.")
        n_layers, top_k = a.shape[1:]
        if self.shape_LK is None:
            self.shape_LK = a.shape[1:]
            self.co_LAB = np.zeros((n_layers, e, e), dtype=np.int64)
            self.top1_LAB = np.zeros((n_layers, e, e), dtype=np.int64)
            self.count_a_LE = np.zeros((n_layers, e), dtype=np.int64)
            self.count_b_LE = np.zeros((n_layers, e), dtype=np.int64)
        shift_L1 = np.arange(n_layers)[:, None] * e
        size = n_layers * e * e
        for start in range(0, a.shape[0], self.chunk_tokens):
            stop = start + self.chunk_tokens
            a_TLK, b_TLK = np.asarray(a[start:stop], np.int64), np.asarray(b[start:stop], np.int64)
            check_routing_values(owner, "indices_a_TLK", a_TLK, e, start)
            check_routing_values(owner, "indices_b_TLK", b_TLK, e, start)
            row_TLK = (a_TLK + shift_L1) * e  # code (l, a, b) = (l * E + a) * E + b
            for j in range(top_k):
                self.co_LAB += np.bincount((row_TLK + b_TLK[:, :, j, None]).ravel(),
                                           minlength=size).reshape(self.co_LAB.shape)
            self.top1_LAB += np.bincount((row_TLK[:, :, 0] + b_TLK[:, :, 0]).ravel(),
                                         minlength=size).reshape(self.co_LAB.shape)
            self.count_a_LE += np.bincount((a_TLK + shift_L1).ravel(),
                                           minlength=n_layers * e).reshape(n_layers, e)
            self.count_b_LE += np.bincount((b_TLK + shift_L1).ravel(),
                                           minlength=n_layers * e).reshape(n_layers, e)
            self.n_tokens += a_TLK.shape[0]
        return self

    def _check_filled(self, what: str) -> tuple[int, int]:
        if not self.n_tokens or self.shape_LK is None:
            raise ValueError(f"RoutingOverlap.{what}: no tokens yet; call update(a, b) first.")
        return self.n_tokens, self.shape_LK[1]

    def saturation(self) -> Saturation:
        """The overlap with experts as numbered (two checkpoints of one model)."""
        n, k = self._check_filled("saturation")
        q_a, q_b = self.count_a_LE / n, self.count_b_LE / n
        return Saturation(
            n_tokens=n, top_k=k,
            overlap_L=np.trace(self.co_LAB, axis1=1, axis2=2) / (n * k),
            top1_agreement_L=np.trace(self.top1_LAB, axis1=1, axis2=2) / n,
            chance_overlap_L=(q_a * q_b).sum(1) / k)

    def matched(self) -> ExpertMatch:
        """The overlap after matching B's experts to A's, layer by layer (two seeds)."""
        n, k = self._check_filled("matched")
        perm_LE = np.stack([match_experts(co_AB) for co_AB in self.co_LAB])
        layers_L1, experts_1E = np.arange(len(perm_LE))[:, None], np.arange(self.n_experts)
        q_b_LE = np.take_along_axis(self.count_b_LE / n, perm_LE, axis=1)
        return ExpertMatch(
            n_tokens=n, top_k=k, permutation_LE=perm_LE,
            matched_overlap_L=self.co_LAB[layers_L1, experts_1E, perm_LE].sum(1) / (n * k),
            unmatched_overlap_L=np.trace(self.co_LAB, axis1=1, axis2=2) / (n * k),
            matched_top1_agreement_L=self.top1_LAB[layers_L1, experts_1E, perm_LE].sum(1) / n,
            chance_overlap_L=(self.count_a_LE / n * q_b_LE).sum(1) / k,
            coassignment_LAB=self.co_LAB.copy())


def routing_saturation(indices_a_TLK: Any, indices_b_TLK: Any, *, n_experts: int,
                       chunk_tokens: int = 65536) -> Saturation:
    """Per layer, the mean over tokens of |A ∩ B| / K of two checkpoints' top-k sets.

    Example:
        >>> a_TLK = np.array([[[0, 1], [2, 3]], [[1, 2], [0, 3]]])
        >>> routing_saturation(a_TLK, a_TLK, n_experts=4).overlap_L.tolist()
        [1.0, 1.0]
    """
    return RoutingOverlap(n_experts, chunk_tokens=chunk_tokens).update(
        indices_a_TLK, indices_b_TLK).saturation()


def match_seed_experts(indices_a_TLK: Any, indices_b_TLK: Any, *, n_experts: int,
                       chunk_tokens: int = 65536) -> ExpertMatch:
    """Match two seeds' experts per layer (Hungarian on co-assignments) and measure the overlap.

    Example (B is A with experts 0 and 1 swapped):
        >>> a_TLK = np.array([[[0]], [[1]], [[2]]])
        >>> match = match_seed_experts(a_TLK, np.array([[[1]], [[0]], [[2]]]), n_experts=3)
        >>> match.permutation_LE.tolist(), match.matched_overlap_L.tolist()
        ([[1, 0, 2]], [1.0])
    """
    return RoutingOverlap(n_experts, chunk_tokens=chunk_tokens).update(
        indices_a_TLK, indices_b_TLK).matched()
