"""The steps of EM for mixtures of linear experts (:func:`moekit.fitting.em.fit_em` runs them):
flat (Jacobs et al. 1991), hierarchical (Jordan & Jacobs 1994), and with the localized Gaussian
gate (Xu, Jordan & Hinton 1995).

Shape legend: N rows, D input features, P = D + 1 (inputs and a constant 1), Q the gate's input
columns (P, or D without bias), O outputs, C classes (C = O), E experts (leaves), G gate nodes,
B children per gate node (B = E for a flat softmax gate).

p(y | x) = sum_e pi_e(x) P_e(y | x), pi the gate's (path) probabilities; Gaussian experts (identity
head) P_e = N(y | W_e^T [x; 1], sigma_e^2 I), or multinomial-logit experts (softmax head).
E-step: h_ne = pi_e P_e(y_n | x_n) / sum_j pi_j P_j(y_n | x_n), each leaf's joint posterior; a gate
node's targets are its children's posterior mass (:func:`moekit.nn.tree_gate.node_posteriors`).
M-step, each part maximising its term of the expected complete-data log-likelihood Q: Gaussian
experts by weighted least squares, then sigma_e^2 = sum_n h_ne ||y_n - o_e||^2 / (O sum_n h_ne);
logit experts and every softmax gate by IRLS (Newton steps, each halved until its term of Q does not
fall, else not taken); the Gaussian gate analytically (:func:`gaussian_gate_m_step`).
No M-step lowers Q, so the log-likelihood never falls (generalised EM): the conditional
sum_n log p(y_n | x_n) with softmax gates; with the Gaussian gate, the joint log p(x_n, y_n) its EM
maximises (the conditional one is recorded too). An iteration whose log-likelihood falls is not
kept: within rounding (1e-9 of the mean log-likelihood) that is convergence; beyond it, a warning.

Every step runs on the inputs standardised per feature (:mod:`moekit.fitting.em_scaling`), the
weights carried there by :meth:`EMProblem.read` and back by :meth:`EMProblem.write`: the ridge, the
singularity test and the covariance floor are relative to means over features, which would mean
nothing if the features' units differed by orders of magnitude.

``passes`` counts sweeps over the training rows that evaluate the model: one per E-step, one per
Newton trial (experts and gates apart); forming normal equations, a Newton system or the Gaussian
gate's statistics rides on the evaluation before it, as a backward pass does on its forward in a
gradient epoch. ``sweeps`` counts those too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit._checks import check_choice, check_finite, check_matrix, check_same_rows
from moekit.fitting.em_config import EMConfig
from moekit.fitting.em_scaling import FeatureScaling, keep_unmoved
from moekit.fitting.objective import prepare_targets
from moekit.losses import (
    categorical_log_likelihood,
    gaussian_log_likelihood,
    log_mixture,
    posterior,
    squared_errors,
)
from moekit.nn.experts import LinearExperts
from moekit.nn.gates import SoftmaxGate
from moekit.nn.gaussian_gate import (
    COVARIANCES,
    GaussianGate,
    GaussianGateParams,
    gaussian_log_density,
)
from moekit.nn.tree_gate import TreeGate, node_posteriors, path_log_probs

F64 = torch.float64


@dataclass
class Params:  # gate_GQB: softmax gates (tree or flat); gauss: a Gaussian gate
    experts_EPO: Tensor
    gate_GQB: Tensor | None = None
    gauss: GaussianGateParams | None = None
    variance_E: Tensor | None = None


@dataclass
class Evaluation:  # log_lik_N is the objective (the joint one for the Gaussian gate)
    log_lik_N: Tensor
    cond_lik_N: Tensor
    h_NE: Tensor
    output_NO: Tensor
    expert_logp_NEO: Tensor  # the experts' log class probabilities (their outputs in regression)
    node_logp_NGB: Tensor | None


def gate_views(gate: nn.Module) -> tuple[Tensor, Tensor | None]:
    """A softmax gate's weights as stacked views (G, D, B), (G, B); writing them writes the gate."""
    if isinstance(gate, SoftmaxGate):
        return gate.w_DE.unsqueeze(0), None if gate.b_E is None else gate.b_E.unsqueeze(0)
    return gate.w_GDB, gate.b_GB


