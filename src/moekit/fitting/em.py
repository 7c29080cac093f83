"""EM for mixtures of linear experts: flat (Jacobs et al. 1991), hierarchical (Jordan & Jacobs
1994), and with the localized Gaussian gate (Xu, Jordan & Hinton 1995).

Shape legend: N rows, E experts.

Each iteration is an E-step (the posterior responsibilities) and an M-step that does not lower the
expected complete-data log-likelihood (:mod:`moekit.fitting.em_steps` says how each part is
fitted), so the log-likelihood never falls (generalised EM). An iteration whose log-likelihood
falls is not kept: within rounding (1e-9 of the mean log-likelihood) that is convergence; beyond it,
a :class:`~moekit.exceptions.DivergenceWarning`. Stopping at ``max_iter`` before converging gives a
:class:`~moekit.exceptions.ConvergenceWarning`.

EM runs on the inputs standardised per feature (:mod:`moekit.fitting.em_scaling`), so neither a
feature's units nor its offset changes the fit (on raw inputs, one feature x 1e6 sized the ridge of
every Newton and least-squares step for that feature alone, and EM stopped far from the optimum).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moekit.exceptions import ConvergenceWarning, DivergenceWarning
from moekit.fitting.em_config import EMConfig, EMResult
from moekit.fitting.em_steps import EMProblem, m_step
from moekit.fitting.history import History

logger = logging.getLogger(__name__)


def _stop_key(config: EMConfig) -> str:
    """The history key of ``config.stop_metric``: the log-likelihood is recorded unprefixed."""
    return "log_likelihood" if config.stop_metric == "train_log_likelihood" else config.stop_metric


def _reached(config: EMConfig, value: float) -> bool:
    higher = config.stop_metric.endswith(("accuracy", "log_likelihood"))  # higher is better
    return value >= config.stop_threshold if higher else value <= config.stop_threshold


@torch.no_grad()
def fit_em(model: nn.Module, x: Tensor, y: Tensor, config: EMConfig | None = None) -> EMResult:
    """Fit a mixture of linear experts by EM; the model's weights are replaced by the fit.

    Any model whose ``gate`` is a SoftmaxGate, TreeGate or GaussianGate and whose ``experts`` are
    LinearExperts: MixtureOfExperts, HierarchicalMixtureOfExperts, LocalizedMixtureOfExperts.
    Identity-head experts are Gaussian (y floats (N, O), or (N,) if O = 1), softmax-head ones
    multinomial logit (y class indices (N,)). The current weights are the start (see
    ``EMConfig.init``); EM runs in float64 whatever the model's dtype. Returns an :class:`EMResult`.

    Invariant to each feature's scale and shift: EM fits on x' = (x - mean) / std, per feature
    (no shift, and the root mean square for std, when a softmax gate has no bias to absorb a
    shift), and carries the weights back (W = W' / std, b = b' - W' mean / std; a Gaussian gate's
    means and covariances likewise), so the returned model computes on x the function fitted on x'
    (up to rounding). Standardising, rather than rescaling each step, keeps every M-step exact (the
    log-likelihood still never falls) and gives the relative ridge, the singularity test and the
    covariance floor one meaning in any units. Weights EM leaves untouched are written back bit for
    bit. The recorded log-likelihood is on the caller's x (for the Gaussian gate, a density over x,
    it is sum_d log std_d lower than on x'); the stopping test compares its rise with its magnitude
    on x', which no choice of units moves.

    Example:
        >>> from moekit import MixtureOfExperts; from moekit.data import piecewise_linear
        >>> x, y = piecewise_linear(200, generator=torch.Generator().manual_seed(0))
        >>> moe = MixtureOfExperts(1, 1, 2, generator=torch.Generator().manual_seed(1))
        >>> result = fit_em(moe, x, y, EMConfig(progress=False))
        >>> result.converged, result.variance_E.shape
        (True, torch.Size([2]))
    """
    config = config or EMConfig()
    problem = EMProblem(model, x, y, config)
    if config.stop_metric == "train_accuracy" and problem.classes_N is None:
        raise ValueError("fit_em: stop_metric='train_accuracy' needs class-index targets; got y of "
                         f"dtype={y.dtype} (a regression). Pass integer class indices in y, or use "
                         "stop_metric='train_mse' (or 'train_sse', 'train_nll', "
                         "'train_log_likelihood').")
    params = problem.read()
    if problem.gate_kind == "gaussian" and config.init == "data":
        params.gauss = problem.gaussians_on_data(config.seed)

    history, warned, passes = History(), set(), 1  # passes: the first E-step
    # Per M-step, the sweeps that form Newton systems or normal equations (experts, then gates):
    systems = sum(config.irls_steps if irls else 1 for irls in (problem.classify,
                                                                problem.gate_kind == "tree"))
    ev = problem.evaluate(params)

    def raw(ll: float) -> float:  # the log-likelihood on the caller's inputs
        return ll - problem.log_jacobian

    def record(iteration: int) -> dict[str, float]:
        rec = {"iteration": iteration, "log_likelihood": raw(ev.log_lik_N.mean().item()),
               "conditional_log_likelihood": ev.cond_lik_N.mean().item(),
               "passes": passes, "sweeps": passes + iteration * systems,
               **problem.metrics(ev)}
        history.append(rec)
        return rec

    old_ll = ev.log_lik_N.mean().item()  # on the standardised inputs, as EM sees them
    record(0)
    stop_reason, n_iter = "max_iter", 0
    bar = tqdm(total=config.max_iter, desc="em", unit="iter", disable=not config.progress,
               leave=False)
    for iteration in range(1, config.max_iter + 1):
        new, p = m_step(problem, params, ev, warned)
        new_ev = problem.evaluate(new)
        new_ll = new_ev.log_lik_N.mean().item()
        passes += p + 1
        if not new_ll >= old_ll:  # keep the previous parameters
            stop_reason = ("converged" if new_ll >= old_ll - 1e-9 * (1.0 + abs(old_ll))
                           else "likelihood_decreased")
            if stop_reason != "converged":
                warnings.warn(f"fit_em: the log-likelihood fell from {raw(old_ll):.12g} to "
                              f"{raw(new_ll):.12g} at iteration {iteration}; EM stopped with the "
                              "previous parameters. Please report this with the data.",
                              DivergenceWarning, stacklevel=2)
            break
        params, ev, n_iter = new, new_ev, iteration
        rec = record(iteration)
        bar.update(1)
        if config.stop_metric is not None and _reached(config, rec[_stop_key(config)]):
            stop_reason = "threshold"
            break
        if (new_ll - old_ll) / max(abs(old_ll), 1e-12) < config.tol:
            stop_reason = "converged"
            break
        old_ll = new_ll
    bar.close()
    if stop_reason == "max_iter":
        warnings.warn(f"fit_em: EM did not converge in max_iter={config.max_iter} iterations (the "
                      f"log-likelihood still rose by more than tol={config.tol:g} of itself); "
                      "raise max_iter, or fit from a better start.", ConvergenceWarning,
                      stacklevel=2)
    problem.write(params)
    logger.info("fit_em stopped after %d iterations (%s), %d passes", n_iter, stop_reason, passes)
    return EMResult(history, n_iter, stop_reason == "converged", stop_reason,
                    params.variance_E, passes, passes + iteration * systems, config)
