"""The mixtures a `moekit vowels` run saves (run 0 and run 1 of each size at its chosen step, and
the tracked run's routing over training), and reading them back for `moekit analyze`."""

from __future__ import annotations

import json
from pathlib import Path

from moekit.analysis.over_training import routing_summary
from moekit.data.vowels import VOWEL_LABELS, VowelTask, vowel_task
from moekit.experiments.vowels import SystemResult, VowelsConfig
from moekit.fitting.history import History
from moekit.io.files import write_text_atomic
from moekit.io.models import load_model, save_model
from moekit.nn.dense import MixtureOfExperts
from moekit.reports.analysis import AnalysisInput

MODELS_DIR, ANALYSIS_DIR, HISTORY_FILE = "models", "analysis", "routing_history.json"
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
    frame = MixtureOfExperts.from_config(result.models[0].config).to(config.torch_dtype)
    x = task.x_train.to(config.torch_dtype)
    records = []
    for epoch, state in result.snapshots:
        frame.load_state_dict(state)
        summary = routing_summary(frame, x)
        records.append({"epoch": epoch, **{f"routing_{k}": v for k, v in summary.items()}})
    return records


def load_vowels_run(run_dir: Path | str, *, task: VowelTask | None = None,
                    saved: dict[str, object] | None = None) -> list[AnalysisInput]:
    """The saved mixtures of a `moekit vowels` run folder, each with the data to analyse it on
    (the vowel task rebuilt as the run used it), ready for
    :func:`moekit.reports.analysis.analyze_input`.

    Example:
        >>> for item in load_vowels_run("runs/vowels"):            # doctest: +SKIP
        ...     analyze_input(item, "runs/vowels/analysis")
    """
    run_dir = Path(run_dir)
    if saved is None:
        path = run_dir / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"load_vowels_run: no results.json in {str(run_dir)!r}; run "
                                    f"`moekit vowels --out {run_dir}` first.")
        saved = json.loads(path.read_text(encoding="utf-8")).get("analysis")
        if not saved:
            raise ValueError(f"load_vowels_run: {str(path)!r} lists no saved models (a run from "
                             "an older moekit); run `moekit vowels` again.")
    task = task or vowel_task(include_speaker_76=bool(saved["include_speaker_76"]))
    x, y = (task.x_train, task.y_train) if saved["split"] == "train" else (task.x_test,
                                                                             task.y_test)
    items = []
    for entry in saved["models"]:
        model = load_model(run_dir / entry["path"])
        dtype = next(model.parameters()).dtype
        reference = load_model(run_dir / entry["reference"]) if entry["reference"] else None
        history = None
        if entry["history"]:
            history = History(json.loads((run_dir / entry["history"]).read_text("utf-8")))
        items.append(AnalysisInput(
            name=entry["name"], model=model, x=x.to(dtype), y=y, class_names=task.labels,
            feature_names=FEATURE_NAMES, reference=reference, reference_name="run 1",
            history=history,
            description=f"{entry['system']}, run {entry['run']} at step {entry['lr']:g}, on the "
                        f"{saved['split']}ing set ({x.shape[0]} vowels of speakers "
                        f"{'1-50' if saved['split'] == 'train' else '51-75'})."))
    return items