class EMProblem:
    """The model's structure, the data in float64 standardised per feature (``scaling``), and the
    E-step; built once per fit. ``log_jacobian`` is what standardising adds to the joint
    log-likelihood of the Gaussian gate (0 for softmax gates, whose likelihood is conditional)."""

    def __init__(self, model: nn.Module, x_ND: Tensor, y: Tensor, config: EMConfig) -> None:
        experts, gate = getattr(model, "experts", None), getattr(model, "gate", None)
        if not isinstance(experts, LinearExperts) or experts.head not in ("identity", "softmax"):
            raise ValueError("fit_em: EM needs linear experts with head 'identity' (Gaussian) or "
                             "'softmax' (multinomial logit); got experts="
                             f"{type(experts).__name__}, head={getattr(experts, 'head', None)!r}. "
                             "Use ExpertConfig(kind='linear'), or fit by gradient with moekit.fit.")
        if isinstance(gate, (SoftmaxGate, TreeGate)):  # a flat gate is the tree of depth 1
            self.gate_kind, self.gate_bias = "tree", gate_views(gate)[1] is not None
            self.depth = getattr(gate, "depth", 1)
            self.branching = getattr(gate, "branching", gate.n_experts)
        elif isinstance(gate, GaussianGate):
            self.gate_kind, self.covariance = "gaussian", gate.covariance
        else:
            raise TypeError("fit_em: EM needs a SoftmaxGate, a TreeGate (hierarchical) or a "
                            f"GaussianGate; got gate={type(gate).__name__}.")
        self.model, self.config = model, config
        self.classify = experts.head == "softmax"
        check_matrix("fit_em", "x", x_ND, n_columns=experts.in_features)
        check_finite("fit_em", "x", x_ND)
        check_same_rows("fit_em", x=x_ND, y=y)
        if x_ND.shape[0] == 0:
            raise ValueError("fit_em: x has no rows; pass at least one row.")
        if self.classify and y.is_floating_point():
            raise ValueError("fit_em: softmax-head experts need integer class indices in y; got "
                             f"dtype={y.dtype}. Pass y.long().")
        targets = prepare_targets("fit_em", "y", y, out_features=experts.out_features,
                                  loss="mixture_nll", dtype=F64)
        # A gate without a bias cannot take a shift of the inputs: scale only then.
        center = self.gate_kind == "gaussian" or self.gate_bias
        self.scaling = FeatureScaling.fit(x_ND.detach(), center=center)
        self.log_jacobian = self.scaling.log_jacobian if self.gate_kind == "gaussian" else 0.0
        self.x_ND, self.y_NO = self.scaling.transform(x_ND.detach()), targets.dense_NO
        self.classes_N = targets.classes_N
        self.x1_NP = torch.cat([self.x_ND, self.x_ND.new_ones(len(x_ND), 1)], 1)
        scales = [float(t.var(0, unbiased=False).mean()) if len(t) > 1 else 1.0
                  for t in (self.y_NO, self.x_ND)]
        self.variance_floor, self.covariance_floor = (config.variance_floor * (v if v > 0 else 1.0)
                                                      for v in scales)

    def gate_inputs(self, x1_NP: Tensor) -> Tensor:
        return x1_NP if self.gate_bias else x1_NP[:, :-1]

    def read(self) -> Params:
        """The model's weights as maps of the standardised inputs (the start of EM)."""
        experts, gate, scaling = self.model.experts, self.model.gate, self.scaling
        with torch.no_grad():
            self.raw_start = Params(torch.cat([experts.w_EDO, experts.b_EO.unsqueeze(1)], dim=1)
                                    .to(F64))
            w_EPO = scaling.weights_in(self.raw_start.experts_EPO, bias=True)
            params = Params(w_EPO)
            if isinstance(gate, GaussianGate):
                params.gauss = scaling.gaussians_in(gate.params(dtype=F64))
            else:
                w, b = gate_views(gate)
                self.raw_start.gate_GQB = (w if b is None else torch.cat([w, b.unsqueeze(1)], 1)
                                           ).to(F64)
                params.gate_GQB = scaling.weights_in(self.raw_start.gate_GQB, bias=self.gate_bias)
        self.start = Params(params.experts_EPO, params.gate_GQB)
        if self.classify:
            return params
        if self.config.fixed_variance is not None:
            params.variance_E = torch.full((len(w_EPO),), self.config.fixed_variance, dtype=F64,
                                           device=w_EPO.device)
        else:  # each expert's mean squared residual over all rows
            out_NEO = torch.einsum("np,epo->neo", self.x1_NP, w_EPO)
            sq_E = (self.y_NO.unsqueeze(1) - out_NEO).square().mean((0, 2))
            params.variance_E = sq_E.clamp_min(self.variance_floor)
        return params

    def gaussians_on_data(self, seed: int) -> GaussianGateParams:
        """``EMConfig.init='data'``: the Gaussian gate placed on the standardised rows, as
        :meth:`~moekit.nn.gaussian_gate.GaussianGate.reset_from_data` does (rows drawn with
        ``seed``)."""
        gate, generator = self.model.gate, torch.Generator().manual_seed(seed)
        placed = GaussianGate(gate.in_features, gate.n_experts, covariance=gate.covariance,
                              generator=generator).to(device=self.x_ND.device, dtype=F64)
        placed.reset_from_data(self.x_ND, torch.Generator().manual_seed(seed))
        return placed.params()

    @torch.no_grad()
    def write(self, params: Params) -> None:
        """Carry ``params`` back to maps of the raw inputs and into the model."""
        experts, gate, scaling = self.model.experts, self.model.gate, self.scaling
        w_EPO = keep_unmoved(params.experts_EPO, self.start.experts_EPO,
                             scaling.weights_out(params.experts_EPO, bias=True),
                             self.raw_start.experts_EPO)
        experts.w_EDO.copy_(w_EPO[:, :-1])
        experts.b_EO.copy_(w_EPO[:, -1])
        if isinstance(gate, GaussianGate):
            gate.set_params(scaling.gaussians_out(params.gauss))
            return
        gate_GQB = keep_unmoved(params.gate_GQB, self.start.gate_GQB,
                                scaling.weights_out(params.gate_GQB, bias=self.gate_bias),
                                self.raw_start.gate_GQB)
        w_GDB, b_GB = gate_views(gate)
        w_GDB.copy_(gate_GQB[:, : w_GDB.shape[1]])
        if b_GB is not None:
            b_GB.copy_(gate_GQB[:, -1])

    def evaluate(self, params: Params) -> Evaluation:
        """The E-step: every expert's and gate's forward, the log-likelihood and the posteriors."""
        x1_NP, y_NO = self.x1_NP, self.y_NO
        logits_NEO = torch.einsum("np,epo->neo", x1_NP, params.experts_EPO)
        node_logp = None
        if self.gate_kind == "tree":
            logits_NGB = torch.einsum("nq,gqb->ngb", self.gate_inputs(x1_NP), params.gate_GQB)
            node_logp = torch.log_softmax(logits_NGB, dim=-1)
            log_gate_NE = path_log_probs(node_logp, self.depth, self.branching)
            log_prior_NE = log_gate_NE
        else:
            g, x_ND = params.gauss, x1_NP[:, :-1]
            log_gate_NE = g.log_shares_E + gaussian_log_density(
                x_ND, g.means_ED, torch.linalg.cholesky(g.covariances_EDD))
            log_prior_NE = torch.log_softmax(log_gate_NE, dim=-1)
        if self.classify:
            expert_logp_NEO = torch.log_softmax(logits_NEO, dim=-1)
            index_NE1 = self.classes_N.view(-1, 1, 1).expand(-1, logits_NEO.shape[1], 1)
            log_expert_NE = categorical_log_likelihood(logits_NEO, index_NE1)
            outputs_NEO = expert_logp_NEO.exp()
        else:
            expert_logp_NEO, outputs_NEO = logits_NEO, logits_NEO
            log_expert_NE = gaussian_log_likelihood(squared_errors(logits_NEO, y_NO.unsqueeze(1)),
                                                    params.variance_E, n_outputs=y_NO.shape[1])
        log_lik_N = log_mixture(log_gate_NE, log_expert_NE)
        cond_N = (log_lik_N if self.gate_kind == "tree"
                  else log_mixture(log_prior_NE, log_expert_NE))
        output_NO = torch.einsum("ne,neo->no", log_prior_NE.exp(), outputs_NEO)
        return Evaluation(log_lik_N, cond_N, posterior(log_gate_NE, log_expert_NE), output_NO,
                          expert_logp_NEO, node_logp)

    def metrics(self, ev: Evaluation) -> dict[str, float]:
        sq_NO = (self.y_NO - ev.output_NO).square()
        out = {"nll": -ev.cond_lik_N.mean().item(), "mse": sq_NO.mean().item(),
               "sse": sq_NO.sum(-1).mean().item()}
        if self.classes_N is not None:
            out["accuracy"] = (ev.output_NO.argmax(-1) == self.classes_N).double().mean().item()
        return {f"train_{k}": v for k, v in out.items()}


