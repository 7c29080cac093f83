"""Input validation shared by the public entry points.

Every message names the owner, the parameter, the constraint, the value received and, where there is
one, the fix, so that a user reading only the message knows what to change:

    MixtureOfExperts: n_experts must be an integer >= 1; got n_experts=0.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


def check_int(owner: str, name: str, value: Any, *, minimum: int) -> int:
    """Return ``value`` if it is an integer >= ``minimum``; raise a ValueError naming it
    otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}; got {name}={value!r}.")
    return value


def check_positive_float(owner: str, name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite number > 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0.0 < float(value) < float("inf")):
        raise ValueError(f"{owner}: {name} must be a finite number > 0; got {name}={value!r}.")
    return float(value)


def check_choice(owner: str, name: str, value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``; the message lists them all."""
    options = tuple(choices)
    if value not in options:
        listed = ", ".join(repr(c) for c in options)
        raise ValueError(f"{owner}: {name} must be one of {listed}; got {name}={value!r}.")
    return value


def check_matrix(owner: str, name: str, x: Any, *, n_columns: int | None = None) -> Tensor:
    """Check that ``x`` is a 2-D floating tensor, with ``n_columns`` columns when given."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor; got {type(x).__name__}.")
    if x.ndim != 2:
        raise ValueError(
            f"{owner}: {name} must be 2-D (rows, features); got {name}.shape={tuple(x.shape)}. "
            f"Reshape a single feature with {name}.reshape(-1, 1)."
        )
    if not x.is_floating_point():
        raise TypeError(f"{owner}: {name} must be a floating tensor; got dtype={x.dtype}.")
    if n_columns is not None and x.shape[1] != n_columns:
        raise ValueError(
            f"{owner}: {name} has {x.shape[1]} features but the model expects {n_columns}; "
            f"got {name}.shape={tuple(x.shape)}. Pass {n_columns} columns, in the order used to "
            "build it."
        )
    return x


def check_finite(owner: str, name: str, x: Tensor) -> Tensor:
    """Raise a ValueError that says where the first NaN or inf of ``x`` is."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        value = x[index].item()
        count = int(bad.sum())
        raise ValueError(
            f"{owner}: {name} must be finite; got {name}[{', '.join(map(str, index))}]={value} "
            f"({count} non-finite value{'s' if count > 1 else ''}). "
            "Drop or impute those rows first."
        )
    return x


def check_same_rows(owner: str, **tensors: Tensor) -> int:
    """Check that all tensors have the same number of rows (dimension 0) and return it."""
    rows = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(rows.values())) > 1:
        listed = ", ".join(f"{name} has {n}" for name, n in rows.items())
        raise ValueError(f"{owner}: row counts must match; {listed}.")
    return next(iter(rows.values()))
