"""Routing agreement between two models (two runs, two checkpoints) on the same rows, with their
experts matched one to one by the Hungarian assignment.

Shape legend: N rows, A and B the experts of the two models being compared.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moekit._checks import check_int
from moekit.analysis.recorder import batch_routing, iter_batches
from moekit.analysis.stats import match_experts, nmi_from_contingency
from moekit.io.files import jsonable
from moekit.nn.outputs import MoEOutput


@dataclass(frozen=True)
class Agreement:
    """How alike two models route the same rows, after matching experts one to one.

    Attributes:
        match_A: the B expert matched to each A expert (Hungarian assignment on the primary-expert
            confusion), -1 where unmatched.
        agreement: fraction of rows whose primary experts correspond under the matching.
        agreement_unmatched: the same without matching (expert e of A against expert e of B).
        nmi: NMI between the two models' primary experts (matching-free).
        tv_distance: mean over rows of half the L1 distance between p_A and the matched p_B.
        selection_overlap: fraction of A's kept assignments whose matched B expert is also kept
            (routed layers; nan when both models are dense, where every expert always runs).
        confusion_AB: rows with primary expert a under A and b under B.
    """

    match_A: list[int]
    agreement: float
    agreement_unmatched: float
    nmi: float
    tv_distance: float
    selection_overlap: float
    confusion_AB: list[list[int]]
    n_rows: int

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self.__dict__)


@torch.no_grad()
def routing_agreement(model_a: nn.Module, model_b: nn.Module, data: Tensor | Iterable, *,
                      batch_size: int = 4096) -> Agreement:
    """Compare the routing of two models (two runs, two checkpoints) on the same rows.

    Example:
        >>> from moekit import MixtureOfExperts
        >>> a = MixtureOfExperts(2, 1, 3)
        >>> routing_agreement(a, a, torch.randn(50, 2)).agreement
        1.0
    """
    check_int("routing_agreement", "batch_size", batch_size, minimum=1)
    sums: dict[str, np.ndarray] = {}
    n_rows, both_dense = 0, True
    modes = (model_a.training, model_b.training)
    model_a.eval()
    model_b.eval()
    try:
        for x, _ in iter_batches(data, batch_size=batch_size):
            a = batch_routing(model_a, x, MoEOutput.check(model_a(x), "routing_agreement"),
                              contributions=False)
            b = batch_routing(model_b, x, MoEOutput.check(model_b(x), "routing_agreement"),
                              contributions=False)
            e_a, e_b = a.probs_NE.shape[1], b.probs_NE.shape[1]
            both_dense = both_dense and a.dense and b.dense
            routed = (a.primary_N >= 0) & (b.primary_N >= 0)
            confusion = np.zeros((e_a, e_b))
            np.add.at(confusion, (a.primary_N[routed].numpy(), b.primary_N[routed].numpy()), 1)
            abs_diff = np.stack([(a.probs_NE[:, i:i + 1] - b.probs_NE).abs().sum(0).numpy()
                                 for i in range(e_a)])
            both = (a.kept_NE.double().T @ b.kept_NE.double()).numpy()
            for key, value in (("confusion", confusion), ("abs_diff", abs_diff), ("both", both),
                               ("kept_a", a.kept_NE.double().sum(0).numpy())):
                sums[key] = sums.get(key, 0) + value
            n_rows += x.reshape(-1, x.shape[-1]).shape[0]
    finally:
        model_a.train(modes[0])
        model_b.train(modes[1])
    if not n_rows:
        raise ValueError("routing_agreement: the data had no rows.")
    confusion = sums["confusion"]
    match_A = match_experts(confusion)
    pairs = [(i, j) for i, j in enumerate(match_A) if j >= 0]
    total = max(confusion.sum(), 1.0)
    diagonal = sum(confusion[i, i] for i in range(min(confusion.shape)))
    return Agreement(
        match_A=[int(j) for j in match_A],
        agreement=float(sum(confusion[i, j] for i, j in pairs) / total),
        agreement_unmatched=float(diagonal / total),
        nmi=nmi_from_contingency(confusion),
        tv_distance=float(0.5 * sum(sums["abs_diff"][i, j] for i, j in pairs) / n_rows),
        selection_overlap=math.nan if both_dense else float(
            sum(sums["both"][i, j] for i, j in pairs) / max(sums["kept_a"].sum(), 1.0)),
        confusion_AB=confusion.astype(int).tolist(), n_rows=n_rows)
