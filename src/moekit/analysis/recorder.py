"""The routing recorder: run a mixture over a data set and collect what its gate did to every row.

Shape legend: N rows, D input features, O outputs, E experts, K experts chosen per row,
A and B the experts of two models being compared.

Works on any module whose forward returns a :class:`~moekit.nn.outputs.MoEOutput`: the dense
:class:`~moekit.nn.dense.MixtureOfExperts`, the routed :class:`~moekit.nn.sparse.SparseMoE`, and
hierarchical mixtures (their ``probs_NE`` are over the leaves). Memory stays bounded: the statistics
are running sums (:class:`~moekit.analysis.stats.RoutingStats`), and the per-row routing, when asked
for, streams to disk batch by batch (:class:`~moekit.analysis.store.RoutingStore`).

    >>> rec = record_routing(model, x, y)                             # doctest: +SKIP
    >>> rec.stats.load_E, rec.stats.nmi, rec.stats.dead_experts()     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moekit._checks import check_choice, check_int, check_positive_float
from moekit.analysis.stats import BatchRouting, RoutingStats
from moekit.analysis.store import RoutingStore, StoreWriter
from moekit.fitting.objective import dense_targets
from moekit.losses import categorical_responsibilities, responsibilities
from moekit.nn.dispatch import gather_rows
from moekit.nn.experts import apply_head
from moekit.nn.outputs import MoEOutput

logger = logging.getLogger(__name__)

LIKELIHOODS = ("gaussian", "categorical")


# --- reading batches ---------------------------------------------------------------------------

def iter_batches(data: Tensor | Iterable, y: Tensor | None = None, *, batch_size: int = 4096
                 ) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(x, y)`` batches from a tensor (sliced into ``batch_size`` rows, with ``y`` sliced
    alike) or from an iterable / DataLoader whose items are ``x`` or ``(x, y, ...)``."""
    if isinstance(data, Tensor):
        if y is not None and y.shape[0] != data.shape[0]:
            raise ValueError(f"record_routing: row counts must match; x has {data.shape[0]}, "
                             f"y has {y.shape[0]}.")
        for start in range(0, data.shape[0], batch_size):
            stop = start + batch_size
            yield data[start:stop], None if y is None else y[start:stop]
        return
    if y is not None:
        raise ValueError("record_routing: pass y only with a tensor x; an iterable yields "
                         "(x, y) batches itself.")
    for item in data:
        if isinstance(item, Tensor):
            yield item, None
        elif isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
            yield item[0], item[1] if len(item) > 1 else None
        else:
            raise TypeError(f"record_routing: each batch must be a tensor x or a pair (x, y); "
                            f"got {type(item).__name__}.")


# --- one batch to the common form --------------------------------------------------------------

def _dropped_NK(out: MoEOutput) -> Tensor:
    routing = out.routing
    dropped = torch.zeros_like(routing.experts_NK, dtype=torch.bool)
    plan = out.dispatch
    if plan is None or plan.dropped_rows.numel() == 0:
        return dropped
    n_experts = routing.n_experts
    rows_NK = torch.arange(routing.experts_NK.shape[0], device=dropped.device).unsqueeze(1)
    key_NK = rows_NK * n_experts + routing.experts_NK
    return torch.isin(key_NK, plan.dropped_rows * n_experts + plan.dropped_experts)


def row_labels(y: Tensor, edges: np.ndarray | None) -> Tensor:
    """Each row's label: class indices as they are; float targets binned between ``edges`` on
    their first column (on the CPU)."""
    if not y.is_floating_point():
        return y.reshape(-1).long().cpu()
    value_N = (y.reshape(y.shape[0], -1)[:, 0]).double().cpu().numpy()
    return torch.from_numpy(np.searchsorted(edges[1:-1], value_N, side="right")).long()


