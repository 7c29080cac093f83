"""`moekit vowels-sweep`: how the mixture divides the four vowels over what the paper leaves open.

Shape legend: N rows, D = 2 input features, E experts, O = 4 outputs, R runs.

At the protocol's steps (:mod:`moekit.experiments.vowels`) the experts rarely divide the vowels as
the paper's Figure 2 does ([i]/[I] to one expert, [a]/[Λ] to two others, the fourth inactive). This
sweep measures how often that partition appears at the stopping point over the settings the paper
does not state, every combination of four knobs (``SweepConfig``):

- ``init_scales``: the experts' initial weights and biases are drawn as ``System.build`` draws them
  (nn.Linear's fan-in range, seed ``run_seed(seed, r)``) and then multiplied by the scale; the gate
  keeps the protocol's unbiased start (zero weights: equal mixing proportions);
- ``steps``: the fixed gradient-descent step (full batch, no momentum, Eq. 3);
- ``heads``: the experts' head ('softmax' over the 4 classes, the paper's; 'sigmoid': 4 units);
- ``gate_input_scales``: the gate sees s * x while the experts see x (:class:`GateScaledMixture`):
  from the zero start the same function as at s = 1, but gradient descent moves the gate's input
  weights s^2 times as fast (in function space), its biases and the experts as fast.

Runs stop at ``criterion`` (squared error per output unit) or ``max_epochs``. Settings sharing a
head and a gate scale are one batch (:func:`~moekit.fitting.replicates.train_replicates`), each run
with its own step; run r of every setting starts from the same draw before scaling. Each setting
reports active experts (mean proportion >= 1%) and each run's partition; the first 'figure 2' run
(in sweep order) draws the Figure 2 and 3 analogues, titled with its setting.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from moekit._checks import check_choice, check_int, check_matrix, check_positive_float
from moekit._version import __version__
from moekit.data.vowels import VowelTask, vowel_task
from moekit.experiments.vowels import System, run_seed, snapshot_epochs
from moekit.experiments.vowels_measures import PARTITIONS, partition_kind, vowel_groups
from moekit.experiments.vowels_models import FEATURE_NAMES
from moekit.fitting.replicates import ReplicateConfig, ReplicateResult, train_replicates
from moekit.io.files import jsonable, write_text_atomic
from moekit.nn.dense import MixtureOfExperts
from moekit.nn.dispatch import blend
from moekit.nn.experts import apply_head
from moekit.nn.outputs import MoEOutput
from moekit.plotting import expert_decision_lines, plot_lines_over_time, plot_partition, save_figure
from moekit.plotting.expert_lines import INACTIVE_PROPORTION, active_experts

HEADS = ("softmax", "sigmoid", "identity")
FIGURE2, FIGURE3 = "figure2_split_run.png", "figure3_split_run.png"
DIVERGED = "diverged"  # a run whose loss became NaN or inf: no partition to speak of
TABLE_HEADER = ("| setting | reached | mean epochs | active experts: mean (per run) | partitions "
                "at the stopping point | most common groups | train % | test % |\n|" + "---|" * 8)


@dataclass(frozen=True)
class SweepConfig:
    """What `moekit vowels-sweep` runs: every combination of the four knobs, ``runs`` runs each.

    Example:
        >>> SweepConfig(steps=())
        Traceback (most recent call last):
        ...
        ValueError: SweepConfig: steps must hold one value or more, none repeated; got steps=().
    """

    runs: int = 10
    experts: int = 4
    init_scales: tuple[float, ...] = (0.3, 1.0, 3.0)
    steps: tuple[float, ...] = (1.0, 4.0, 11.3137)
    heads: tuple[str, ...] = ("softmax", "sigmoid")
    gate_input_scales: tuple[float, ...] = (1.0, 10.0)
    max_epochs: int = 5000
    criterion: float = 0.08
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        owner = "SweepConfig"
        check_int(owner, "runs", self.runs, minimum=1)
        check_int(owner, "experts", self.experts, minimum=1)
        for name in ("init_scales", "steps", "heads", "gate_input_scales"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{owner}: {name} must hold one value or more, none repeated; "
                                 f"got {name}={values}.")
            for value in values:
                (check_choice(owner, name, value, HEADS) if name == "heads"
                 else check_positive_float(owner, name, value))
        check_int(owner, "max_epochs", self.max_epochs, minimum=1)
        check_positive_float(owner, "criterion", self.criterion)
        check_int(owner, "seed", self.seed, minimum=0)

    def settings(self) -> list[Setting]:
        """Every combination in sweep order: head, gate scale (one batch each), init, step."""
        return [Setting(i, s, h, g) for h, g, i, s in itertools.product(
            self.heads, self.gate_input_scales, self.init_scales, self.steps)]


def quick_sweep(**overrides: object) -> SweepConfig:
    """A debug-sized sweep (seconds): 2 runs, one init scale, one step, 200 epochs."""
    base = {"runs": 2, "init_scales": (1.0,), "steps": (8.0,), "max_epochs": 200}
    return SweepConfig(**{**base, **overrides})


@dataclass(frozen=True)
class Setting:
    """One point of the sweep.

    Example:
        >>> Setting(3.0, 11.3137, "softmax", 10.0).label
        'init x3, step 11.3, softmax experts, gate input x10'
    """

    init_scale: float
    step: float
    head: str
    gate_input_scale: float

    @property
    def label(self) -> str:
        return (f"init x{self.init_scale:g}, step {self.step:.3g}, {self.head} experts, "
                f"gate input x{self.gate_input_scale:g}")


class GateScaledMixture(MixtureOfExperts):
    """A mixture whose gate sees s * x (logits W (s x) + b) while its experts see x; same
    parameters and state-dict keys as :class:`MixtureOfExperts`, s fixed.

    Example:
        >>> moe = GateScaledMixture(2, 4, 3, gate_input_scale=10.0)
        >>> x = torch.randn(5, 2)
        >>> torch.allclose(moe(x).routing.logits_NE, (10 * x) @ moe.gate.w_DE + moe.gate.b_E)
        True
    """

    def __init__(self, in_features: int, out_features: int, n_experts: int, *,
                 gate_input_scale: float, **options: object) -> None:
        super().__init__(in_features, out_features, n_experts, **options)
        self.gate_input_scale = check_positive_float("GateScaledMixture", "gate_input_scale",
                                                     gate_input_scale)

    @classmethod
    def wrap(cls, model: MixtureOfExperts, gate_input_scale: float) -> GateScaledMixture:
        """``model``'s weights, with the gate seeing ``gate_input_scale`` * x."""
        config = model.config
        scaled = cls(config.in_features, config.out_features, config.n_experts,
                     gate_input_scale=gate_input_scale, expert=config.expert, gate=config.gate,
                     generator=torch.Generator())  # weights replaced below; global RNG untouched
        scaled.to(next(model.parameters()).dtype).load_state_dict(model.state_dict())
        return scaled

    def forward(self, x_ND: Tensor) -> MoEOutput:
        check_matrix(type(self).__name__, "x", x_ND, n_columns=self.config.in_features)
        routing = self.gate(self.gate_input_scale * x_ND)
        logits_NEO = self.experts(x_ND)
        outputs_NEO = apply_head(self.head, logits_NEO)
        return MoEOutput(output=blend(routing, outputs_NEO), routing=routing,
                         aux_loss=x_ND.new_zeros(()), expert_outputs=outputs_NEO,
                         expert_logits=logits_NEO)