def irls(xq_NQ: Tensor, t_NGB: Tensor, v_GQB: Tensor, logp_NGB: Tensor, config: EMConfig
          ) -> tuple[Tensor, int]:
    """Maximise each group's sum_n sum_b t_ngb log softmax(x_n V_g)_b by safeguarded Newton steps;
    returns the new V and the passes (trial evaluations) made."""
    n_groups, n_q, n_b = v_GQB.shape
    w_NG = t_NGB.sum(-1)
    active_G = w_NG.sum(0) > 1e-12 * max(float(w_NG.sum()), 1e-300)
    q_G = (t_NGB * logp_NGB).sum((0, 2))
    xx_NQR = xq_NQ.unsqueeze(2) * xq_NQ.unsqueeze(1)
    eye, passes = torch.eye(n_q * n_b, dtype=F64, device=v_GQB.device), 0
    for _ in range(config.irls_steps):
        p_NGB = logp_NGB.exp()
        wp_NGB = w_NG.unsqueeze(-1) * p_NGB
        grad_GQB = torch.einsum("nq,ngb->gqb", xq_NQ, t_NGB - wp_NGB)
        curv_NGBC = torch.diag_embed(wp_NGB) - wp_NGB.unsqueeze(-1) * p_NGB.unsqueeze(-2)
        hess_GKK = torch.einsum("nqr,ngbc->gqbrc", xx_NQR, curv_NGBC).reshape(
            n_groups, n_q * n_b, n_q * n_b)
        damp_G = config.ridge * hess_GKK.diagonal(dim1=1, dim2=2).mean(-1) + 1e-300
        step_GQB = torch.linalg.solve(hess_GKK + damp_G[:, None, None] * eye,
                                      grad_GQB.reshape(n_groups, -1)).reshape(v_GQB.shape)
        step_GQB[~active_G] = 0.0
        alpha_G = torch.ones(n_groups, dtype=F64, device=v_GQB.device)
        pending_G = active_G & torch.isfinite(step_GQB).flatten(1).all(1)
        v_GQB, logp_NGB = v_GQB.clone(), logp_NGB.clone()
        for _ in range(config.max_halvings + 1):
            if not pending_G.any():
                break
            idx = pending_G.nonzero().flatten()
            v_try = v_GQB[idx] + alpha_G[idx, None, None] * step_GQB[idx]
            logp_try = torch.log_softmax(torch.einsum("nq,gqb->ngb", xq_NQ, v_try), dim=-1)
            q_try = (t_NGB[:, idx] * logp_try).sum((0, 2))
            passes += 1
            ok = q_try >= q_G[idx]
            good = idx[ok]
            v_GQB[good], logp_NGB[:, good], q_G[good] = v_try[ok], logp_try[:, ok], q_try[ok]
            pending_G[good] = False
            alpha_G[idx[~ok]] *= 0.5
    return v_GQB, passes


