"""The readings of the vowel experiment that decide its verdict, computed side by side in one run.

Shape legend: R runs.

The paper leaves the step of each system to "a limited exploration" whose values it does not give.
Whether mixtures need half the epochs of backprop nets depends on it, so `moekit vowels` reports:

    (a) own step       every system at its own best step: the paper's stated rule (Table 1);
    (b) common step    every system at one smooth step (``VowelsConfig.common_step``, where the
                       training error falls on almost every epoch for every system);
    (c) sigmoid experts  the smallest mixture with logistic (sigmoid-output) experts, at the step
                       (a) chose for its softmax version and at the common step.

Beside them, the control: a one-expert "mixture", a softmax layer with no gate, in (a) and (b). If
it is as fast as the mixtures, the speed-up over backprop is that of a linear softmax layer over a
sigmoid MLP, not the mixture's.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from moekit.data.vowels import VowelTask
from moekit.experiments.vowels import (
    System,
    SystemResult,
    VowelsConfig,
    control_system,
    run_steps,
    systems_of,
)
from moekit.experiments.vowels_measures import rising_epochs
from moekit.experiments.vowels_summary import TTest, compare_epochs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One system under one reading, compared with the reading's backprop nets (``tests``)."""

    result: SystemResult
    tests: tuple[TTest, ...] = ()

    def to_dict(self) -> dict[str, object]:
        r = self.result
        reached = r.reached_R.astype(bool)
        return {
            "system": r.system.name, "step": r.lr, "edge": r.edge, "runs": len(r.epochs_R),
            "reached": int(reached.sum()),
            "epochs_mean": float(r.epochs_R.mean()), "epochs_sd": _sd(r.epochs_R),
            "train": float(r.train_acc_R.mean()), "test": float(r.test_acc_R.mean()),
            "active_experts": r.active_experts_R.tolist(),
            "figure2_runs": r.partition_R.count("figure 2"),
            "partitions": {k: r.partition_R.count(k) for k in sorted(set(r.partition_R))},
            "vowel_groups": dict(Counter(r.groups_R).most_common()),
            "rising_percent": rising_epochs(r.curves_RT),
            "tests": [dataclasses.asdict(t) for t in self.tests]}


