"""Fast path for replicate runs of dense mixtures: parameters stacked on a run axis, rows last.

Shape legend: R runs, N rows, D input features, E experts, O outputs, H hidden units.

The reference path (:class:`VmapEngine`) runs the model's own ``forward`` under ``torch.func.vmap``,
which keeps the model's (N, E, O) layout. On a CPU, softmaxes and sums over a short last axis (a few
experts or classes) are several times slower than over a middle axis, so this engine keeps rows on
the last axis: (R, E, N) for the gate and (R, E, O, N) for the experts, and every reduction over
experts or outputs runs along contiguous rows. It composes the error functions from the same
per-row pieces as :mod:`moekit.losses` (experts on axis 1, outputs on axis 2), so the formulas are
written once. Tests check that both engines give the same losses, metrics and gradients in
float64, and the same fitted runs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from moekit.fitting.objective import Targets, mixture_loss
from moekit.losses import (
    categorical_log_likelihood,
    competitive_rows,
    gaussian_log_likelihood,
    log_mixture,
    squared_errors,
)
from moekit.nn.dense import MixtureOfExperts
from moekit.nn.experts import ACTIVATIONS, LinearExperts, MLPExperts
from moekit.nn.gates import SoftmaxGate


class VmapEngine:
    """The reference: any model, its own forward, vmapped over the stacked parameters."""

    def __init__(self, models: Sequence[nn.Module], x_ND: Tensor, targets: Targets, loss: str,
                 variance: float, metric: str) -> None:
        params, self.buffers = stack_module_state(list(models))
        self.params = {k: v.detach() for k, v in params.items()}
        template = copy.deepcopy(models[0]).to("meta")

        def errors(p: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            out = functional_call(template, (p, b), (x_ND,))
            value = mixture_loss(loss, out, targets.for_loss, variance=variance) + out.aux_loss
            sq_NO = (targets.dense_NO - out.output).square()
            return value, sq_NO.sum(-1).mean() if metric == "sse" else sq_NO.mean()

        self._errors = vmap(errors)

    def errors(self, work: dict[str, Tensor], rows: Tensor) -> tuple[Tensor, Tensor]:
        return self._errors(work, {k: v[rows] for k, v in self.buffers.items()})

    def module_state(self, params: dict[str, Tensor], r: int) -> dict[str, Tensor]:
        return {k: v[r].detach().clone() for k, v in params.items()}


def supports_stacked(models: Sequence[nn.Module]) -> bool:
    """Whether :class:`StackedMixtureEngine` handles these models (dense softmax-gate mixtures of
    linear or MLP experts, all alike)."""
    first = models[0]
    return (all(type(m) is MixtureOfExperts and m.config == first.config for m in models)
            and isinstance(first.gate, SoftmaxGate)
            and isinstance(first.experts, (LinearExperts, MLPExperts)))


class StackedMixtureEngine:
    """Rows-last computation of the losses and metrics of R dense mixtures of experts."""

    def __init__(self, models: Sequence[MixtureOfExperts], x_ND: Tensor, targets: Targets,
                 loss: str, variance: float, metric: str) -> None:
        if not supports_stacked(models):
            raise TypeError("StackedMixtureEngine: every model must be a MixtureOfExperts with a "
                            "softmax gate and linear or MLP experts, all with the same config.")
        self.config = models[0].config
        self.loss, self.variance, self.metric = loss, variance, metric
        self.x_DN = x_ND.T.contiguous()
        self.target_ON = targets.dense_NO.T.contiguous()
        self.classes_N = targets.classes_N
        stacked, _ = stack_module_state(list(models))
        self.params = self._to_rows_last(stacked)

    # Layout conversions between the modules' state dicts and the rows-last stacked tensors.
    def _to_rows_last(self, s: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {"gate_w_RED": s["gate.w_DE"].transpose(1, 2)}
        if "gate.b_E" in s:
            out["gate_b_RE1"] = s["gate.b_E"].unsqueeze(-1)
        if self.config.expert.kind == "linear":
            out["w_REOD"] = s["experts.w_EDO"].permute(0, 1, 3, 2)
            out["b_REO1"] = s["experts.b_EO"].unsqueeze(-1)
        else:
            out["w1_REHD"] = s["experts.w1_EDH"].permute(0, 1, 3, 2)
            out["b1_REH1"] = s["experts.b1_EH"].unsqueeze(-1)
            out["w2_REOH"] = s["experts.w2_EHO"].permute(0, 1, 3, 2)
            out["b2_REO1"] = s["experts.b2_EO"].unsqueeze(-1)
        return {k: v.detach().contiguous() for k, v in out.items()}

    def module_state(self, params: dict[str, Tensor], r: int) -> dict[str, Tensor]:
        p = {k: v[r].detach() for k, v in params.items()}
        state = {"gate.w_DE": p["gate_w_RED"].T}
        if "gate_b_RE1" in p:
            state["gate.b_E"] = p["gate_b_RE1"].squeeze(-1)
        if "w_REOD" in p:
            state["experts.w_EDO"] = p["w_REOD"].transpose(1, 2)
            state["experts.b_EO"] = p["b_REO1"].squeeze(-1)
        else:
            state["experts.w1_EDH"] = p["w1_REHD"].transpose(1, 2)
            state["experts.b1_EH"] = p["b1_REH1"].squeeze(-1)
            state["experts.w2_EHO"] = p["w2_REOH"].transpose(1, 2)
            state["experts.b2_EO"] = p["b2_REO1"].squeeze(-1)
        return {k: v.contiguous().clone() for k, v in state.items()}

    def _expert_logits(self, p: dict[str, Tensor]) -> Tensor:
        x_DN = self.x_DN
        if "w_REOD" in p:
            return torch.matmul(p["w_REOD"], x_DN) + p["b_REO1"]  # (R, E, O, N)
        act = ACTIVATIONS[self.config.expert.activation]
        h_REHN = act(torch.matmul(p["w1_REHD"], x_DN) + p["b1_REH1"])
        return torch.matmul(p["w2_REOH"], h_REHN) + p["b2_REO1"]

    def _head(self, z_REON: Tensor) -> Tensor:
        head = self.config.expert.head
        if head == "softmax":
            return torch.softmax(z_REON, dim=2)
        return torch.sigmoid(z_REON) if head == "sigmoid" else z_REON

    def errors(self, work: dict[str, Tensor], rows: Tensor) -> tuple[Tensor, Tensor]:
        """Loss (mean over rows) and stop metric of each run in ``work``, shape (R,) each."""
        logits_REN = torch.matmul(work["gate_w_RED"], self.x_DN)
        if "gate_b_RE1" in work:
            logits_REN = logits_REN + work["gate_b_RE1"]
        log_p_REN = torch.log_softmax(logits_REN, dim=1)
        p_REN = log_p_REN.exp()
        z_REON = self._expert_logits(work)
        o_REON = self._head(z_REON)
        blend_RON = (p_REN.unsqueeze(2) * o_REON).sum(1)
        diff_RON = self.target_ON - blend_RON
        blend_sq_RON = diff_RON * diff_RON
        if self.loss == "cooperative":  # Eq. 1
            loss_RN = blend_sq_RON.sum(1)
        elif self.loss == "categorical_nll":
            index_RE1N = self.classes_N.expand(*z_REON.shape[:2], 1, -1)
            log_lik_REN = categorical_log_likelihood(z_REON, index_RE1N, dim=2)
            loss_RN = -log_mixture(log_p_REN, log_lik_REN, dim=1)
        else:
            sq_REN = squared_errors(o_REON, self.target_ON, dim=2)
            if self.loss == "competitive":  # Eq. 2
                loss_RN = competitive_rows(p_REN, sq_REN, dim=1)
            else:  # Eq. 3
                log_lik_REN = gaussian_log_likelihood(sq_REN, self.variance)
                loss_RN = -log_mixture(log_p_REN, log_lik_REN, dim=1)
        per_case_RN = blend_sq_RON.sum(1)
        metric_R = per_case_RN.mean(-1) if self.metric == "sse" else blend_sq_RON.mean((1, 2))
        return loss_RN.mean(-1), metric_R
