"""Routing statistics from running sums: load, entropy, dead experts, imbalance, expert-by-class.

Shape legend: N rows, E experts, K experts chosen per row, C classes (or target bins),
A and B the experts of two models being compared.

Every statistic here is a function of a few sums that grow by one batch at a time (``E``, ``E x E``
or ``E x C`` numbers), so a data set of any size is summarised in constant memory; the recorder
(:mod:`moekit.analysis`) feeds the sums. Definitions:

- mean proportion of expert e: the gate's probability p_e(x), averaged over rows;
- primary share: the fraction of rows whose largest combine weight goes to e;
- load: the share of the routed mass that e receives. For a dense mixture this is the mean
  proportion; for a routed (top-k) layer, the share of kept assignments. Loads sum to 1;
- entropy ratio: the mean over rows of H(p(x)) = -sum_e p_e log p_e, divided by log E (1 for a
  uniform gate, 0 for a gate that always picks one expert);
- dead expert: load below ``threshold`` (default 1%, the vowels report's "effectively 0");
- imbalance: CV = std / mean of the loads (population std) and max / mean;
- NMI between the primary expert and the class (or target bin), normalised by the arithmetic mean
  of the two entropies as in :func:`sklearn.metrics.normalized_mutual_info_score`;
- co-activation (routed layers): rows where experts i and j are both kept, and
  P(j kept | i kept);
- KL(h || p): how far the posterior responsibilities h (which use the target) move from the
  gate's prior p, averaged over rows (nats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import entropy as scipy_entropy
from sklearn.metrics import mutual_info_score
from torch import Tensor

from moekit.io.files import jsonable

DEAD_THRESHOLD = 0.01


@dataclass(frozen=True)
class BatchRouting:
    """One batch's routing in the common form every layer reduces to (float64 / bool / long).

    Attributes:
        probs_NE: the gate's full distribution.
        weights_NE: each expert's combine weight after drops (0 where not kept).
        kept_NE: True where the expert was chosen and not dropped.
        dropped_NE: True where the expert was chosen but dropped for capacity.
        primary_N: the expert with the largest combine weight; -1 for rows no expert took.
        dense: True when every expert runs on every row (the 1991 mixture, K = E).
        labels_N: class (or target-bin) index of each row, or None.
        posterior_NE: the posterior responsibilities h, or None.
        contribution_NE: ||w_ne o_ne||, the size of each expert's term in the output, or None.
    """

    probs_NE: Tensor
    weights_NE: Tensor
    kept_NE: Tensor
    dropped_NE: Tensor
    primary_N: Tensor
    dense: bool
    labels_N: Tensor | None = None
    posterior_NE: Tensor | None = None
    contribution_NE: Tensor | None = None


def _zeros(*shape: int, dtype: type = np.float64) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


@dataclass
class RoutingStats:
    """Running sums over every row seen, and the statistics derived from them.

    Build one with :func:`moekit.analysis.recorder.record_routing`, or by hand with ``update``.

    Example:
        >>> stats = RoutingStats(n_experts=4)
        >>> stats.entropy_ratio  # no rows yet
        nan
    """

    n_experts: int
    label_names: list[str] = field(default_factory=list)
    label_kind: str = "class"
    n_rows: int = 0
    dense: bool = True
    top_k: int = 0
    prob_sum_E: np.ndarray = field(default=None)  # type: ignore[assignment]
    primary_count_E: np.ndarray = field(default=None)  # type: ignore[assignment]
    kept_count_E: np.ndarray = field(default=None)  # type: ignore[assignment]
    weight_sum_E: np.ndarray = field(default=None)  # type: ignore[assignment]
    dropped_count_E: np.ndarray = field(default=None)  # type: ignore[assignment]
    coactivation_EE: np.ndarray = field(default=None)  # type: ignore[assignment]
    label_count_EC: np.ndarray = field(default=None)  # type: ignore[assignment]
    label_prob_EC: np.ndarray = field(default=None)  # type: ignore[assignment]
    posterior_sum_E: np.ndarray = field(default=None)  # type: ignore[assignment]
    contribution_sum_E: np.ndarray | None = None
    entropy_sum: float = 0.0
    kl_sum: float = 0.0
    n_posterior_rows: int = 0
    n_unrouted_rows: int = 0

    def __post_init__(self) -> None:
        e = self.n_experts
        for name, shape in (("prob_sum_E", (e,)), ("primary_count_E", (e,)),
                            ("kept_count_E", (e,)), ("weight_sum_E", (e,)),
                            ("dropped_count_E", (e,)), ("coactivation_EE", (e, e)),
                            ("posterior_sum_E", (e,))):
            if getattr(self, name) is None:
                setattr(self, name, _zeros(*shape))
        c = len(self.label_names)
        if self.label_count_EC is None:
            self.label_count_EC, self.label_prob_EC = _zeros(e, c), _zeros(e, c)

    # --- accumulation -------------------------------------------------------------------------

    def update(self, batch: BatchRouting) -> None:
        """Add one batch's routing to the sums."""
        n = batch.probs_NE.shape[0]
        if n == 0:
            return
        probs_NE = batch.probs_NE.double()
        kept_NE = batch.kept_NE.double()
        self.n_rows += n
        self.dense = self.dense and batch.dense
        self.top_k = max(self.top_k, int(batch.kept_NE.sum(1).max()))
        self.prob_sum_E += probs_NE.sum(0).numpy()
        routed = batch.primary_N >= 0
        self.n_unrouted_rows += int((~routed).sum())
        self.primary_count_E += np.bincount(batch.primary_N[routed].numpy(),
                                            minlength=self.n_experts)
        self.kept_count_E += kept_NE.sum(0).numpy()
        self.weight_sum_E += batch.weights_NE.double().sum(0).numpy()
        self.dropped_count_E += batch.dropped_NE.double().sum(0).numpy()
        self.coactivation_EE += (kept_NE.T @ kept_NE).numpy()
        self.entropy_sum += float(-(probs_NE * _safe_log(probs_NE)).sum())
        if batch.labels_N is not None:
            self._update_labels(batch.labels_N, batch.primary_N, probs_NE)
        if batch.posterior_NE is not None:
            h_NE = batch.posterior_NE.double()
            self.posterior_sum_E += h_NE.sum(0).numpy()
            kl_N = (h_NE * (_safe_log(h_NE) - _safe_log(probs_NE))).sum(1)
            self.kl_sum += float(kl_N.sum())
            self.n_posterior_rows += n
        if batch.contribution_NE is not None:
            if self.contribution_sum_E is None:
                self.contribution_sum_E = _zeros(self.n_experts)
            self.contribution_sum_E += batch.contribution_NE.double().sum(0).numpy()

    def _update_labels(self, labels_N: Tensor, primary_N: Tensor, probs_NE: Tensor) -> None:
        labels = labels_N.long().numpy()
        n_labels = int(labels.max()) + 1 if labels.size else 0
        if n_labels > self.label_count_EC.shape[1]:  # a label seen for the first time: grow
            grow = ((0, 0), (0, n_labels - self.label_count_EC.shape[1]))
            self.label_count_EC = np.pad(self.label_count_EC, grow)
            self.label_prob_EC = np.pad(self.label_prob_EC, grow)
            self.label_names += [str(c) for c in range(len(self.label_names), n_labels)]
        routed = primary_N.numpy() >= 0
        np.add.at(self.label_count_EC, (primary_N.numpy()[routed], labels[routed]), 1.0)
        np.add.at(self.label_prob_EC.T, labels, probs_NE.numpy())

    # --- statistics ---------------------------------------------------------------------------

    @property
    def mean_proportion_E(self) -> np.ndarray:
        """The gate's probability of each expert, averaged over rows."""
        return self.prob_sum_E / max(self.n_rows, 1)

    @property
    def primary_share_E(self) -> np.ndarray:
        """The fraction of rows whose largest combine weight goes to each expert."""
        return self.primary_count_E / max(self.n_rows, 1)

    @property
    def selection_rate_E(self) -> np.ndarray:
        """The fraction of rows on which each expert runs (kept); 1 for every expert of a dense
        mixture."""
        return self.kept_count_E / max(self.n_rows, 1)

    @property
    def load_E(self) -> np.ndarray:
        """The share of the routed mass each expert receives (sums to 1)."""
        if self.dense:
            return self.mean_proportion_E
        return self.kept_count_E / max(self.kept_count_E.sum(), 1.0)

    def dead_experts(self, threshold: float = DEAD_THRESHOLD) -> list[int]:
        """Experts whose load is below ``threshold``."""
        return [int(e) for e in np.flatnonzero(self.load_E < threshold)]

    @property
    def entropy_mean(self) -> float:
        """The gate's entropy H(p(x)) in nats, averaged over rows."""
        return self.entropy_sum / self.n_rows if self.n_rows else math.nan

    @property
    def entropy_ratio(self) -> float:
        """Mean gate entropy over log E: 1 for a uniform gate, 0 for a one-hot gate."""
        if self.n_experts < 2 or not self.n_rows:
            return math.nan
        return self.entropy_mean / math.log(self.n_experts)

    @property
    def marginal_entropy_ratio(self) -> float:
        """The entropy of the mean proportions over log E: 1 when experts share rows equally."""
        if self.n_experts < 2 or not self.n_rows:
            return math.nan
        return float(scipy_entropy(self.mean_proportion_E)) / math.log(self.n_experts)

    @property
    def cv(self) -> float:
        return coefficient_of_variation(self.load_E)

    @property
    def max_over_mean(self) -> float:
        return max_over_mean(self.load_E)

    @property
    def nmi(self) -> float:
        """NMI between each row's primary expert and its label (nan without labels)."""
        return nmi_from_contingency(self.label_count_EC)

    @property
    def coactivation_conditional_EE(self) -> np.ndarray:
        """P(j kept | i kept): row i is expert i; 0 where expert i never ran."""
        diag_E = np.diag(self.coactivation_EE)
        return np.divide(self.coactivation_EE, diag_E[:, None],
                         out=np.zeros_like(self.coactivation_EE), where=diag_E[:, None] > 0)

    @property
    def kl_posterior_prior(self) -> float:
        """Mean KL(h || p) in nats over rows with a posterior (nan without targets)."""
        return self.kl_sum / self.n_posterior_rows if self.n_posterior_rows else math.nan

    @property
    def contribution_share_E(self) -> np.ndarray | None:
        """Each expert's share of sum_n sum_e ||w_ne o_ne||, or None where not measured."""
        if self.contribution_sum_E is None:
            return None
        return self.contribution_sum_E / max(self.contribution_sum_E.sum(), 1e-300)

    @property
    def drop_rate(self) -> float:
        """Dropped assignments over chosen assignments (0 for dropless layers)."""
        chosen = self.kept_count_E.sum() + self.dropped_count_E.sum()
        return float(self.dropped_count_E.sum() / chosen) if chosen else 0.0

    def to_dict(self, threshold: float = DEAD_THRESHOLD) -> dict[str, Any]:
        """Every statistic, JSON-ready (NaN becomes None)."""
        has_labels = bool(self.label_count_EC.sum())
        contribution = self.contribution_share_E
        return jsonable({
            "rows": self.n_rows, "n_experts": self.n_experts, "dense": self.dense,
            "top_k": self.n_experts if self.dense else self.top_k,
            "load": {"load": self.load_E, "mean_proportion": self.mean_proportion_E,
                     "primary_share": self.primary_share_E,
                     "selection_rate": self.selection_rate_E},
            "entropy": {"mean_nats": self.entropy_mean, "log_E": math.log(self.n_experts),
                        "ratio": self.entropy_ratio,
                        "marginal_ratio": self.marginal_entropy_ratio},
            "dead_threshold": threshold, "dead_experts": self.dead_experts(threshold),
            "imbalance": {"cv": self.cv, "max_over_mean": self.max_over_mean},
            "unrouted_rows": self.n_unrouted_rows,
            "expert_by_label": None if not has_labels else {
                "kind": self.label_kind, "labels": list(self.label_names),
                "counts": self.label_count_EC, "soft": self.label_prob_EC, "nmi": self.nmi},
            "coactivation": None if self.dense else {
                "counts": self.coactivation_EE,
                "conditional": self.coactivation_conditional_EE},
            "posterior": None if not self.n_posterior_rows else {
                "kl_mean": self.kl_posterior_prior,
                "mean_posterior": self.posterior_sum_E / self.n_posterior_rows},
            "contribution_share": contribution,
            "dropped": {"rate": self.drop_rate, "per_expert": self.dropped_count_E},
        })