def _posterior(out: MoEOutput, y: Tensor, likelihood: str, variance: float) -> Tensor | None:
    """h = p_e P_e(y | x) / sum_j p_j P_j(y | x), where every expert's output is available and
    the targets fit it (class indices below O, or O float columns); None otherwise."""
    if out.expert_outputs is None:
        return None
    n_outputs = out.expert_outputs.shape[-1]
    fits = int(y.max()) < n_outputs if not y.is_floating_point() else \
        y.reshape(y.shape[0], -1).shape[1] == n_outputs
    if not fits:
        return None
    log_prior_NE = out.routing.probs_NE.clamp_min(1e-300).log()
    if likelihood == "categorical":
        if y.is_floating_point() or out.expert_logits is None:
            raise ValueError("record_routing: likelihood='categorical' needs class-index targets "
                             "and expert logits; use likelihood='gaussian'.")
        return categorical_responsibilities(log_prior_NE, out.expert_logits, y.reshape(-1))
    target_NO = dense_targets(y, n_outputs, out.expert_outputs.dtype)
    return responsibilities(log_prior_NE, out.expert_outputs, target_NO, variance=variance)


def _routed_contributions(model: nn.Module, x: Tensor, out: MoEOutput) -> Tensor | None:
    """||w o|| of each kept assignment of a routed layer, recomputed from its grouped experts."""
    plan, experts = out.dispatch, getattr(model, "experts", None)
    if plan is None or not hasattr(experts, "forward_grouped"):
        return None
    x_ND = x.reshape(-1, x.shape[-1])
    implementation = getattr(getattr(model, "config", None), "experts_implementation", "auto")
    y_MO = apply_head(getattr(experts, "head", "identity"),
                      experts.forward_grouped(gather_rows(x_ND, plan), plan.counts_E,
                                              implementation=implementation))
    size_M = (plan.weights_M.unsqueeze(-1) * y_MO).norm(dim=-1).double()
    flat_NE = size_M.new_zeros(x_ND.shape[0] * out.routing.n_experts)
    flat_NE.index_add_(0, plan.rows_M * out.routing.n_experts + plan.experts_M, size_M)
    return flat_NE.view(x_ND.shape[0], -1)


def _assignment_masks(out: MoEOutput) -> tuple[Tensor, Tensor]:
    """``(kept_NK, dropped_NK)`` of a routed layer's choices: chosen and run, chosen but dropped
    for capacity."""
    routing = out.routing
    mask_NK = routing.mask_NK if routing.mask_NK is not None else \
        torch.ones_like(routing.experts_NK, dtype=torch.bool)
    dropped_NK = _dropped_NK(out) & mask_NK
    return mask_NK & ~dropped_NK, dropped_NK


def _on_cpu(batch: BatchRouting) -> BatchRouting:
    """``batch`` with every tensor on the CPU (one already there is kept as it is, not copied)."""
    return dataclasses.replace(batch, **{
        f.name: value.detach().cpu() for f in dataclasses.fields(batch)
        if isinstance(value := getattr(batch, f.name), Tensor)})


def _reduce(model: nn.Module, x: Tensor, out: MoEOutput, y: Tensor | None, *,
            edges: np.ndarray | None, likelihood: str, variance: float, contributions: bool,
            assignments: bool = False) -> tuple[BatchRouting, dict[str, Tensor] | None]:
    """:func:`batch_routing`, and with ``assignments`` a routed layer's choices as the store
    keeps them (``experts``, ``weights``, ``kept``, ``dropped``, each (N, K)); all on the CPU."""
    routing = out.routing
    probs_NE = routing.probs_NE.detach()
    n_rows, n_experts = probs_NE.shape
    chosen = None
    if routing.dense:
        weights_NE = routing.weights_NK.detach()
        kept_NE = torch.ones_like(weights_NE, dtype=torch.bool)
        dropped_NE = torch.zeros_like(kept_NE)
    else:
        keep_NK, dropped_NK = _assignment_masks(out)
        chosen_weights_NK = routing.weights_NK.detach() * keep_NK
        weights_NE = chosen_weights_NK.new_zeros(n_rows, n_experts)
        weights_NE.scatter_add_(1, routing.experts_NK, chosen_weights_NK)
        counts_NE = torch.zeros(n_rows, n_experts, dtype=torch.long,
                                device=routing.experts_NK.device)
        kept_NE = counts_NE.scatter_add(1, routing.experts_NK, keep_NK.long()) > 0
        dropped_NE = counts_NE.scatter_add(1, routing.experts_NK, dropped_NK.long()) > 0
        if assignments:
            chosen = {name: t.detach().cpu() for name, t in (
                ("experts", routing.experts_NK), ("weights", routing.weights_NK),
                ("kept", keep_NK), ("dropped", dropped_NK))}
    best_N = weights_NE.argmax(1)
    primary_N = torch.where(weights_NE.amax(1) > 0, best_N, torch.full_like(best_N, -1))
    labels_N = posterior_NE = contribution_NE = None
    if y is not None:
        labels_N = row_labels(y, edges)
        posterior_NE = _posterior(out, y, likelihood, variance)
    if contributions and out.expert_outputs is not None:
        contribution_NE = (weights_NE.unsqueeze(-1) * out.expert_outputs.detach()).norm(dim=-1)
    elif contributions:
        contribution_NE = _routed_contributions(model, x, out)
    batch = BatchRouting(probs_NE.double(), weights_NE.double(), kept_NE, dropped_NE, primary_N,
                         bool(routing.dense), labels_N, posterior_NE, contribution_NE)
    return _on_cpu(batch), chosen  # to the CPU once per batch, here


