"""The objective the fitting loops share: which error function, evaluated on a layer's output, and
the targets in the forms the losses and metrics need.

Shape legend: N rows, O outputs (C classes for classification).

Gradient fitting (:mod:`~moekit.fitting.gradient`), replicate runs
(:mod:`~moekit.fitting.replicates`), EM (:mod:`~moekit.fitting.em`) and the estimators import it
from here, so none of them imports another's loop. The formulas themselves are in
:mod:`moekit.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit._checks import check_finite
from moekit.losses import categorical_mixture_nll, competitive_loss, cooperative_loss, mixture_nll
from moekit.nn.outputs import MoEOutput

# Canonical names, with the paper's equation numbers as aliases.
LOSS_NAMES = {
    "cooperative": "cooperative", "eq1": "cooperative",
    "competitive": "competitive", "eq2": "competitive",
    "mixture_nll": "mixture_nll", "eq3": "mixture_nll",
    "categorical_nll": "categorical_nll",
}


def resolve_loss_name(name: str) -> str:
    """Map a loss name or alias ('eq1', 'eq2', 'eq3') to its canonical name.

    Example:
        >>> resolve_loss_name("eq3")
        'mixture_nll'
    """
    if name not in LOSS_NAMES:
        listed = ", ".join(repr(n) for n in LOSS_NAMES)
        raise ValueError(f"loss must be one of {listed}; got loss={name!r}.")
    return LOSS_NAMES[name]


def mixture_loss(name: str, out: MoEOutput, target: Tensor, *, variance: float = 1.0,
                 reduction: str = "mean") -> Tensor:
    """Evaluate the named error function on a layer's :class:`~moekit.nn.outputs.MoEOutput`.

    ``target`` is (N, O) for the squared-error losses and (N,) class indices for 'categorical_nll',
    which needs the experts' class logits (a softmax head).
    """
    name = resolve_loss_name(name)
    if out.expert_outputs is None:
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


def dense_targets(y: Tensor, out_features: int, dtype: torch.dtype) -> Tensor:
    """(N, O) float targets: one-hot rows for class indices, float targets as (N, O).

    Example:
        >>> dense_targets(torch.tensor([2, 0]), 3, torch.float32)
        tensor([[0., 0., 1.],
                [1., 0., 0.]])
    """
    if not y.is_floating_point():
        return nn.functional.one_hot(y.reshape(-1).long(), out_features).to(dtype)
    return y.reshape(y.shape[0], -1).to(dtype)


@dataclass(frozen=True)
class Targets:
    """Targets in the forms the losses and metrics need."""

    for_loss: Tensor  # (N, O) floats, or (N,) class indices for 'categorical_nll'
    dense_NO: Tensor  # (N, O) floats: one-hot rows for classification
    classes_N: Tensor | None  # class indices for classification, else None


def prepare_targets(owner: str, name: str, y: Tensor, *, out_features: int, loss: str,
                    dtype: torch.dtype) -> Targets:
    """Validate ``y`` and derive its forms. Integer 1-D targets are class indices in [0, O)."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor; got {type(y).__name__}.")
    if not y.is_floating_point():
        if y.ndim != 1:
            raise ValueError(f"{owner}: class-index {name} must be 1-D; got shape "
                             f"{tuple(y.shape)}.")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= out_features):
            raise ValueError(f"{owner}: class indices in {name} must lie in [0, {out_features}) "
                             f"for a model with out_features={out_features}; got values from "
                             f"{int(y.min())} to {int(y.max())}.")
        classes_N = y.long()
        dense_NO = dense_targets(classes_N, out_features, dtype)
        return Targets(classes_N if loss == "categorical_nll" else dense_NO, dense_NO, classes_N)
    if loss == "categorical_nll":
        raise ValueError(f"{owner}: loss='categorical_nll' needs integer class indices in {name}; "
                         f"got dtype={y.dtype}. Pass y.long(), or use loss='mixture_nll'.")
    check_finite(owner, name, y)
    dense_NO = y.reshape(-1, 1) if y.ndim == 1 else y
    if dense_NO.ndim != 2 or dense_NO.shape[1] != out_features:
        raise ValueError(f"{owner}: {name} must have shape (N, {out_features}) to match the "
                         f"model's out_features={out_features}; got {tuple(y.shape)}.")
    dense_NO = dense_NO.to(dtype)
    return Targets(dense_NO, dense_NO, None)