def wls_experts(problem: EMProblem, params: Params, h_NE: Tensor, warned: set[int]
                 ) -> tuple[Tensor, Tensor]:
    """Gaussian experts' M-step: weighted least squares, then each expert's variance (floored)."""
    x1_NP, y_NO, config = problem.x1_NP, problem.y_NO, problem.config
    old_EPO, n_p = params.experts_EPO, x1_NP.shape[1]
    hx_NEP = h_NE.unsqueeze(-1) * x1_NP.unsqueeze(1)
    a_EPP = torch.einsum("nep,nq->epq", hx_NEP, x1_NP)
    b_EPO = torch.einsum("nep,no->epo", hx_NEP, y_NO)
    c_E = h_NE.T @ y_NO.square().sum(-1)
    mass_E = h_NE.sum(0)
    eig_EP = torch.linalg.eigvalsh(a_EPP)
    alive_E = eig_EP[:, -1] > 0
    singular_E = alive_E & (eig_EP[:, 0] <= 1e-12 * eig_EP[:, -1])
    for e in sorted(set(singular_E.nonzero().flatten().tolist()) - warned):
        warned.add(e)
        rank = int((eig_EP[e] > 1e-12 * eig_EP[e, -1]).sum())
        warnings.warn(
            f"fit_em: the weighted least-squares problem of expert {e} is singular (rank {rank} "
            f"< {n_p} parameters: too few rows weigh on it, or features are collinear); it was "
            f"solved with ridge={config.ridge} x the mean diagonal. Remove collinear features "
            "or use fewer experts.", RuntimeWarning, stacklevel=5)
    damp_E = torch.where(singular_E, config.ridge * a_EPP.diagonal(dim1=1, dim2=2).mean(-1), 0.0)
    eye = torch.eye(n_p, dtype=F64, device=a_EPP.device)
    safe_EPP = torch.where(alive_E[:, None, None], a_EPP + damp_E[:, None, None] * eye, eye)
    new_EPO = torch.where(alive_E[:, None, None], torch.linalg.solve(safe_EPP, b_EPO), old_EPO)

    def sse(w_EPO: Tensor) -> Tensor:  # sum_n h_ne ||y_n - W_e^T x1_n||^2 from the statistics
        return c_E - 2 * (w_EPO * b_EPO).sum((1, 2)) + (w_EPO * (a_EPP @ w_EPO)).sum((1, 2))

    # Only a ridge solution can be worse than the old weights; then the old ones stay.
    w_EPO = torch.where((sse(new_EPO) <= sse(old_EPO))[:, None, None], new_EPO, old_EPO)
    if config.fixed_variance is not None:
        return w_EPO, params.variance_E
    var_E = (sse(w_EPO).clamp_min(0) / (y_NO.shape[1] * mass_E.clamp_min(1e-300))
             ).clamp_min(problem.variance_floor)
    return w_EPO, torch.where(mass_E > 0, var_E, params.variance_E)


