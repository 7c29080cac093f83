"""A verdict on each of the paper's claims, worded from the numbers of the run and saying under
which reading (:mod:`moekit.experiments.vowels_readings`) each number holds.

Thresholds: "about half the epochs" is a backprop/mixture epoch ratio of at least 1.5 in every
comparison, each significant at p < 0.001 (the paper: t-tests with p > 0.999 for the reverse), with
every run of both systems at the criterion. An accuracy is the paper's within 4 points; systems
have "the same accuracy" when their mean accuracies span at most 2 points. The one-expert control
is "as fast as the mixtures" when it needs at most 10% more epochs than the fastest of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moekit.experiments.vowels_measures import PARTITIONS
from moekit.experiments.vowels_readings import Entry, Reading
from moekit.experiments.vowels_summary import Row, TTest
from moekit.plotting.expert_lines import INACTIVE_PROPORTION

ACCURACY_TOLERANCE = 4.0
HALF_RATIO, HALF_P = 1.5, 1e-3
AS_FAST = 1.1
SAME_ACCURACY = 2.0  # points: the largest spread still read as 'the same accuracy'


@dataclass(frozen=True)
class Claim:
    claim: str
    verdict: str  # 'reproduced' | 'partly' | 'not reproduced'
    evidence: str


def _mixtures(reading: Reading) -> list[Entry]:
    """The reading's mixtures of Table 1 (the control, a one-expert layer, is not one)."""
    return [e for e in reading.entries
            if e.result.system.kind == "mixture" and e.result.system.size > 1]


def _nets(reading: Reading) -> list[Entry]:
    return [e for e in reading.entries if e.result.system.kind == "backprop"]


def _control(reading: Reading) -> Entry | None:
    return next((e for e in reading.entries if e.result.system.size == 1
                 and e.result.system.kind == "mixture"), None)


def _epochs(entry: Entry) -> str:
    r = entry.result
    sd = r.epochs_R.std(ddof=1) if len(r.epochs_R) > 1 else 0.0
    return f"{r.epochs_R.mean():.0f} +- {sd:.0f}"


def _halves(tests: Sequence[TTest]) -> bool:
    return bool(tests) and all(t.complete and t.ratio >= HALF_RATIO and t.p_less < HALF_P
                               for t in tests)


def _speed_summary(reading: Reading) -> tuple[list[TTest], str]:
    tests = [t for e in _mixtures(reading) for t in e.tests]
    if not tests:
        return [], ""
    steps = ", ".join(f"{e.result.system.name} {_epochs(e)} at step {e.result.lr:g}"
                      for e in _mixtures(reading) + _nets(reading))
    ts = [t.t for t in tests if np.isfinite(t.t)]
    t_part = (f"{tests[0].kind} t {min(ts):.1f} to {max(ts):.1f}, {tests[0].df:g} df, p <= "
              f"{max(t.p_less for t in tests):.2g}" if ts else "no spread to test")
    missed = "" if all(t.complete for t in tests) else "; some runs missed the criterion"
    return tests, (f"{reading.title}: backprop needs {min(t.ratio for t in tests):.2f}-"
                   f"{max(t.ratio for t in tests):.2f}x the mixtures' epochs ({t_part}{missed}). "
                   f"Epochs: {steps}.")


def speed_claim(readings: Sequence[Reading]) -> Claim | None:
    """Mixtures in about half the epochs of backprop nets, under each reading."""
    summaries = [(r, *_speed_summary(r)) for r in readings if r.key in ("own_step", "common_step")]
    summaries = [(r, tests, text) for r, tests, text in summaries if tests]
    if not summaries:
        return None
    held = [r.key for r, tests, _ in summaries if _halves(tests)]
    verdict = ("reproduced" if "own_step" in held else "partly" if held else "not reproduced")
    where = {"own_step": "under the paper's stated rule, each system at its own best step",
             "common_step": "only with every system at one common smooth step"}
    lead = ("It holds " + " and ".join(where[k] for k in held) + "." if held else
            f"No reading gives a ratio of {HALF_RATIO} or more with p < {HALF_P:g}.")
    return Claim("Mixtures reach the criterion in about half the epochs of backprop nets "
                 "(paper: 1083-1124 vs 2209-2435 epochs, ratio about 2).", verdict,
                 lead + " " + " ".join(text for _, _, text in summaries))


