"""The mixtures a `moekit vowels` run saves (run 0 and run 1 of each size at its chosen step, and
the tracked run's routing over training), and reading them back for `moekit analyze`: results.json
names them, and every name and path it gives is checked to stay inside the run folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.data.vowels import VOWEL_LABELS, VowelTask, vowel_task
from moekit.exceptions import DataError
from moekit.experiments.vowels import SystemResult, VowelsConfig
from moekit.fitting.history import History
from moekit.io.files import write_text_atomic
from moekit.io.models import load_model, save_model
from moekit.io.paths import inside, plain_name
from moekit.io.records import read_json_file
from moekit.io.run_folder import RERUN_FIX, require_manifest
from moekit.nn.dense import MixtureOfExperts

if TYPE_CHECKING:
    from moekit.reports.analysis import AnalysisInput

MODELS_DIR, ANALYSIS_DIR, HISTORY_FILE = "models", "analysis", "routing_history.json"
RESULTS_FILE = "results.json"
FEATURE_NAMES = ("F1 (kHz)", "F2 (kHz)")


def save_vowels_models(results: list[SystemResult], config: VowelsConfig, out: Path,
                       task: VowelTask) -> dict[str, object]:
    """Save run 0 of each mixture at its chosen step (and run 1, to compare routing across runs)
    into ``out/models/``; the tracked run also gets its routing over training. Returns the record
    that results.json keeps under "analysis" (what :func:`load_vowels_run` reads back)."""
    task_options = {"split": "train", "include_speaker_76": config.include_speaker_76}
    models = []
    for r in results:
        if r.system.kind != "mixture":
            continue
        name = f"{r.system.size}_experts"
        for run in range(min(2, len(r.models))):
            folder = name if run == 0 else f"{name}_run{run}"
            save_model(r.models[run], out / MODELS_DIR / folder, metadata={"vowels": {
                "system": r.system.name, "run": run, "lr": r.lr,
                "epochs": int(r.epochs_R[run]), "class_names": list(VOWEL_LABELS),
                "feature_names": list(FEATURE_NAMES), **task_options}})
        entry = {"name": name, "system": r.system.name, "run": 0, "lr": r.lr,
                 "path": f"{MODELS_DIR}/{name}",
                 "reference": f"{MODELS_DIR}/{name}_run1" if len(r.models) > 1 else None,
                 "history": None}
        if r.snapshots:
            entry["history"] = f"{MODELS_DIR}/{name}/{HISTORY_FILE}"
            write_text_atomic(out / entry["history"],
                              json.dumps(_routing_history(r, config, task), indent=1))
        models.append(entry)
    return {**task_options, "models": models}


def _routing_history(result: SystemResult, config: VowelsConfig, task: VowelTask
                     ) -> list[dict[str, float]]:
    """Load and entropy of the tracked run at each snapshot epoch, on the training set."""
    # imported here: moekit.analysis imports SciPy (0.6 s), which the workers of `moekit vowels`
    # that only train do not need (this runs in the 'analysis' job)
    from moekit.analysis.over_training import routing_summary

    frame = MixtureOfExperts.from_config(result.models[0].config).to(config.torch_dtype)
    x = task.x_train.to(config.torch_dtype)
    records = []
    for epoch, state in result.snapshots:
        frame.load_state_dict(state)
        summary = routing_summary(frame, x)
        records.append({"epoch": epoch, **{f"routing_{k}": v for k, v in summary.items()}})
    return records


@dataclass(frozen=True)
class SavedModel:
    """One saved mixture of a vowels run, its paths checked to be inside the run folder."""

    name: str
    path: Path
    reference: Path | None
    history: Path | None
    system: str
    run: int
    lr: float


def saved_models(run_dir: Path | str) -> dict[str, Any]:
    """The record of the saved mixtures in a complete `moekit vowels` run folder (results.json's
    "analysis"), as written; :func:`checked_models` checks it."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"load_vowels_run: no results.json in {str(run_dir)!r}; run "
                                f"`moekit vowels --out {run_dir}` first.")
    require_manifest(run_dir, ("vowels",), f"moekit vowels --out {run_dir}")
    record = read_json_file("load_vowels_run", path, fix=RERUN_FIX)
    saved = record.get("analysis") if isinstance(record, dict) else None
    if not saved:
        raise DataError(f"{str(path)!r} lists no saved models (a run from an older moekit); run "
                        "`moekit vowels` again.")
    return saved


