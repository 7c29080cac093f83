"""Error functions of mixtures of experts, as pure functions of tensors.

Shape legend: N rows, E experts, O outputs, C classes.

Jacobs, Jordan, Nowlan & Hinton (1991), "Adaptive Mixtures of Local Experts", Neural Computation 3:
for case c with target d, expert outputs o_i and mixing proportions p_i = softmax(x)_i,

    Eq. 1 (cooperative)   E = ||d - sum_i p_i o_i||^2
    Eq. 2 (competitive)   E = sum_i p_i ||d - o_i||^2
    Eq. 3 (mixture NLL)   E = -log sum_i p_i exp(-||d - o_i||^2 / 2)

Every public loss takes the gate's logits x (so log p is computed stably by ``log_softmax``; log
mixing proportions that already sum to one, as from a tree of gates, pass through unchanged) and
reduces over rows with ``reduction`` = 'mean' (default), 'sum' or 'none'.

The formulas are written once, as the per-row pieces below (:func:`squared_errors`,
:func:`gaussian_log_likelihood`, :func:`categorical_log_likelihood`, :func:`log_mixture`,
:func:`posterior`, :func:`competitive_rows`), each taking the axis of the experts (``dim``), so that
every layout composes the same arithmetic: these (N, E, O) functions, the rows-last replicate
engine ((R, E, O, N), :mod:`moekit.fitting.replicate_engines`) and EM's E-step
(:mod:`moekit.fitting.em_steps`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit._checks import check_choice, check_positive_float

REDUCTIONS = ("mean", "sum", "none")
LOG_2PI = math.log(2.0 * math.pi)


def reduce_rows(loss_N: Tensor, reduction: str) -> Tensor:
    """Reduce per-row losses: 'mean', 'sum' or 'none' (unchanged)."""
    check_choice("loss", "reduction", reduction, REDUCTIONS)
    if reduction == "mean":
        return loss_N.mean()
    if reduction == "sum":
        return loss_N.sum()
    return loss_N


def _check_shapes(fn: str, gate_logits_NE: Tensor, expert_outputs_NEO: Tensor,
                  target: Tensor, *, target_is_index: bool = False) -> None:
    if gate_logits_NE.ndim != 2:
        raise ValueError(f"{fn}: gate_logits must be (N, E); got shape "
                         f"{tuple(gate_logits_NE.shape)}.")
    if expert_outputs_NEO.ndim != 3 or expert_outputs_NEO.shape[:2] != gate_logits_NE.shape:
        raise ValueError(
            f"{fn}: expert outputs must be (N, E, O) = ({gate_logits_NE.shape[0]}, "
            f"{gate_logits_NE.shape[1]}, O) to match gate_logits; "
            f"got {tuple(expert_outputs_NEO.shape)}."
        )
    n, _, o = expert_outputs_NEO.shape
    want = (n,) if target_is_index else (n, o)
    if tuple(target.shape) != want:
        raise ValueError(f"{fn}: target must have shape {want}; got {tuple(target.shape)}.")


# --- the per-row pieces, any layout (experts on axis ``dim``) ------------------------------------

def squared_errors(outputs: Tensor, target: Tensor, *, dim: int = -1) -> Tensor:
    """||d - o||^2 summed over the output axis ``dim``; ``target`` broadcasts against ``outputs``.

    Example:
        >>> squared_errors(torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), torch.tensor([[[1.0, 2.0]]]))
        tensor([[4., 5.]])
    """
    diff = target - outputs
    return (diff * diff).sum(dim)  # not .square(): its backward costs 1.6x a product's on CPU


def gaussian_log_likelihood(sq_errors: Tensor, variance: float | Tensor = 1.0, *,
                            n_outputs: int | None = None) -> Tensor:
    """log N(d | o, v I) from ||d - o||^2: -||d - o||^2 / (2 v), plus the normalising constant
    -(O / 2) log(2 pi v) when ``n_outputs`` = O is given (EM's learned per-expert variances need
    it; with one shared variance it cancels in every posterior and is left out)."""
    log_lik = -sq_errors / (2.0 * variance)
    if n_outputs is None:
        return log_lik
    log_variance = torch.log(torch.as_tensor(variance, dtype=sq_errors.dtype,
                                             device=sq_errors.device))
    return log_lik - 0.5 * n_outputs * (LOG_2PI + log_variance)


def categorical_log_likelihood(expert_logits: Tensor, index: Tensor, *, dim: int = -1) -> Tensor:
    """log P_i(y | x) = log softmax(z_i)[y] of each expert's class logits, classes on axis ``dim``;
    ``index`` holds the class of each row, shaped like ``expert_logits`` with size 1 on ``dim``."""
    return torch.log_softmax(expert_logits, dim=dim).gather(dim, index).squeeze(dim)


def log_mixture(log_prior: Tensor, log_likelihood: Tensor, *, dim: int = -1) -> Tensor:
    """log sum_i p_i P_i: the mixture's log-likelihood of each row (experts on ``dim``)."""
    return torch.logsumexp(log_prior + log_likelihood, dim=dim)


