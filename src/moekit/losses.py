"""Error functions of mixtures of experts, as pure functions of tensors.

Shape legend: N rows, E experts, O outputs, C classes.

Jacobs, Jordan, Nowlan & Hinton (1991), "Adaptive Mixtures of Local Experts", Neural Computation 3:
for case c with target d, expert outputs o_i and mixing proportions p_i = softmax(x)_i,

    Eq. 1 (cooperative)   E = ||d - sum_i p_i o_i||^2
    Eq. 2 (competitive)   E = sum_i p_i ||d - o_i||^2
    Eq. 3 (mixture NLL)   E = -log sum_i p_i exp(-||d - o_i||^2 / 2)

Every function takes the gate's logits x (so log p is computed stably by ``log_softmax``; log mixing
proportions that already sum to one, as from a tree of gates, pass through unchanged) and reduces
over rows with ``reduction`` = 'mean' (default), 'sum' or 'none'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moekit._checks import check_choice, check_positive_float

if TYPE_CHECKING:
    from moekit.layers import MoEOutput

REDUCTIONS = ("mean", "sum", "none")
# Canonical names, with the paper's equation numbers as aliases.
LOSS_NAMES = {
    "cooperative": "cooperative", "eq1": "cooperative",
    "competitive": "competitive", "eq2": "competitive",
    "mixture_nll": "mixture_nll", "eq3": "mixture_nll",
    "categorical_nll": "categorical_nll",
}


def _reduce(loss_N: Tensor, reduction: str) -> Tensor:
    check_choice("loss", "reduction", reduction, REDUCTIONS)
    if reduction == "mean":
        return loss_N.mean()
    if reduction == "sum":
        return loss_N.sum()
    return loss_N


def _check_shapes(fn: str, gate_logits_NE: Tensor, expert_outputs_NEO: Tensor,
                  target: Tensor, *, target_is_index: bool = False) -> None:
    if gate_logits_NE.ndim != 2:
        raise ValueError(f"{fn}: gate_logits must be (N, E); got shape {tuple(gate_logits_NE.shape)}.")
    if expert_outputs_NEO.ndim != 3 or expert_outputs_NEO.shape[:2] != gate_logits_NE.shape:
        raise ValueError(
            f"{fn}: expert outputs must be (N, E, O) = ({gate_logits_NE.shape[0]}, "
            f"{gate_logits_NE.shape[1]}, O) to match gate_logits; got {tuple(expert_outputs_NEO.shape)}."
        )
    n, _, o = expert_outputs_NEO.shape
    want = (n,) if target_is_index else (n, o)
    if tuple(target.shape) != want:
        raise ValueError(f"{fn}: target must have shape {want}; got {tuple(target.shape)}.")


def squared_errors(expert_outputs_NEO: Tensor, target_NO: Tensor) -> Tensor:
    """||d - o_i||^2 for every row and expert, shape (N, E)."""
    return (target_NO.unsqueeze(1) - expert_outputs_NEO).square().sum(-1)


def cooperative_loss(gate_logits_NE: Tensor, expert_outputs_NEO: Tensor, target_NO: Tensor, *,
                     reduction: str = "mean") -> Tensor:
    """Eq. 1 of Jacobs et al. (1991): E = ||d - sum_i p_i o_i||^2.

    The experts cooperate to produce the blend, so many experts end up used on each case.
    """
    _check_shapes("cooperative_loss", gate_logits_NE, expert_outputs_NEO, target_NO)
    p_NE = torch.softmax(gate_logits_NE, dim=-1)
    blend_NO = torch.einsum("ne,neo->no", p_NE, expert_outputs_NEO)
    return _reduce((target_NO - blend_NO).square().sum(-1), reduction)


def competitive_loss(gate_logits_NE: Tensor, expert_outputs_NEO: Tensor, target_NO: Tensor, *,
                     reduction: str = "mean") -> Tensor:
    """Eq. 2 of Jacobs et al. (1991): E = sum_i p_i ||d - o_i||^2.

    Each expert must produce the whole output; dE/do_i = -2 p_i (d - o_i).
    """
    _check_shapes("competitive_loss", gate_logits_NE, expert_outputs_NEO, target_NO)
    p_NE = torch.softmax(gate_logits_NE, dim=-1)
    return _reduce((p_NE * squared_errors(expert_outputs_NEO, target_NO)).sum(-1), reduction)


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
    log_joint_NE = _gaussian_log_joint(gate_logits_NE, expert_outputs_NEO, target_NO, variance)
    return _reduce(-torch.logsumexp(log_joint_NE, dim=-1), reduction)


def _gaussian_log_joint(gate_logits_NE: Tensor, expert_outputs_NEO: Tensor, target_NO: Tensor,
                        variance: float) -> Tensor:
    log_p_NE = torch.log_softmax(gate_logits_NE, dim=-1)
    return log_p_NE - squared_errors(expert_outputs_NEO, target_NO) / (2.0 * variance)


def responsibilities(gate_logits_NE: Tensor, expert_outputs_NEO: Tensor, target_NO: Tensor, *,
                     variance: float = 1.0) -> Tensor:
    """Posterior responsibilities h_i = p_i exp(-||d-o_i||^2/2v) / sum_j p_j exp(-||d-o_j||^2/2v)."""
    _check_shapes("responsibilities", gate_logits_NE, expert_outputs_NEO, target_NO)
    log_joint_NE = _gaussian_log_joint(gate_logits_NE, expert_outputs_NEO, target_NO, variance)
    return torch.softmax(log_joint_NE, dim=-1)


def categorical_mixture_nll(gate_logits_NE: Tensor, expert_logits_NEC: Tensor, target_N: Tensor, *,
                            reduction: str = "mean") -> Tensor:
    """E = -log sum_i p_i P_i(y | x), the classification analogue of Eq. 3 (Jordan & Jacobs 1994).

    ``expert_logits_NEC`` are each expert's class logits (P_i = softmax over C); ``target_N`` holds
    class indices. Computed in log space throughout.
    """
    _check_shapes("categorical_mixture_nll", gate_logits_NE, expert_logits_NEC, target_N,
                  target_is_index=True)
    log_p_NE = torch.log_softmax(gate_logits_NE, dim=-1)
    log_expert_NEC = torch.log_softmax(expert_logits_NEC, dim=-1)
    index_NE1 = target_N.long().view(-1, 1, 1).expand(-1, expert_logits_NEC.shape[1], 1)
    log_likelihood_NE = log_expert_NEC.gather(-1, index_NE1).squeeze(-1)
    return _reduce(-torch.logsumexp(log_p_NE + log_likelihood_NE, dim=-1), reduction)


# --- auxiliary losses of sparse routers -------------------------------------------------------------

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
    """ST-MoE (Zoph et al. 2022, Eq. 5): mean over rows of logsumexp(logits)^2; keeps logits small."""
    return torch.logsumexp(logits_NE, dim=-1).square().mean()


def resolve_loss_name(name: str) -> str:
    """Map a loss name or alias ('eq1', 'eq2', 'eq3') to its canonical name."""
    if name not in LOSS_NAMES:
        listed = ", ".join(repr(n) for n in LOSS_NAMES)
        raise ValueError(f"loss must be one of {listed}; got loss={name!r}.")
    return LOSS_NAMES[name]


def mixture_loss(name: str, out: MoEOutput, target: Tensor, *, variance: float = 1.0,
                 reduction: str = "mean") -> Tensor:
    """Evaluate the named error function on a layer's :class:`~moekit.layers.MoEOutput`.

    ``target`` is (N, O) for the squared-error losses and (N,) class indices for 'categorical_nll',
    which needs expert logits (a softmax head).
    """
    name = resolve_loss_name(name)
    if out.expert_outputs is None or out.expert_logits is None:
        raise ValueError(f"mixture_loss: loss={name!r} needs every expert's output; this layer "
                         "computes only the chosen experts.")
    logits_NE = out.routing.logits_NE
    if name == "cooperative":
        return cooperative_loss(logits_NE, out.expert_outputs, target, reduction=reduction)
    if name == "competitive":
        return competitive_loss(logits_NE, out.expert_outputs, target, reduction=reduction)
    if name == "mixture_nll":
        return mixture_nll(logits_NE, out.expert_outputs, target, variance=variance,
                           reduction=reduction)
    return categorical_mixture_nll(logits_NE, out.expert_logits, target, reduction=reduction)