def control_claim(readings: Sequence[Reading]) -> Claim | None:
    """Whether the speed-up is the mixture's, or that of its experts being softmax layers."""
    parts, as_fast = [], []
    for reading in readings:
        control, mixtures = _control(reading), _mixtures(reading)
        if control is None or not mixtures or not control.result.reached_R.all():
            continue
        fastest = min(e.result.epochs_R.mean() for e in mixtures)
        ratio = control.result.epochs_R.mean() / fastest
        as_fast.append(ratio <= AS_FAST)
        over_bp = ", ".join(f"{t.ratio:.2f}x ({t.backprop}"
                            + ("" if t.complete else ", runs missed the criterion") + ")"
                            for t in control.tests)
        parts.append(f"{reading.title}: one softmax layer with no gate needs {_epochs(control)} "
                     f"epochs at step {control.result.lr:g}, {ratio:.2f}x the fastest mixture's "
                     f"{fastest:.0f}; backprop needs {over_bp} the layer's epochs.")
    if not parts:
        return None
    verdict = ("not reproduced" if all(as_fast) else "partly" if any(as_fast) else "reproduced")
    lead = ("A single softmax layer is as fast as the mixtures wherever it was run: the speed-up "
            "over backprop is that of a linear softmax layer over a sigmoid MLP, not the mixture "
            "mechanism's." if all(as_fast) else
            "The mixtures beat a single softmax layer under some readings only." if any(as_fast)
            else "The mixtures beat a single softmax layer under every reading.")
    return Claim("The speed-up comes from the mixture (experts that specialise), not from its "
                 "experts being simpler than a backprop net.", verdict,
                 lead + " " + " ".join(parts))


def _verdict(held: Sequence[bool]) -> str:
    return "reproduced" if held and all(held) else "partly" if any(held) else "not reproduced"


def accuracy_claims(readings: Sequence[Reading]) -> list[Claim]:
    """The paper's accuracies, its "same accuracy for all four systems" and "the test set is
    easier", under each of readings (a) and (b)."""
    per = [(r, m, _nets(r)) for r in readings if r.key in ("own_step", "common_step")
           and (m := _mixtures(r))]
    if not per:
        return []
    close = [max(max(abs(e.result.train_acc_R.mean() - 88.0),
                     abs(e.result.test_acc_R.mean() - 90.0)) for e in m) <= ACCURACY_TOLERANCE
             for _, m, _ in per]
    text = " ".join(f"{r.title}: " + "; ".join(
        f"{e.result.system.name} {e.result.train_acc_R.mean():.1f}% train, "
        f"{e.result.test_acc_R.mean():.1f}% test" for e in m) + "." for r, m, _ in per)
    found = [Claim("Mixtures classify 88% of training and 90% of test tokens at the criterion.",
                   _verdict(close), text + f" (tolerance {ACCURACY_TOLERANCE:.0f} points).")]
    same: list[bool] = []
    easier: list[float] = []  # share of systems with test >= train accuracy, per reading
    same_text, easier_text = [], []
    for reading, mixtures, nets in per:
        if not nets:
            continue
        train = [e.result.train_acc_R.mean() for e in mixtures + nets]
        test = [e.result.test_acc_R.mean() for e in mixtures + nets]
        same.append(max(np.ptp(train), np.ptp(test)) <= SAME_ACCURACY)
        same_text.append(f"{reading.title}: training accuracies span {np.ptp(train):.1f} points, "
                         f"test accuracies {np.ptp(test):.1f}.")
        n = sum(te >= tr for tr, te in zip(train, test, strict=True))
        easier.append(n / len(train))
        easier_text.append(f"{reading.title}: test >= train accuracy for {n} of {len(train)} "
                           "systems.")
    if same:
        found.append(Claim("All four systems have the same accuracy (the misclassified set is "
                           "insensitive to small boundary changes).", _verdict(same),
                           " ".join(same_text) + f" (same: within {SAME_ACCURACY:g} points)."))
        found.append(Claim("The test set is easier than the training set.",
                           "reproduced" if min(easier) == 1 else
                           "partly" if max(easier) > 0 else "not reproduced",
                           " ".join(easier_text)))
    return found