def posterior(log_prior: Tensor, log_likelihood: Tensor, *, dim: int = -1) -> Tensor:
    """h_i = p_i P_i / sum_j p_j P_j: the posterior responsibility of each expert for each row."""
    return torch.softmax(log_prior + log_likelihood, dim=dim)


def competitive_rows(probs: Tensor, sq_errors: Tensor, *, dim: int = -1) -> Tensor:
    """Eq. 2 per row: sum_i p_i ||d - o_i||^2 (experts on ``dim``)."""
    return (probs * sq_errors).sum(dim)


# --- the paper's error functions on (N, E, O) ------------------------------------------------

def cooperative_loss(gate_logits_NE: Tensor, expert_outputs_NEO: Tensor, target_NO: Tensor, *,
                     reduction: str = "mean") -> Tensor:
    """Eq. 1 of Jacobs et al. (1991): E = ||d - sum_i p_i o_i||^2.

    The experts cooperate to produce the blend, so many experts end up used on each case.
    """
    _check_shapes("cooperative_loss", gate_logits_NE, expert_outputs_NEO, target_NO)
    p_NE = torch.softmax(gate_logits_NE, dim=-1)
    blend_NO = torch.einsum("ne,neo->no", p_NE, expert_outputs_NEO)
    return reduce_rows(squared_errors(blend_NO, target_NO), reduction)


def competitive_loss(gate_logits_NE: Tensor, expert_outputs_NEO: Tensor, target_NO: Tensor, *,
                     reduction: str = "mean") -> Tensor:
    """Eq. 2 of Jacobs et al. (1991): E = sum_i p_i ||d - o_i||^2.

    Each expert must produce the whole output; dE/do_i = -2 p_i (d - o_i).
    """
    _check_shapes("competitive_loss", gate_logits_NE, expert_outputs_NEO, target_NO)
    p_NE = torch.softmax(gate_logits_NE, dim=-1)
    sq_NE = squared_errors(expert_outputs_NEO, target_NO.unsqueeze(1))
    return reduce_rows(competitive_rows(p_NE, sq_NE), reduction)


def mixture_nll(gate_logits_NE: Tensor, expert_outputs_NEO: Tensor, target_NO: Tensor, *,
                variance: float = 1.0, reduction: str = "mean") -> Tensor:
    """Eq. 3 of Jacobs et al. (1991): E = -log sum_i p_i exp(-||d - o_i||^2 / (2 variance)).

    The negative log-likelihood of d under a mixture of Gaussians with the given variance (1 in the
    paper), without the constant (O/2) log(2 pi variance). Computed with logsumexp, so errors of any
    size give a finite value and gradient. dE/do_i = -h_i (d - o_i) / variance and
    dE/dx_j = p_j - h_j, with h the posterior responsibilities (:func:`responsibilities`).
    """
    _check_shapes("mixture_nll", gate_logits_NE, expert_outputs_NEO, target_NO)
    variance = check_positive_float("mixture_nll", "variance", variance)
    log_lik_NE = _gaussian_expert_log_likelihood(expert_outputs_NEO, target_NO, variance)
    return reduce_rows(-log_mixture(torch.log_softmax(gate_logits_NE, dim=-1), log_lik_NE),
                       reduction)


def _gaussian_expert_log_likelihood(expert_outputs_NEO: Tensor, target_NO: Tensor,
                                    variance: float) -> Tensor:
    return gaussian_log_likelihood(squared_errors(expert_outputs_NEO, target_NO.unsqueeze(1)),
                                   variance)