def batch_routing(model: nn.Module, x: Tensor, out: MoEOutput, y: Tensor | None = None, *,
                  edges: np.ndarray | None = None, likelihood: str = "gaussian",
                  variance: float = 1.0, contributions: bool = True) -> BatchRouting:
    """Reduce a layer's :class:`MoEOutput` on one batch to a :class:`BatchRouting` (on the CPU,
    whatever the model's device).

    ``contributions=False`` leaves out ``contribution_NE`` (None), each expert's share of the
    output, which for a routed layer costs running every chosen expert again.
    """
    return _reduce(model, x, out, y, edges=edges, likelihood=likelihood, variance=variance,
                   contributions=contributions)[0]


def _store_arrays(batch: BatchRouting, assignments: dict[str, Tensor] | None
                  ) -> dict[str, np.ndarray]:
    """One batch's rows for the store; ``assignments`` from :func:`_reduce` (None when dense)."""
    arrays = {"probs": batch.probs_NE.float().numpy(),
              "primary": batch.primary_N.to(torch.int32).numpy()}
    if assignments is not None:
        arrays.update(experts=assignments["experts"].to(torch.int32).numpy(),
                      weights=assignments["weights"].float().numpy(),
                      kept=assignments["kept"].numpy(), dropped=assignments["dropped"].numpy())
    if batch.labels_N is not None:
        arrays["labels"] = batch.labels_N.to(torch.int32).numpy()
    if batch.posterior_NE is not None:
        arrays["posterior"] = batch.posterior_NE.float().numpy()
    return arrays


# --- the recorder ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recording:
    """What :func:`record_routing` collected: the statistics, and the per-row store if asked."""

    stats: RoutingStats
    store: RoutingStore | None
    target_edges: tuple[float, ...] | None


def target_bin_edges(y: Tensor, n_bins: int = 5) -> tuple[float, ...]:
    """Quantile edges that cut a regression target (its first column) into ``n_bins`` bins."""
    check_int("target_bin_edges", "n_bins", n_bins, minimum=1)
    value_N = y.reshape(y.shape[0], -1)[:, 0].double().cpu().numpy()
    edges = np.unique(np.quantile(value_N, np.linspace(0, 1, n_bins + 1)))
    return tuple(float(e) for e in edges) if edges.size > 1 else (float(edges[0]),) * 2


def bin_names(edges: tuple[float, ...], name: str = "y", *,
              unscale: tuple[float, float] = (0.0, 1.0)) -> list[str]:
    """Names of the bins between ``edges``, as ``name in [a, b)``; ``unscale`` = (mean, scale)
    writes them in the original units of a standardised target (value * scale + mean)."""
    mean, scale = unscale
    return [f"{name} in [{a * scale + mean:.3g}, {b * scale + mean:.3g}"
            f"{']' if i == len(edges) - 2 else ')'}"
            for i, (a, b) in enumerate(itertools.pairwise(edges))]


