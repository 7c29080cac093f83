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

Both engines give :func:`~moekit.fitting.replicates.train_replicates` the losses, stop metrics and
gradients of an epoch through ``errors_and_grads``. The stacked engine's is its fast path, the same
numbers as autograd through its ``errors`` (the reference) to the last bit, in less time:
- the runs of a large batch go through the forward and backward in chunks of about
  ``CHUNK_ELEMENTS`` numbers per (R, E, O, N) tensor, which stay in a core's cache (one such
  tensor of 325 runs of 8 experts is 16 MB, and an epoch writes a few dozen);
- for linear experts and Eqs. 1-3, the backward is written out formula by formula as autograd
  runs it (the same operations in the same order), without autograd's overhead, and every
  product with x runs a chunk at a time too, so that a chunk stays in cache from the first
  product to the last (an epoch of 8 experts, 325 runs: 1.3x as fast). A matrix product gives a
  row the same numbers whatever the other rows, from ``MIN_PRODUCT_ROWS`` rows up: chunks keep
  to that;
- for other experts (autograd between the products), the products with x and their weights'
  gradients (grad @ x^T) run on the whole batch, as in ``errors``.
In float32 one rounding at an oscillating step changes a run's path, hence bit for bit.
Bit for bit needs one thread (with two, torch may split a small sum of a chunk otherwise than the
batch's) and rows in whole CPU vectors (400 in the vowel task; elementwise kernels compute the last
numbers of a tensor that does not fill its vectors by a scalar formula, which may round them
otherwise); the tests check it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

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

# The fast path's chunks: about CHUNK_ELEMENTS numbers per (chunk, E, O, N) tensor (1 MB in
# float32), for batches over CHUNKED_BATCH numbers per such tensor; smaller batches run whole, as
# each chunk costs the fixed overhead of some 60 operations (about 0.2 ms). Measured on the 2-core
# test machine, one thread, an epoch of 325 runs (benchmarks/vowels_speed.py, with the by-hand
# backward and the products per chunk): 8 experts 26 ms against 61 ms by autograd unchunked, 4
# experts 14 against 25 ms.
CHUNK_ELEMENTS = 1 << 18
CHUNKED_BATCH = 1 << 20
# A chunk's products with x have at least this many rows (or the chunk is the whole batch): below
# 16 rows MKL's float32 matrix product takes another path (measured: from 11 to 16 rows by
# shape), whose numbers may differ from those it gives the same rows in a larger product.
MIN_PRODUCT_ROWS = 16