def plain_state(state: dict[str, Tensor], gate_input_scale: float) -> dict[str, Tensor]:
    """The plain :class:`MixtureOfExperts` state computing the same function (gate weights x s)."""
    return {k: v * gate_input_scale if k == "gate.w_DE" else v for k, v in state.items()}


def plain_mixture(model: MixtureOfExperts) -> MixtureOfExperts:
    """``model`` as a plain :class:`MixtureOfExperts` (itself when it is one)."""
    if not isinstance(model, GateScaledMixture):
        return model
    plain = MixtureOfExperts.from_config(model.config, generator=torch.Generator()).to(
        next(model.parameters()).dtype)
    plain.load_state_dict(plain_state(model.state_dict(), model.gate_input_scale))
    return plain


def build_model(config: SweepConfig, setting: Setting, run: int) -> MixtureOfExperts:
    """Run ``run``'s start: the protocol's draw (zero gate), experts' weights x init scale, gate
    scale applied (a plain mixture when it is 1: the fast engine)."""
    system = System("mixture", config.experts, "eq3", setting.head, "zero")
    model = system.build(torch.Generator().manual_seed(run_seed(config.seed, run)), torch.float32)
    with torch.no_grad():
        for p in model.experts.parameters():
            p.mul_(setting.init_scale)
    scale = setting.gate_input_scale
    return model if scale == 1.0 else GateScaledMixture.wrap(model, scale)


@dataclass
class SweepRow:
    """One setting's runs, measured at their stopping point (diverged runs: None)."""

    setting: Setting
    runs: int
    reached: int
    diverged: int
    mean_epochs: float | None  # of the runs that reached the criterion
    active_experts: float | None
    partitions: dict[str, int]  # partition_kind -> runs
    top_groups: list[tuple[str, int]]  # the two most common vowel_groups, with their runs
    train_acc: float | None
    test_acc: float | None
    epochs_R: list[int]
    active_experts_R: list[int | None]
    partition_R: list[str]
    groups_R: list[str]


