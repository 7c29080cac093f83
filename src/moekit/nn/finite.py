"""The layers' guard against non-finite inputs: one NaN or inf row is refused before it does harm.

Shape legend: N rows (the input's leading axes), D input features.

Why every layer checks by default: a NaN row gives NaN logits, so under expert-choice routing it
takes a slot in every expert (``topk`` ranks NaN first) and pushes other rows out, changing their
outputs; under every router and gate its NaN output makes the loss NaN and, through the shared
gate weights, every gradient step NaN. The check is one reduction and one device sync: the sum of
``x`` is finite exactly when every value is, unless finite values overflow it (then the exact
``torch.isfinite(x).all()`` decides); on a CPU the sum is far cheaper than ``isfinite``, which
materialises a mask. The message is built only when the check fails. Layers built with
``check_finite=False`` skip it, for speed where the caller guarantees finite inputs.

Under ``torch.func.vmap`` over the input a data-dependent ``if`` cannot run, so the check is
skipped there (check the batch before vmap); vmap over the parameters only, as the replicate
engines of :mod:`moekit.fitting.replicate_engines` do, keeps the check. Under ``torch.compile`` the
check runs eagerly, outside the graph (``torch.compiler.disable``: one graph break), and still
refuses bad rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# How many bad rows the message names (the count covers them all).
SHOWN_ROWS = 5


def check_flag(owner: str, name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool; a TypeError naming it otherwise (``'false'`` is truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False; got {name}={value!r}.")
    return value


def _batched_under_vmap(x: Tensor) -> bool:
    # torch.func has no public test for this; the functorch C API is what vmap itself uses.
    return bool(torch._C._functorch.is_batchedtensor(x))


def check_finite_rows(owner: str, x: Tensor) -> Tensor:
    """Return ``x`` (..., D) if every value is finite; else a ValueError naming the layer, how many
    rows hold NaN or inf, the first few of them (as indices of ``x``'s leading axes), and the fix.

    Example:
        >>> x = torch.zeros(4, 2); x[2, 1] = float("nan")
        >>> check_finite_rows("SparseMoE", x)  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        ValueError: SparseMoE: x must be finite; 1 of 4 rows holds NaN or inf: x[2]. Drop or clean
        those rows before the layer, or build it with check_finite=False to skip this check (a bad
        row then gives NaN outputs and gradients; see the layer's config).
    """
    if torch.compiler.is_compiling():
        # Built here, not with a decorator at import: torch.compiler.disable imports
        # torch._dynamo (0.8 s of every command's start-up), loaded anyway once compiling.
        return torch.compiler.disable(_check_outside_the_graph)(owner, x)
    if _batched_under_vmap(x) or _all_finite(x):
        return x
    raise ValueError(_message(owner, x))


def _check_outside_the_graph(owner: str, x: Tensor) -> Tensor:
    # A data-dependent branch cannot be traced: torch.compile runs this eagerly (one graph break,
    # no warning). Eager callers skip the wrapper, whose overhead is as large as the check's.
    return check_finite_rows(owner, x)


def _all_finite(x: Tensor) -> bool:
    # NaN or inf anywhere makes the sum NaN or inf (inf - inf is NaN); a non-finite sum of finite
    # values (overflow) falls to the exact test. Half precision sums in float32, as it would anyway.
    total = x.sum(dtype=torch.promote_types(x.dtype, torch.float32))
    return bool(torch.isfinite(total)) or bool(torch.isfinite(x).all())


def _message(owner: str, x: Tensor) -> str:
    bad_rows = ~torch.isfinite(x).all(dim=-1)  # over the leading axes, (...)
    count, total = int(bad_rows.sum()), bad_rows.numel()
    shown = bad_rows.nonzero()[:SHOWN_ROWS].tolist()
    where = ", ".join(f"x[{', '.join(map(str, index))}]" if index else "x" for index in shown)
    more = ", ..." if count > SHOWN_ROWS else ""
    verb = "holds" if count == 1 else "hold"
    return (f"{owner}: x must be finite; {count} of {total} rows {verb} NaN or inf: {where}{more}. "
            "Drop or clean those rows before the layer, or build it with check_finite=False to "
            "skip this check (a bad row then gives NaN outputs and gradients; see the layer's "
            "config).")