def experts_claim(readings: Sequence[Reading]) -> Claim | None:
    """All but 2 or 3 experts effectively 0, and the Figure 2 partition: reproduced when, at the
    paper's stated rule (a), every mixture has 2-3 active experts on average and most of its runs
    divide the vowels as Figure 2."""
    parts, ok, seen, own_active = [], [], 0, []
    for reading in readings:
        for e in _mixtures(reading):
            r = e.result
            runs = len(r.partition_R)
            figure2 = r.partition_R.count("figure 2")
            seen += figure2
            active = r.active_experts_R.mean()
            if reading.key == "own_step":
                ok.append(2.0 <= active <= 3.0 and figure2 > runs / 2)
                own_active.append(f"{active:.1f} ({r.system.name})")
            kinds = ", ".join(f"{k} {r.partition_R.count(k)}" for k in PARTITIONS
                              if r.partition_R.count(k))
            common = ", ".join(f"'{g}' {n}" for g, n in Counter(r.groups_R).most_common(2))
            parts.append(f"{r.system.name} at step {r.lr:g}: {active:.1f} active experts; "
                         f"{kinds} (of {runs} runs); most often {common}")
    if not parts:
        return None
    verdict = "reproduced" if ok and all(ok) else "partly" if seen else "not reproduced"
    total = sum(len(e.result.partition_R) for r in readings for e in _mixtures(r))
    lead = (f"The Figure 2 partition appeared in {seen} of {total} mixture runs"
            + (f"; at the paper's rule the mixtures keep {', '.join(own_active)} active experts "
               "on average." if own_active else ".") + " ")
    return Claim("All but 2 or 3 experts have mixing proportions that are effectively 0, and the "
                 "experts divide the vowels as Figure 2: [i]/[I] to one expert, [a]/[Λ] to two.",
                 verdict,
                 lead + f"Active: mean mixing proportion >= {INACTIVE_PROPORTION:.0%}; how "
                 "the experts divide the vowels at the stopping point, by primary expert "
                 "(moekit.experiments.vowels_measures), and which vowels each expert takes by "
                 "majority ('|' between experts). " + "; ".join(parts) + ".")


def loss_claims(rows: Sequence[Row], loss_rows: Sequence[Row]) -> list[Claim]:
    """Eq. 3 against Eq. 2 (speed) and Eq. 1 (experts per case), each at its own best step."""
    if not loss_rows:
        return []
    by_name = {r.system: r for r in [*rows, *loss_rows]}
    sizes = sorted({int(r.system.split()[0]) for r in loss_rows})

    def row(size: int, loss: str) -> Row | None:
        return by_name.get(f"{size} Experts" + ("" if loss == "eq3" else f" ({loss})"))

    out = []
    pairs = [(a, b) for s in sizes if (a := row(s, "eq3")) and (b := row(s, "eq2"))]
    if pairs:
        text = "; ".join(f"{a.system}: Eq. 3 {a.epochs:.0f} epochs at step {a.lr:g} vs Eq. 2 "
                         f"{b.epochs:.0f} at step {b.lr:g}" for a, b in pairs)
        faster = sum(a.epochs < b.epochs for a, b in pairs)
        out.append(Claim("Eq. 3 learns faster than Eq. 2.",
                         "reproduced" if faster == len(pairs) else
                         "partly" if faster else "not reproduced",
                         text + " (each at its own best step: Eq. 2's gradient is twice Eq. 3's "
                                "for one expert, so a shared step would favour it)."))
    sized = [(s, t) for s in sizes if all(t := (row(s, "eq1"), row(s, "eq2"), row(s, "eq3")))]
    if sized:
        text = "; ".join(f"{s} experts: Eq. 1 {a.experts_per_case:.2f}, "
                         f"Eq. 2 {b.experts_per_case:.2f}, Eq. 3 {c.experts_per_case:.2f}"
                         for s, (a, b, c) in sized)
        most = sum(a.experts_per_case > max(b.experts_per_case, c.experts_per_case)
                   for _, (a, b, c) in sized)
        out.append(Claim("Eq. 1 (cooperative) uses many experts per case; Eqs. 2-3 use about one.",
                         "reproduced" if most == len(sized) else
                         "partly" if most else "not reproduced",
                         "Effective experts blended per case, exp(entropy of the gate): "
                         + text + "."))
    return out


def grid_claim(readings: Sequence[Reading]) -> Claim | None:
    """Whether every step the exploration chose lies inside its grid."""
    own = next((r for r in readings if r.key == "own_step"), None)
    if own is None:
        return None
    edges = [e.result for e in own.entries if e.result.edge is not None]
    steps = sorted({t.lr for e in own.entries for t in e.result.trials})
    if len(steps) < 2:
        return None
    return Claim("Each system's step comes from inside the grid explored (the paper's limited "
                 "exploration).",
                 "reproduced" if not edges else "not reproduced",
                 f"Grid {steps[0]:g} to {steps[-1]:g} ({len(steps)} steps). " + (
                     "Every chosen step lies inside it." if not edges else
                     "At the grid's edge: " + ", ".join(
                         f"{r.system.name} (step {r.lr:g}, {r.edge} end)" for r in edges)
                     + "; a wider grid could choose another step."))


def claims(readings: Sequence[Reading], rows: Sequence[Row], loss_rows: Sequence[Row]
           ) -> list[Claim]:
    """Every claim this run can check, in the order of the paper's section 3."""
    found = [speed_claim(readings), control_claim(readings), *accuracy_claims(readings),
             experts_claim(readings), *loss_claims(rows, loss_rows), grid_claim(readings)]
    return [c for c in found if c is not None]