# The divisions a split run is drawn from, most faithful first.
SPLITS = ("figure 2", "figure 2, more active")


@dataclass
class SplitRun:
    """The first run split as Figure 2 (else with more experts active), with its snapshots."""

    setting: Setting
    run: int
    epochs: int
    groups: str
    partition: str
    model: MixtureOfExperts = field(repr=False)
    snapshots: list[tuple[int, dict[str, Tensor]]] = field(repr=False)


@dataclass
class SweepResult:
    """Every setting's row in sweep order, the Figure 2 run (if any), the wall time."""

    config: SweepConfig
    rows: list[SweepRow]
    split: SplitRun | None
    seconds: float


@torch.no_grad()
def _measure(model: MixtureOfExperts, task: VowelTask) -> tuple[int | None, str, str, float, float]:
    """(active experts, partition, groups, train %, test %) of one run at its stopping point."""
    x_train, x_test = task.x_train.float(), task.x_test.float()
    out = model(x_train)
    if not bool(torch.isfinite(out.output).all()):
        return None, DIVERGED, DIVERGED, float("nan"), float("nan")
    active = int((out.routing.probs_NE.mean(0) >= INACTIVE_PROPORTION).sum())
    train = float((out.output.argmax(-1) == task.y_train).double().mean()) * 100
    test = float((model(x_test).output.argmax(-1) == task.y_test).double().mean()) * 100
    return (active, partition_kind(model, x_train, task.y_train),
            vowel_groups(model, x_train, task.y_train), train, test)


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _row(setting: Setting, models: list[MixtureOfExperts], result: ReplicateResult, part: slice,
         task: VowelTask) -> SweepRow:
    """A setting's row from its runs, the batch's ``part``."""
    active, partition, groups, train, test = zip(*(_measure(m, task) for m in models), strict=True)
    counts, reached_R = Counter(partition), result.reached_R[part]
    epochs_R = [int(e) for e in result.epochs_R[part]]
    return SweepRow(
        setting=setting, runs=len(models), reached=int(reached_R.sum()),
        diverged=int(result.diverged_R[part].sum()), active_experts=_mean(list(active)),
        mean_epochs=_mean([e for e, ok in zip(epochs_R, reached_R, strict=True) if ok]),
        partitions={k: counts[k] for k in (*PARTITIONS, DIVERGED) if counts[k]},
        top_groups=Counter(g for g in groups if g != DIVERGED).most_common(2),
        train_acc=_mean(list(train)), test_acc=_mean(list(test)),
        epochs_R=epochs_R, active_experts_R=list(active),
        partition_R=list(partition), groups_R=list(groups))


def run_sweep(config: SweepConfig, task: VowelTask | None = None) -> SweepResult:
    """Train every setting's runs (one batch per head and gate scale), measure them, and keep the
    first split run (:data:`SPLITS` order) with its snapshots, else None.

    Runs are snapshotted in their batch, not retrained alone: float32 sums depend on the batch
    size, and at oscillating steps a run trained alone can end in another partition.
    """
    start = time.perf_counter()
    task = task or vowel_task()
    replicate = ReplicateConfig(loss="eq3", max_epochs=config.max_epochs, stop_metric="mse",
                                stop_threshold=config.criterion, progress=config.progress)
    track_epochs = snapshot_epochs(config.max_epochs)
    rows: list[SweepRow] = []
    splits: dict[str, SplitRun] = {}
    for head, scale in itertools.product(config.heads, config.gate_input_scales):
        batch = [s for s in config.settings() if (s.head, s.gate_input_scale) == (head, scale)]
        models = [build_model(config, s, r) for s in batch for r in range(config.runs)]
        lrs = [s.step for s in batch for _ in range(config.runs)]
        result = train_replicates(models, task.x_train.float(), task.y_train, lrs, replicate,
                                  track=range(len(models)), track_epochs=track_epochs,
                                  description=f"{head} experts, gate input x{scale:g}")
        for g, s in enumerate(batch):
            part = slice(g * config.runs, (g + 1) * config.runs)
            rows.append(row := _row(s, models[part], result, part, task))
            for kind in SPLITS:
                if kind not in splits and kind in row.partition_R:
                    r = row.partition_R.index(kind)
                    splits[kind] = SplitRun(s, r, row.epochs_R[r], row.groups_R[r], kind,
                                            models[part][r], result.snapshots[part.start + r])
    split = next((splits[k] for k in SPLITS if k in splits), None)
    return SweepResult(config, rows, split, time.perf_counter() - start)