def m_step(problem: EMProblem, params: Params, ev: Evaluation, warned: set[int]
            ) -> tuple[Params, int]:
    """One M-step; returns the new parameters and its passes (Newton trials)."""
    config, h_NE = problem.config, ev.h_NE
    new = Params(params.experts_EPO, params.gate_GQB, params.gauss, params.variance_E)
    if problem.classify:
        t_NEC = h_NE.unsqueeze(-1) * problem.y_NO.unsqueeze(1)
        new.experts_EPO, passes = irls(problem.x1_NP, t_NEC, params.experts_EPO,
                                        ev.expert_logp_NEO, config)
    else:
        new.experts_EPO, new.variance_E = wls_experts(problem, params, h_NE, warned)
        passes = 0
    if problem.gate_kind == "tree":
        t_NGB = node_posteriors(h_NE, problem.depth, problem.branching)
        new.gate_GQB, p = irls(problem.gate_inputs(problem.x1_NP), t_NGB, params.gate_GQB,
                                ev.node_logp_NGB, config)
        passes += p
    else:
        new.gauss = gaussian_gate_m_step(problem.x_ND, h_NE, params.gauss,
                                         covariance=problem.covariance,
                                         floor=problem.covariance_floor)
    return new, passes


def gaussian_gate_m_step(x_ND: Tensor, h_NE: Tensor, old: GaussianGateParams, *,
                         covariance: str = "full", floor: float = 0.0) -> GaussianGateParams:
    """The gate's exact M-step (Xu, Jordan & Hinton 1995): maximise sum_n sum_j h_nj
    log(a_j N(x_n | m_j, S_j)) over a, m, S, with every eigenvalue of S_j at least ``floor``.

    a_j = mean_n h_nj; m_j = the h-weighted mean of x; S_j = the h-weighted covariance, its
    eigenvalues clipped at ``floor`` (the exact maximiser under that constraint; for 'diag' the
    weighted variances clipped). A component whose posterior mass is zero keeps its old m_j and S_j.

    Example:
        >>> x = torch.tensor([[0.0], [2.0], [10.0]], dtype=torch.float64)
        >>> h = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> old = GaussianGateParams(torch.zeros(2), torch.zeros(2, 1), torch.ones(2, 1, 1))
        >>> new = gaussian_gate_m_step(x, h, old, floor=1e-3)
        >>> new.log_shares_E.exp().tolist(), new.means_ED.flatten().tolist()
        ([0.6666666666666666, 0.3333333333333333], [1.0, 10.0])
        >>> new.covariances_EDD.flatten().tolist()  # (0 - 1)^2 and (2 - 1)^2 averaged; one point
        [1.0, 0.001]
    """
    check_choice("gaussian_gate_m_step", "covariance", covariance, COVARIANCES)
    mass_E = h_NE.sum(0)
    alive_E = mass_E > 1e-12 * max(float(mass_E.sum()), 1e-300)
    safe_E = torch.where(alive_E, mass_E, torch.ones_like(mass_E))
    log_shares_E = (mass_E.clamp_min(1e-300) / mass_E.sum()).log()
    means_ED = torch.where(alive_E[:, None], (h_NE.T @ x_ND) / safe_E[:, None], old.means_ED)
    diff_END = x_ND.unsqueeze(0) - means_ED.unsqueeze(1)
    weighted_END = diff_END * (h_NE.T / safe_E[:, None]).unsqueeze(-1)
    if covariance == "diag":
        var_ED = (weighted_END * diff_END).sum(1).clamp_min(floor)
        cov_EDD = torch.diag_embed(var_ED)
    else:
        cov_EDD = weighted_END.transpose(1, 2) @ diff_END
        cov_EDD = 0.5 * (cov_EDD + cov_EDD.transpose(1, 2))
        eigvals_ED, eigvecs_EDD = torch.linalg.eigh(cov_EDD)
        clipped_EDD = eigvecs_EDD * eigvals_ED.clamp_min(floor).unsqueeze(1)
        cov_EDD = clipped_EDD @ eigvecs_EDD.transpose(1, 2)
        cov_EDD = 0.5 * (cov_EDD + cov_EDD.transpose(1, 2))
    cov_EDD = torch.where(alive_E[:, None, None], cov_EDD, old.covariances_EDD)
    return GaussianGateParams(log_shares_E, means_ED, cov_EDD)
