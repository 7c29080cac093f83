"""Routing saturation over training: how far the routing of each snapshot of a run (`moekit lm
train` keeps them: :mod:`.lm_snapshots`) already agrees with the final model's, layer by layer, on
the same analysed tokens, experts taken as numbered (one model over time, so no matching).

Shape legend: T tokens analysed, L MoE layers, E experts, K experts chosen per token, S
snapshots (the final model last).

Per snapshot and layer (:meth:`~moekit.analysis.layer_overlap.RoutingOverlap.saturation`): the
top-k overlap, the mean over tokens of |A ∩ B| / K with A the snapshot's top-k set and B the
final model's (1: every token already goes to its final experts); the share of tokens whose first
choice is already the final one; and the overlap independent tokens with these loads would give,
sum_e qA_e qB_e / K (chance). A curve that reaches 1 early says routing settled early in
training (its experts' roles fixed while their weights still learn); one near chance until the
end, that it kept moving.

Memory: one snapshot at a time, loaded, recorded over the tokens and reduced to its L x E x E
co-assignment counts before the next is read; the final model's routing is the analysis's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from moekit.analysis.layer_overlap import RoutingOverlap
from moekit.analysis.layer_recorder import record_layers
from moekit.exceptions import DataError, Setting
from moekit.io.models import load_model

REFERENCE = "the final model"


def check_snapshots(owner: str, snapshots: Sequence[tuple[int, Any]], final_step: int | None
                    ) -> list[tuple[int, Any]]:
    """``snapshots`` (``(step, model or model folder)`` pairs) sorted by step; a ValueError for
    a step that is not an integer in [0, final_step), or a missing ``final_step``."""
    if not snapshots:
        return []
    if type(final_step) is not int or final_step < 1:
        raise ValueError(f"{owner}: final_step must be the step count of the analysed model (an "
                         f"integer >= 1) when snapshots are given; got final_step={final_step!r}. "
                         "Pass e.g. final_step=1000.")
    steps = [step for step, _ in snapshots]
    bad = [s for s in steps if type(s) is not int or not 0 <= s < final_step]
    if bad or len(set(steps)) != len(steps):
        raise ValueError(f"{owner}: snapshots must be (step, model) pairs with distinct steps in "
                         f"[0, final_step={final_step}); got steps {steps}. Pass the snapshots "
                         "taken before the analysed model.")
    return sorted(snapshots, key=lambda pair: pair[0])


def saturation_over_training(final_indices_TLK: np.ndarray, snapshots: Sequence[tuple[int, Any]],
                             stream: list, *, n_experts: int, final_step: int,
                             source: str = "auto", progress: bool = False) -> dict[str, Any]:
    """The routing saturation curve (module docstring) of ``snapshots`` against the final model.

    Args:
        final_indices_TLK: the final model's routing of ``stream`` (a recording's indices).
        snapshots: ``(step, model)`` pairs, the model a module or a saved model folder (loaded
            one at a time); steps in [0, final_step).
        stream: the batches ``final_indices_TLK`` recorded, in the same order.
        n_experts: E. final_step: the final model's step, the curve's last point (overlap 1).
        source: how the routing is read (:func:`~moekit.analysis.layer_recorder.record_layers`).

    Returns:
        JSON-ready: ``steps`` (S, the final step last), ``snapshots`` (their names: a folder's
        own name, or 'step S'; REFERENCE last), ``n_tokens``,
        ``top_k``, ``overlap_SL``, ``top1_agreement_SL``, ``chance_overlap_SL``.

    Example:
        >>> saturation_over_training(rec.indices_TLK, [(0, "runs/lm/snapshots/step_000000")],
        ...                          stream, n_experts=8, final_step=1000)  # doctest: +SKIP
    """
    owner = "saturation_over_training"
    pairs = check_snapshots(owner, snapshots, final_step)
    final_TLK = np.asarray(final_indices_TLK)
    shape = (final_TLK.shape[1], final_TLK.shape[2], n_experts)
    rows: list[Any] = []
    names: list[str] = []
    for step, snapshot in tqdm(pairs, desc="saturation", unit="snapshot", disable=not progress,
                               leave=False):
        folder = isinstance(snapshot, (str, Path))
        name = Path(snapshot).name if folder else f"step {step}"
        model = load_model(snapshot) if folder else snapshot
        rec = record_layers(_checked_module(model, name), stream, source=source,
                            categories=False)
        theirs = (rec.n_layers, rec.top_k, rec.n_experts)
        if theirs != shape or rec.n_tokens != len(final_TLK):
            where = str(snapshot) if folder else name
            raise DataError(Setting("snapshot", where), f" routes (layers, top_k, experts) = "
                            f"{theirs} over {rec.n_tokens} tokens, the final model {shape} over "
                            f"{len(final_TLK)}; give snapshots of the analysed run.")
        rows.append(RoutingOverlap(n_experts).update(rec.indices_TLK, final_TLK).saturation())
        names.append(name)
        del model, rec  # one snapshot's routing at a time
    rows.append(RoutingOverlap(n_experts).update(final_TLK, final_TLK).saturation())
    names.append(REFERENCE)
    return {"reference": REFERENCE, "steps": [step for step, _ in pairs] + [final_step],
            "snapshots": names, "n_tokens": len(final_TLK), "top_k": shape[1],
            **{f"{key}_SL": np.stack([getattr(r, f"{key}_L") for r in rows]).tolist()
               for key in ("overlap", "top1_agreement", "chance_overlap")}}


def _checked_module(model: Any, name: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"saturation_over_training: snapshot {name} must be a torch module or a "
                        f"saved model folder; got {type(model).__name__}.")
    return model