def _field(value: Any, ok: bool, source: Path, field: str, want: str) -> Any:
    """``value`` if ``ok``, else a :class:`DataError` naming the file and the field."""
    if not ok:
        raise DataError(f"{field} in {str(source)!r} must be {want}; got {value!r}.")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checked_models(saved: Any, run_dir: Path, source: Path) -> list[SavedModel]:
    """The saved mixtures ``saved`` (results.json's "analysis") lists, every field checked: names
    plain, paths inside ``run_dir`` (no ``..``, no absolute path, no link out)."""
    _field(saved, isinstance(saved, dict), source, "analysis", "an object")
    models = _field(saved.get("models"), isinstance(saved.get("models"), list), source,
                    "analysis.models", "a list")
    checked = []
    for i, e in enumerate(models):
        at = f"analysis.models[{i}]"
        _field(e, isinstance(e, dict), source, at, "an object")

        def path(key: str, e: dict = e, at: str = at) -> Path | None:
            return None if e.get(key) is None else inside(run_dir, e[key], source=source,
                                                          field=f"{at}.{key}")

        checked.append(SavedModel(
            name=plain_name(e.get("name"), source=source, field=f"{at}.name"),
            path=inside(run_dir, e.get("path"), source=source, field=f"{at}.path"),
            reference=path("reference"), history=path("history"),
            system=_field(e.get("system"), isinstance(e.get("system"), str), source,
                          f"{at}.system", "text"),
            run=_field(e.get("run"), _number(e.get("run")) and float(e["run"]).is_integer(),
                       source, f"{at}.run", "a whole number"),
            lr=_field(e.get("lr"), _number(e.get("lr")), source, f"{at}.lr", "a number")))
    return checked


def load_vowels_run(run_dir: Path | str, *, task: VowelTask | None = None,
                    saved: dict[str, object] | None = None) -> list[AnalysisInput]:
    """The saved mixtures of a `moekit vowels` run folder, each with the data to analyse it on
    (the vowel task rebuilt as the run used it), ready for
    :func:`moekit.reports.analysis.analyze_input`. Without ``saved`` the folder must be a complete
    run (its manifest written); the record's names and paths must stay inside the folder.

    Example:
        >>> for item in load_vowels_run("runs/vowels"):            # doctest: +SKIP
        ...     analyze_input(item, "runs/vowels/analysis")
    """
    # imported here: moekit.reports.analysis imports SciPy and matplotlib (1 s), which the
    # workers of `moekit vowels` that only train do not need
    from moekit.reports.analysis import AnalysisInput

    run_dir = Path(run_dir)
    saved = saved_models(run_dir) if saved is None else saved
    source = run_dir / RESULTS_FILE
    models = checked_models(saved, run_dir, source)
    split = _field(saved.get("split"), saved.get("split") in ("train", "test"), source,
                   "analysis.split", "'train' or 'test'")
    task = task or vowel_task(include_speaker_76=bool(saved.get("include_speaker_76")))
    x, y = (task.x_train, task.y_train) if split == "train" else (task.x_test, task.y_test)
    items = []
    for entry in models:
        model = load_model(entry.path)
        dtype = next(model.parameters()).dtype
        reference = load_model(entry.reference) if entry.reference else None
        history = None
        if entry.history:
            records = read_json_file("load_vowels_run", entry.history, fix=RERUN_FIX)
            history = History(_field(records, isinstance(records, list), entry.history,
                                     "the routing history", "a list of records"))
        items.append(AnalysisInput(
            name=entry.name, model=model, x=x.to(dtype), y=y, class_names=task.labels,
            feature_names=FEATURE_NAMES, reference=reference, reference_name="run 1",
            history=history,
            description=f"{entry.system}, run {entry.run} at step {entry.lr:g}, on the "
                        f"{split}ing set ({x.shape[0]} vowels of speakers "
                        f"{'1-50' if split == 'train' else '51-75'})."))
    return items