def responsibilities(gate_logits_NE: Tensor, expert_outputs_NEO: Tensor, target_NO: Tensor, *,
                     variance: float = 1.0) -> Tensor:
    """Posterior responsibilities
    h_i = p_i exp(-||d-o_i||^2/2v) / sum_j p_j exp(-||d-o_j||^2/2v)."""
    _check_shapes("responsibilities", gate_logits_NE, expert_outputs_NEO, target_NO)
    log_lik_NE = _gaussian_expert_log_likelihood(expert_outputs_NEO, target_NO, variance)
    return posterior(torch.log_softmax(gate_logits_NE, dim=-1), log_lik_NE)


def _categorical_expert_log_likelihood(expert_logits_NEC: Tensor, target_N: Tensor) -> Tensor:
    index_NE1 = target_N.long().view(-1, 1, 1).expand(-1, expert_logits_NEC.shape[1], 1)
    return categorical_log_likelihood(expert_logits_NEC, index_NE1)


def categorical_mixture_nll(gate_logits_NE: Tensor, expert_logits_NEC: Tensor, target_N: Tensor, *,
                            reduction: str = "mean") -> Tensor:
    """E = -log sum_i p_i P_i(y | x), the classification analogue of Eq. 3 (Jordan & Jacobs 1994).

    ``expert_logits_NEC`` are each expert's class logits (P_i = softmax over C); ``target_N`` holds
    class indices. Computed in log space throughout.
    """
    _check_shapes("categorical_mixture_nll", gate_logits_NE, expert_logits_NEC, target_N,
                  target_is_index=True)
    log_lik_NE = _categorical_expert_log_likelihood(expert_logits_NEC, target_N)
    return reduce_rows(-log_mixture(torch.log_softmax(gate_logits_NE, dim=-1), log_lik_NE),
                       reduction)


def categorical_responsibilities(gate_logits_NE: Tensor, expert_logits_NEC: Tensor,
                                 target_N: Tensor) -> Tensor:
    """h_i = p_i P_i(y | x) / sum_j p_j P_j(y | x) for experts with class logits, (N, E)."""
    _check_shapes("categorical_responsibilities", gate_logits_NE, expert_logits_NEC, target_N,
                  target_is_index=True)
    log_lik_NE = _categorical_expert_log_likelihood(expert_logits_NEC, target_N)
    return posterior(torch.log_softmax(gate_logits_NE, dim=-1), log_lik_NE)


# --- auxiliary losses of sparse routers ----------------------------------------------------------

def load_balancing_loss(probs_NE: Tensor, experts_NK: Tensor, mask_NK: Tensor | None = None
                        ) -> Tensor:
    """Switch Transformer (Fedus et al. 2021, Eq. 4-6) / GShard: E * sum_i f_i P_i.

    f_i is the fraction of routed assignments that go to expert i (not differentiable), P_i the mean
    router probability of expert i. It equals 1 when routing is uniform and grows with imbalance.
    """
    n_experts = probs_NE.shape[-1]
    chosen = experts_NK.flatten() if mask_NK is None else experts_NK[mask_NK]
    counts_E = torch.bincount(chosen, minlength=n_experts).to(probs_NE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    return n_experts * (f_E * probs_NE.mean(0)).sum()


def cv_squared(values_E: Tensor) -> Tensor:
    """The squared coefficient of variation, var / mean^2 (0 for one expert or all zeros)."""
    if values_E.numel() < 2:
        return values_E.new_zeros(())
    return values_E.var(unbiased=False) / (values_E.mean().square() + 1e-10)


def importance_load_loss(probs_NE: Tensor, load_E: Tensor) -> Tensor:
    """Shazeer et al. (2017), Eq. 6-11: CV^2(importance) + CV^2(load), importance_i = sum_n p_ni.

    ``load_E`` is the router's smooth load estimate (noisy top-k), or the row counts.
    """
    return cv_squared(probs_NE.sum(0)) + cv_squared(load_E)


def router_z_loss(logits_NE: Tensor) -> Tensor:
    """ST-MoE (Zoph et al. 2022, Eq. 5): mean over rows of logsumexp(logits)^2; keeps logits
    small."""
    return torch.logsumexp(logits_NE, dim=-1).square().mean()