def _safe_log(p: Tensor) -> Tensor:
    """log p with log 0 taken as 0 (it only ever multiplies p = 0)."""
    return p.clamp_min(1e-300).log() * (p > 0)


def coefficient_of_variation(values_E: np.ndarray) -> float:
    """std / mean (population std); 0 for equal values. Example: loads (0.5, 0.5, 0, 0) give 1.0."""
    values_E = np.asarray(values_E, dtype=np.float64)
    mean = values_E.mean() if values_E.size else 0.0
    return float(values_E.std() / mean) if mean > 0 else math.nan


def max_over_mean(values_E: np.ndarray) -> float:
    """max / mean: 1 for equal values, E when one expert takes everything."""
    values_E = np.asarray(values_E, dtype=np.float64)
    mean = values_E.mean() if values_E.size else 0.0
    return float(values_E.max() / mean) if mean > 0 else math.nan


def nmi_from_contingency(counts_EC: np.ndarray) -> float:
    """Normalised mutual information of a contingency table (rows: experts, columns: labels).

    MI from :func:`sklearn.metrics.mutual_info_score`; normalised by the arithmetic mean of the two
    marginal entropies, as :func:`sklearn.metrics.normalized_mutual_info_score` does. 1 when one
    side determines the other; nan for an empty table.
    """
    counts_EC = np.asarray(counts_EC, dtype=np.float64)
    total = counts_EC.sum()
    if total <= 0:
        return math.nan
    h_experts = scipy_entropy(counts_EC.sum(1))
    h_labels = scipy_entropy(counts_EC.sum(0))
    if h_experts == 0 and h_labels == 0:
        return 1.0  # both constant: sklearn's convention
    mi = mutual_info_score(None, None, contingency=counts_EC)
    return float(mi / max((h_experts + h_labels) / 2, 1e-300))


def match_experts(overlap_AB: np.ndarray) -> np.ndarray:
    """The one-to-one matching of model A's experts to model B's that maximises the total overlap
    (Hungarian assignment, :func:`scipy.optimize.linear_sum_assignment`).

    Returns ``match_A``: the B expert matched to each A expert (-1 where B has fewer experts).

    Example:
        >>> match_experts(np.array([[0, 9], [8, 1]])).tolist()
        [1, 0]
    """
    overlap_AB = np.asarray(overlap_AB, dtype=np.float64)
    rows, cols = linear_sum_assignment(overlap_AB, maximize=True)
    match_A = np.full(overlap_AB.shape[0], -1, dtype=np.int64)
    match_A[rows] = cols
    return match_A