def split_figures(split: SplitRun, task: VowelTask) -> tuple[Figure, Figure]:
    """The Figure 2 and 3 analogues of the split run, titled with its setting (drawn from the plain
    mixture computing the same function)."""
    x_N2, y_N = task.x_train.numpy(), task.y_train.numpy()
    model = plain_mixture(split.model)
    inactive = [str(e) for e, a in enumerate(active_experts(model, x_N2)) if not a]
    name = f"({model.config.n_experts} experts): {split.setting.label}, run {split.run}"
    fig2 = plot_partition(
        model, x_N2, y_N, task.labels, feature_names=FEATURE_NAMES, soft=False,
        lines=expert_decision_lines(model, x_N2, y_N, task.labels),
        title=f"Figure 2 analogue {name}, epoch {split.epochs}",
        note=f"partition: {split.partition} ({split.groups}); inactive experts (mean proportion "
             f"< 1%): {', '.join(inactive) if inactive else 'none'}")
    scale = split.setting.gate_input_scale
    snapshots = [(epoch, plain_state(state, scale)) for epoch, state in split.snapshots]
    fig3 = plot_lines_over_time(model, snapshots, x_N2, y_N, task.labels,
                                axis_labels=FEATURE_NAMES)
    fig3.suptitle(f"Figure 3 analogue {name}: each expert's decision line over training",
                  fontsize=11)
    return fig2, fig3


def _shown(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: SweepResult) -> str:
    """The rows as a markdown table, then how often the Figure 2 partition appeared and where the
    figures come from."""
    lines = [TABLE_HEADER]
    for row in result.rows:
        per_run = " ".join("-" if a is None else str(a) for a in row.active_experts_R)
        groups = "; ".join("`" + g.replace("|", "\\|") + f"` x{n}" for g, n in row.top_groups)
        lines.append(" | ".join([
            f"| {row.setting.label}",
            f"{row.reached}/{row.runs}" + (f" ({row.diverged} diverged)" if row.diverged else ""),
            _shown(row.mean_epochs, ".0f"), f"{_shown(row.active_experts, '.1f')} ({per_run})",
            ", ".join(f"{k} {n}" for k, n in row.partitions.items()), groups or "-",
            _shown(row.train_acc, ".1f"), _shown(row.test_acc, ".1f") + " |"]))
    total = sum(row.runs for row in result.rows)
    notes = [""]
    for kind in SPLITS:
        found = [(row, n) for row in result.rows if (n := row.partitions.get(kind, 0))]
        notes.append(f"'{kind}' ([i]/[I] to one expert, [a]/[Λ] to two others"
                     + (", no other expert active" if kind == "figure 2" else "") + "): "
                     f"{sum(n for _, n in found)} of {total} runs"
                     + (": " + "; ".join(f"{row.setting.label} ({n}/{row.runs})"
                                         for row, n in found) if found else "."))
    split = result.split
    notes.append("No run divided the vowels as Figure 2: no Figure 2 or 3 analogue drawn."
                 if split is None else f"Figures 2-3 analogues ('{split.partition}'): "
                 f"{split.setting.label}, run {split.run} (stopped at epoch {split.epochs}; "
                 f"groups {split.groups}).")
    config = result.config
    notes.append(f"Criterion {config.criterion} per output unit, cap {config.max_epochs} epochs; "
                 f"active: mean proportion >= 1%. Ran in {result.seconds:.0f} s.")
    return "\n".join(lines + notes)


def _record(result: SweepResult, files: dict[str, Path]) -> dict[str, object]:
    """sweep.json: the config, every row (with its label), the Figure 2 run, the files."""
    rows = [{"label": row.setting.label, **dataclasses.asdict(row)} for row in result.rows]
    return jsonable({
        "moekit_version": __version__, "seconds": round(result.seconds, 2),
        "config": dataclasses.asdict(result.config), "rows": rows,
        "split_run": None if (split := result.split) is None else {
            "label": split.setting.label, "setting": dataclasses.asdict(split.setting),
            "run": split.run, "epochs": split.epochs, "groups": split.groups,
            "partition": split.partition},
        "files": {k: v.name for k, v in files.items()}})  # inside the run folder


def write_sweep(config: SweepConfig, out: Path | str, task: VowelTask | None = None
                ) -> tuple[str, list[Path]]:
    """Run :func:`run_sweep`; write ``sweep.json``, ``sweep.md`` (the table) and, when a run split
    as Figure 2, the two figures into ``out``; return the table with its notes, and the files."""
    task = task or vowel_task()
    result = run_sweep(config, task)
    out, files = Path(out), {}
    if result.split is not None:
        fig2, fig3 = split_figures(result.split, task)
        files["figure2"] = save_figure(fig2, out / FIGURE2)
        files["figure3"] = save_figure(fig3, out / FIGURE3)
    text = format_table(result)
    write_text_atomic(files.setdefault("table", out / "sweep.md"), text + "\n")
    files["json"] = out / "sweep.json"
    write_text_atomic(files["json"], json.dumps(_record(result, files), indent=2))
    return text, list(files.values())