@torch.no_grad()
def record_routing(model: nn.Module, data: Tensor | Iterable, y: Tensor | None = None, *,
                   batch_size: int = 4096, store: Path | str | None = None,
                   class_names: list[str] | tuple[str, ...] | None = None,
                   target_edges: tuple[float, ...] | None = None, n_target_bins: int = 5,
                   target_name: str = "y", target_unscale: tuple[float, float] = (0.0, 1.0),
                   likelihood: str = "gaussian", variance: float = 1.0,
                   contributions: bool = True, progress: bool = False) -> Recording:
    """Run ``model`` over ``data`` in evaluation mode and record its routing of every row.

    Args:
        model: a module whose forward returns a :class:`~moekit.nn.outputs.MoEOutput`.
        data: inputs (N, D) (a SparseMoE also takes (..., D)), or an iterable / DataLoader of
            batches ``x`` or ``(x, y)``.
        y: targets for a tensor ``data``: class indices (N,) or floats (N,) / (N, O).
        batch_size: rows per forward pass for a tensor ``data``.
        store: a folder to stream per-row routing into (see :class:`RoutingStore`); None keeps
            only the running sums.
        class_names: names of the classes, for the expert-by-class table.
        target_edges, n_target_bins, target_name: for float targets, the bins of the
            expert-by-target table (default: quantiles of the first batch).
        target_unscale: (mean, scale) to name the bins in the original units of a standardised
            target.
        likelihood, variance: the posterior h for KL(h || p): 'gaussian' (Eq. 3's, one-hot targets
            for classes) or 'categorical' (p_e P_e(y) from the experts' class logits).
        contributions: measure each expert's share of the output (``contribution_share_E``);
            False skips it (for a routed layer it runs every chosen expert a second time).
        progress: show a progress bar.

    Returns:
        a :class:`Recording` (``.stats``: :class:`~moekit.analysis.stats.RoutingStats`).

    Example:
        >>> from moekit import MixtureOfExperts
        >>> moe = MixtureOfExperts(2, 3, 4)
        >>> rec = record_routing(moe, torch.randn(100, 2), torch.randint(0, 3, (100,)))
        >>> rec.stats.n_rows, rec.stats.load_E.shape
        (100, (4,))
    """
    check_int("record_routing", "batch_size", batch_size, minimum=1)
    check_choice("record_routing", "likelihood", likelihood, LIKELIHOODS)
    check_positive_float("record_routing", "variance", variance)
    was_training = model.training
    model.eval()
    writer = StoreWriter(Path(store)) if store is not None else None
    stats: RoutingStats | None = None
    edges = None if target_edges is None else np.asarray(target_edges, dtype=np.float64)
    ok = False
    try:
        for x_batch, y_batch in tqdm(iter_batches(data, y, batch_size=batch_size),
                                     desc="routing", unit="batch", disable=not progress,
                                     leave=False):
            out = MoEOutput.check(model(x_batch), "record_routing")
            if y_batch is not None and y_batch.is_floating_point() and edges is None:
                edges = np.asarray(target_bin_edges(y_batch, n_target_bins))
                logger.info("record_routing: target bins from the first batch: %s", edges)
            batch, assignments = _reduce(model, x_batch, out, y_batch, edges=edges,
                                         likelihood=likelihood, variance=variance,
                                         contributions=contributions,
                                         assignments=writer is not None)
            if stats is None:
                stats = _new_stats(out.routing.n_experts, y_batch, class_names, edges,
                                   target_name, target_unscale)
            stats.update(batch)
            if writer is not None:
                writer.write(_store_arrays(batch, assignments))
        ok = True
    finally:
        model.train(was_training)
        opened = writer.close(ok) if writer is not None else None
    if stats is None:
        raise ValueError("record_routing: the data had no batches; pass at least one row.")
    return Recording(stats, opened, None if edges is None else tuple(float(e) for e in edges))


def _new_stats(n_experts: int, y: Tensor | None, class_names, edges, target_name: str,
               unscale: tuple[float, float]) -> RoutingStats:
    if y is None:
        return RoutingStats(n_experts)
    if y.is_floating_point():
        return RoutingStats(n_experts, bin_names(tuple(edges), target_name, unscale=unscale),
                            "target bin")
    return RoutingStats(n_experts, [str(c) for c in class_names or []], "class")