def by_autograd(errors: Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]],
                inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``errors(leaves)``'s loss and metric (R,) at ``inputs``, and the gradient of the summed
    loss with respect to each input (autograd; the inputs' own graphs are cut)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
    loss_R, metric_R = errors(leaves)
    found = torch.autograd.grad(loss_R.sum(), list(leaves.values()))
    return loss_R.detach(), metric_R.detach(), dict(zip(leaves, found, strict=True))


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

    def errors_and_grads(self, work: dict[str, Tensor], rows: Tensor
                         ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Loss and stop metric of each run in ``work`` (R,), and the gradient of each run's loss
        with respect to its parameters (shaped like ``work``)."""
        return by_autograd(lambda leaves: self.errors(leaves, rows), work)

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
        self._scratch: dict[str, Tensor] = {}

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

    @property
    def input_weights(self) -> tuple[str, ...]:
        """The weights that multiply the inputs x: the gate's, and the experts' (first layer)."""
        return ("gate_w_RED", "w_REOD" if self.config.expert.kind == "linear" else "w1_REHD")

    def _inputs_times(self, w: Tensor) -> Tensor:
        """w @ x for a stacked weight (R, ..., D): (R, ..., N), one matrix product of R x ... rows
        (``torch.matmul`` folds the leading axes)."""
        return torch.matmul(w, self.x_DN)

    def _shape_times(self, w: Tensor) -> Tensor:
        """An empty tensor shaped as w @ x (on the meta device: no memory)."""
        return torch.empty(*w.shape[:-1], self.x_DN.shape[1], dtype=w.dtype, device="meta")

    def _expert_logits(self, p: dict[str, Tensor], pre: dict[str, Tensor]) -> Tensor:
        if self.config.expert.kind == "linear":
            return pre["w_REOD"] + p["b_REO1"]  # (R, E, O, N)
        act = ACTIVATIONS[self.config.expert.activation]
        h_REHN = act(pre["w1_REHD"] + p["b1_REH1"])
        return torch.matmul(p["w2_REOH"], h_REHN) + p["b2_REO1"]

    def _head(self, z_REON: Tensor) -> Tensor:
        head = self.config.expert.head
        if head == "softmax":
            return torch.softmax(z_REON, dim=2)
        return torch.sigmoid(z_REON) if head == "sigmoid" else z_REON

    def _head_into(self, z_REON: Tensor, out: Tensor) -> Tensor:
        """:meth:`_head`, written into ``out`` (the same kernels)."""
        head = self.config.expert.head
        if head == "softmax":
            return torch._softmax(z_REON, 2, False, out=out)
        return torch.sigmoid(z_REON, out=out) if head == "sigmoid" else z_REON

    def errors(self, work: dict[str, Tensor], rows: Tensor) -> tuple[Tensor, Tensor]:
        """Loss (mean over rows) and stop metric of each run in ``work``, shape (R,) each; the
        reference of :meth:`errors_and_grads` (differentiate it with autograd)."""
        return self._errors(work, {k: self._inputs_times(work[k]) for k in self.input_weights})

    def _errors(self, work: dict[str, Tensor], pre: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """:meth:`errors` given ``pre``, the products of the input weights with x."""
        logits_REN = pre["gate_w_RED"]
        if "gate_b_RE1" in work:
            logits_REN = logits_REN + work["gate_b_RE1"]
        log_p_REN = torch.log_softmax(logits_REN, dim=1)
        p_REN = log_p_REN.exp()
        z_REON = self._expert_logits(work, pre)
        o_REON = self._head(z_REON)
        if self.loss == "cooperative":  # Eq. 1
            blend_sq_RON = self._blend_squared_errors(p_REN, o_REON)
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
        if self.loss != "cooperative":  # the metric needs no gradient
            with torch.no_grad():
                blend_sq_RON = self._blend_squared_errors(p_REN, o_REON)
        if self.metric == "sse":
            metric_R = blend_sq_RON.sum(1).mean(-1)
        else:
            metric_R = blend_sq_RON.mean((1, 2))
        return loss_RN.mean(-1), metric_R

    def _blend_squared_errors(self, p_REN: Tensor, o_REON: Tensor) -> Tensor:
        """(d - sum_i p_i o_i)^2 per output: (R, O, N)."""
        blend_RON = (p_REN.unsqueeze(2) * o_REON).sum(1)
        diff_RON = self.target_ON - blend_RON
        return diff_RON * diff_RON

    def chunk_runs(self, n_runs: int) -> int:
        """Runs per chunk of :meth:`errors_and_grads` for a batch of ``n_runs``: all of them up to
        ``CHUNKED_BATCH`` numbers per (R, E, O, N) tensor or on more than one thread (where a
        chunk's sums may be split otherwise than the batch's), else about ``CHUNK_ELEMENTS``."""
        per_run = self.config.n_experts * self.config.out_features * self.x_DN.shape[1]
        if n_runs * per_run <= CHUNKED_BATCH or torch.get_num_threads() > 1:
            return n_runs
        return max(1, CHUNK_ELEMENTS // per_run)

    def chunks(self, n_runs: int) -> list[slice]:
        """The chunks of a batch of ``n_runs``: about ``chunk_runs(n_runs)`` runs each, of
        nearly equal sizes, each with at least :data:`MIN_PRODUCT_ROWS` rows in the gate's
        product with x (E per run) unless it is the whole batch."""
        least = -(-MIN_PRODUCT_ROWS // self.config.n_experts)  # runs
        n_chunks = max(1, min(-(-n_runs // self.chunk_runs(n_runs)), n_runs // least))
        size, extra = divmod(n_runs, n_chunks)
        starts = [i * size + min(i, extra) for i in range(n_chunks + 1)]
        return [slice(starts[i], starts[i + 1]) for i in range(n_chunks)]

    def errors_and_grads(self, work: dict[str, Tensor], rows: Tensor
                         ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Loss and stop metric of each run in ``work`` (R,), and the gradient of each run's loss
        with respect to its parameters: bit for bit autograd's of :meth:`errors`, in less time
        (the conditions: the module's docstring).

        Linear experts under Eqs. 1-3 go by hand, chunk by chunk (:meth:`chunks`,
        :meth:`_linear_chunk`), every product with x included. The others go by autograd:
        through :meth:`errors` itself when the batch runs whole, else with the products with x
        (forward) and with x^T (their weights' gradients) on the whole batch and everything
        between them a chunk at a time.
        """
        n_runs = next(iter(work.values())).shape[0]
        chunks = self.chunks(n_runs)
        if self.config.expert.kind == "linear" and self.loss != "categorical_nll":
            return self._linear_by_hand(work, chunks)
        if len(chunks) == 1:  # autograd through errors, as it is
            return by_autograd(lambda leaves: self.errors(leaves, rows), work)
        x_DN = self.x_DN
        with torch.no_grad():
            pre = {k: torch.matmul(work[k], x_DN, out=self._buffer(f"x {k}", self._shape_times(
                work[k]))) for k in self.input_weights}
        loss_R = torch.empty(n_runs, dtype=x_DN.dtype)
        metric_R = torch.empty(n_runs, dtype=x_DN.dtype)
        grads = {k: self._buffer(f"grad {k}", pre[k]) if k in pre else torch.empty_like(v)
                 for k, v in work.items()}
        for part in chunks:  # gradients with respect to the products with x, and the biases
            inputs = {k: (pre[k] if k in pre else work[k])[part] for k in work}
            loss_R[part], metric_R[part], found = by_autograd(
                lambda leaves: self._errors(leaves, {k: leaves[k] for k in pre}), inputs)
            for k, grad in found.items():
                grads[k][part] = grad
        n = x_DN.shape[1]
        for k in pre:  # autograd's backward of the folded matmul: grad @ x^T, the whole batch
            grads[k] = grads[k].view(-1, n).mm(x_DN.t()).view(work[k].shape)
        return loss_R, metric_R, grads

    @torch.no_grad()
    def _linear_by_hand(self, work: dict[str, Tensor], chunks: list[slice]
                        ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """:meth:`errors_and_grads` for linear experts and Eqs. 1-3: chunk by chunk, each chunk's
        results written in place into the batch's."""
        n_runs = next(iter(work.values())).shape[0]
        loss_R = torch.empty(n_runs, dtype=self.x_DN.dtype)
        metric_R = torch.empty(n_runs, dtype=self.x_DN.dtype)
        grads = {k: torch.empty_like(v) for k, v in work.items()}
        for part in chunks:
            self._linear_chunk({k: v[part] for k, v in work.items()}, loss_R[part],
                               metric_R[part], {k: v[part] for k, v in grads.items()})
        return loss_R, metric_R, grads

    def _linear_chunk(self, work: dict[str, Tensor], loss_C: Tensor, metric_C: Tensor,
                      grads: dict[str, Tensor]) -> None:
        """Loss, metric and gradients of the runs of ``work`` (a chunk), written into ``loss_C``,
        ``metric_C`` and ``grads``: the forward of :meth:`errors`, then the backward autograd
        would run through it, formula by formula in autograd's order (its derivatives.yaml,
        torch 2.x), so the same numbers to the last bit (tested), without the engine's overhead,
        into buffers kept from epoch to epoch. The products with x run per chunk, so that a
        chunk's numbers stay in a core's cache from the first product to the last: a matrix
        product gives each of its rows the same numbers whatever the other rows, from
        ``MIN_PRODUCT_ROWS`` rows up (measured and tested), which :meth:`chunks` keeps to."""
        x_DN = self.x_DN
        logits_REN = torch.matmul(work["gate_w_RED"], x_DN)
        gate_RE1 = work.get("gate_b_RE1")
        if gate_RE1 is not None:
            logits_REN = logits_REN + gate_RE1
        log_p_REN = torch.log_softmax(logits_REN, dim=1)
        p_REN = log_p_REN.exp()
        z_REON = torch.matmul(work["w_REOD"], x_DN,
                              out=self._buffer("z", self._shape_times(work["w_REOD"])))
        z_REON.add_(work["b_REO1"])
        o_REON = self._head_into(z_REON, self._buffer("o", z_REON))
        product_REON = self._buffer("product", z_REON)
        blend_RON = torch.mul(p_REN.unsqueeze(2), o_REON, out=product_REON).sum(1)
        diff_RON = self.target_ON - blend_RON
        blend_sq_RON = diff_RON * diff_RON
        n_runs, n = o_REON.shape[0], o_REON.shape[-1]
        # loss_R.sum() then mean over rows: d/d loss_RN = 1 / N (materialised as mean's backward
        # is: ones expanded, divided by N)
        g_RN = torch.ones(n_runs, 1, dtype=o_REON.dtype) / n
        if self.loss == "cooperative":  # loss_RN = sum_o (d - blend)^2
            t_RON = g_RN.unsqueeze(1) * diff_RON
            g_blend_RON = (t_RON + t_RON).neg()  # the product's two factors; then d - blend
            g_p_REN = (g_blend_RON.unsqueeze(1) * o_REON).sum(2, keepdim=True).squeeze(2)
            g_o_REON = torch.mul(g_blend_RON.unsqueeze(1), p_REN.unsqueeze(2), out=product_REON)
            g_log_p_REN = g_p_REN * p_REN  # exp's backward
            loss_RN = blend_sq_RON.sum(1)
        else:
            diff_REON = torch.sub(self.target_ON, o_REON, out=self._buffer("diff", o_REON))
            sq_REN = torch.mul(diff_REON, diff_REON, out=product_REON).sum(2)  # squared_errors
            if self.loss == "competitive":  # loss_RN = sum_i p_i sq_i
                loss_RN = competitive_rows(p_REN, sq_REN, dim=1)
                g_REN = g_RN.unsqueeze(1)
                g_log_p_REN = (g_REN * sq_REN) * p_REN
                g_sq_REN = g_REN * p_REN
            else:  # Eq. 3: loss_RN = -logsumexp_i(log p_i - sq_i / 2v)
                a_REN = log_p_REN + gaussian_log_likelihood(sq_REN, self.variance)
                lse_RN = torch.logsumexp(a_REN, dim=1)
                loss_RN = -lse_RN
                g_log_p_REN = (-g_RN).unsqueeze(1) * (a_REN - lse_RN.unsqueeze(1)).exp()
                g_sq_REN = (g_log_p_REN / (2.0 * self.variance)).neg()
            # autograd: t = g_sq * diff for each factor of diff * diff, t + t, then d - o's
            # negation; doubling and negation are exact, so -2 g_sq first gives the same bits
            g_o_REON = torch.mul((-2.0 * g_sq_REN).unsqueeze(2), diff_REON, out=product_REON)
        g_z_REON = self._head_backward(g_o_REON, o_REON, out=z_REON)
        g_logits_REN = torch._log_softmax_backward_data(g_log_p_REN, log_p_REN, 1,
                                                        log_p_REN.dtype)
        d = x_DN.shape[0]  # autograd's backward of the folded matmuls: grad @ x^T
        torch.mm(g_z_REON.view(-1, n), x_DN.t(), out=grads["w_REOD"].view(-1, d))
        torch.sum(g_z_REON, -1, keepdim=True, out=grads["b_REO1"])
        torch.mm(g_logits_REN.view(-1, n), x_DN.t(), out=grads["gate_w_RED"].view(-1, d))
        if gate_RE1 is not None:
            torch.sum(g_logits_REN, -1, keepdim=True, out=grads["gate_b_RE1"])
        loss_C.copy_(loss_RN.mean(-1))
        if self.metric == "sse":
            metric_C.copy_(blend_sq_RON.sum(1).mean(-1))
        else:
            metric_C.copy_(blend_sq_RON.mean((1, 2)))

    def _head_backward(self, g_o_REON: Tensor, o_REON: Tensor, out: Tensor) -> Tensor:
        head = self.config.expert.head
        if head == "softmax":
            return torch.ops.aten._softmax_backward_data.out(g_o_REON, o_REON, 2, o_REON.dtype,
                                                             grad_input=out)
        if head == "sigmoid":
            return torch.ops.aten.sigmoid_backward.grad_input(g_o_REON, o_REON, grad_input=out)
        return g_o_REON

    def _buffer(self, name: str, like: Tensor) -> Tensor:
        """A tensor shaped like ``like`` (its dtype too), its memory kept from epoch to epoch:
        glibc gives a freed block of a megabyte or more back to the system, and writing a new
        one costs a page fault per 4 kB (8 experts, 25 runs: epochs 1.3x as slow)."""
        flat = self._scratch.get(name)
        if flat is None or flat.numel() < like.numel() or flat.dtype != like.dtype:
            flat = self._scratch[name] = torch.empty(like.numel(), dtype=like.dtype)
        return flat[:like.numel()].view(like.shape)