def _sd(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Reading:
    key: str
    title: str
    entries: tuple[Entry, ...]

    def entry(self, name: str, step: float | None = None) -> Entry | None:
        return next((e for e in self.entries if e.result.system.name == name
                     and (step is None or e.result.lr == step)), None)

    def to_dict(self) -> dict[str, object]:
        return {"key": self.key, "title": self.title,
                "entries": [e.to_dict() for e in self.entries]}


def _entries(results: list[SystemResult], nets: list[SystemResult], kind: str
             ) -> tuple[Entry, ...]:
    """Each result compared with every backprop net in ``nets`` (the nets themselves are not)."""
    return tuple(Entry(r, () if r.system.kind == "backprop" else
                       tuple(compare_epochs(r, b, kind) for b in nets)) for r in results)


def readings(config: VowelsConfig, task: VowelTask, own: list[SystemResult],
             control_own: SystemResult | None, *, common: list[SystemResult] | None = None,
             sigmoid: list[SystemResult] | None = None) -> list[Reading]:
    """Reading (a) from the results already run, then (b) and (c), run here (batched per system)
    unless given.

    ``own`` are Table 1's systems at their own best steps; ``control_own`` the one-expert control
    at its own best step (None when there are no mixtures). ``common``: the runs of
    :func:`common_systems` at the common step, in that order; ``sigmoid``: those of
    :func:`sigmoid_runs`, one result per step (:mod:`moekit.experiments.vowels_jobs` runs them
    beside the others).
    """
    nets_a = [r for r in own if r.system.kind == "backprop"]
    extra = [control_own] if control_own is not None else []
    found = [Reading("own_step", "(a) each system at its own best step (the paper's rule)",
                     _entries(own + extra, nets_a, config.t_test))]
    if not config.readings:
        return found
    step = config.common_step
    if common is None:
        control = control_own.system if control_own is not None else None
        common = [run_steps(s, task, config, (step,))[0]
                  for s in common_systems(config, control)]
    nets_b = [r for r in common if r.system.kind == "backprop"]
    found.append(Reading("common_step", f"(b) every system at one smooth step ({step:g})",
                         _entries(common, nets_b, config.t_test)))
    plan = sigmoid_runs(config, own)
    if plan is not None:
        if sigmoid is None:
            sigmoid = run_steps(plan[0], task, config, plan[1])
        found.append(Reading(
            "sigmoid_experts", "(c) sigmoid experts, at the softmax mixture's step of (a) and at "
            "the common step",
            tuple(e for r in sigmoid for e in _entries(
                [r], nets_b if r.lr == step else nets_a, config.t_test))))
    return found


def common_systems(config: VowelsConfig, control: System | None) -> list[System]:
    """Reading (b)'s systems, each run at the common step: Table 1's, then the control."""
    return systems_of(config) + ([control] if control is not None else [])


def sigmoid_runs(config: VowelsConfig, own: list[SystemResult]
                 ) -> tuple[System, tuple[float, ...]] | None:
    """Reading (c): the smallest mixture of ``own`` with sigmoid experts, and its steps (the one
    (a) chose for the softmax version, and the common step); None without mixtures. Whether
    logistic experts split does not need both sizes."""
    mixtures = [r for r in own if r.system.kind == "mixture"]
    if not mixtures:
        return None
    mixture = min(mixtures, key=lambda r: r.system.size)
    system = dataclasses.replace(mixture.system, expert_head="sigmoid")
    return system, tuple(sorted({mixture.lr, config.common_step}))


def control_of(config: VowelsConfig) -> System | None:
    """The one-expert control, where there are mixtures to compare it with."""
    return control_system(config) if config.experts else None


def entry_cells(entry: Entry) -> list[str]:
    """One row of a readings table: the system, its step, reached, epochs, accuracies, active
    experts (mean and range over runs), Figure 2 runs, rising epochs, and the comparisons."""
    r = entry.result
    active = r.active_experts_R
    sd = r.epochs_R.std(ddof=1) if len(r.epochs_R) > 1 else 0.0
    tests = "; ".join(
        f"{t.ratio:.2f}x {t.backprop} (t {t.t:.1f}, p {t.p_less:.2g})"
        + ("" if t.complete else ", runs missed") for t in entry.tests)
    return [r.system.name, f"{r.lr:g}" + ("*" if r.edge else ""),
            f"{int(r.reached_R.sum())}/{len(r.reached_R)}", f"{r.epochs_R.mean():.0f} +- {sd:.0f}",
            f"{r.train_acc_R.mean():.1f}", f"{r.test_acc_R.mean():.1f}",
            f"{active.mean():.1f} ({active.min()}-{active.max()})",
            f"{r.partition_R.count('figure 2')}/{len(r.partition_R)}",
            f"{rising_epochs(r.curves_RT):.0f}%", tests or "-"]


HEADERS = ["System", "step", "reached", "epochs (mean +- SD)", "train %", "test %",
           "active experts (min-max)", "Figure 2 runs", "rising", "backprop needs (vs each net)"]


def format_readings(found: list[Reading]) -> str:
    """The readings as plain text, one block per reading."""
    lines = ["Readings: each system's epochs to the criterion, beside what backprop needs; "
             "t-tests one-sided, " + next((f"{e.tests[0].kind} variance"
                                           for r in found for e in r.entries if e.tests), "")]
    for reading in found:
        rows = [entry_cells(e) for e in reading.entries]
        widths = [max(len(str(c)) for c in col) for col in zip(HEADERS[:-1], *[
            row[:-1] for row in rows], strict=True)]
        lines += ["", reading.title]
        lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=False)))
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True))
                  + "  " + row[-1] for row in rows]
    lines.append("active: experts with mean mixing proportion >= 1%; Figure 2 runs: [i]/[I] to "
                 "one expert, [a]/[Λ] to two, the others inactive; rising: % of epochs on which "
                 "the training error went up; * a step at the edge of the grid explored.")
    return "\n".join(lines)
