"""The auxiliary losses of a routed layer over the global batch, when its rows are spread over the
ranks of an expert-parallel group.

Shape legend: N rows on this rank, E experts, W ranks.

One process computes each loss from statistics of the whole batch (mean router probability,
assignment counts, mean squared log-partition); under expert parallelism each rank holds only its
rows. Each statistic is a sum over rows, so the ranks add their sums (one all_reduce of a small
vector) and every rank computes the same loss, equal to one process's over the concatenated batch,
at every world size. The sum is differentiable with an identity backward
(:func:`~moekit.parallel.exchange.sum_over_ranks`): the loss counts once in the objective, and each
rank's rows get their own share of its gradient, so summing the replicated parameters' gradients
over the ranks gives one process's gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.losses import cv_squared
from moekit.nn.outputs import Routing
from moekit.nn.sparse import SparseMoEConfig
from moekit.parallel.exchange import sum_over_ranks
from moekit.parallel.mesh import ExpertGroup


def global_aux_losses(config: SparseMoEConfig, routing: Routing, counts_E: Tensor,
                      n_global_rows: int, ep: ExpertGroup) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted total and the named parts, as :class:`~moekit.nn.sparse.SparseMoE` names and
    weights them, over the global batch.

    Args:
        routing: this rank's rows' routing.
        counts_E: assignments per expert over the global batch, before capacity (the f_i of
            Switch's load balancing; not differentiable).
        n_global_rows: rows in the global batch.
    """
    c, n_experts = config, config.n_experts
    probs_NE, logits_NE = routing.probs_NE, routing.logits_NE
    # What each loss needs, summed over this rank's rows, in one vector for one all_reduce:
    # sum_n p_ne (E), sum_n logsumexp(logits_n)^2 (1), and the load of the importance loss (E).
    pieces = [probs_NE.sum(0)]
    if c.z_loss_weight:
        pieces.append(torch.logsumexp(logits_NE, dim=-1).square().sum().reshape(1))
    if c.importance_weight:
        load_E = routing.load_E if routing.load_E is not None else torch.bincount(
            routing.experts_NK.flatten(), minlength=n_experts).to(probs_NE.dtype)
        pieces.append(load_E)
    sums = sum_over_ranks(torch.cat(pieces), ep)
    importance_E = sums[:n_experts]
    n_rows = max(1, n_global_rows)
    parts: dict[str, Tensor] = {}
    if c.load_balance_weight:  # Switch Transformer Eq. 4-6: E * sum_i f_i P_i
        counts = counts_E.to(probs_NE.dtype)
        f_E = counts / counts.sum().clamp_min(1.0)
        parts["load_balance"] = n_experts * (f_E * importance_E / n_rows).sum()
    if c.z_loss_weight:  # ST-MoE Eq. 5
        parts["z_loss"] = sums[n_experts] / n_rows
    if c.importance_weight:  # Shazeer et al. 2017 Eq. 6-11
        load_E = sums[-n_experts:]
        parts["importance_load"] = cv_squared(importance_E) + cv_squared(load_E)
    weights = {"load_balance": c.load_balance_weight, "z_loss": c.z_loss_weight,
               "importance_load": c.importance_weight}
    total = logits_NE.new_zeros(())
    for name, value in parts.items():
        total = total + weights[name] * value
    return total, parts
