"""`moekit lm analyze RUN`: what the experts of a `moekit lm train` run do, layer by layer, on its
held-out bytes.

Shape legend: T validation positions analysed, L MoE layers, E experts.

:func:`analyze_lm` loads ``RUN/moe``, rebuilds the run's corpus from the record saved with the
model (a :class:`~moekit.exceptions.DataError` when the bytes or the labels changed), reads
``RUN/history.json`` (both models' validation bits per byte per evaluation, their training losses
and final results), takes ``max_tokens`` positions of the validation split in whole windows
spread evenly over it (:func:`~moekit.runs.lm_routing.corpus_stream`; a position's category is
that of the byte it predicts, as ``ByteCorpus.windows`` gives it) and hands them to
:func:`~moekit.runs.lm_routing.analyze_model`, which writes ``RUN/analysis/`` (replaced whole):
``lm_analysis.json``, ``report.html`` and ``figures/*.png``.

Only the run's model folders, ``history.json`` and the corpus record are read. The snapshots of
the MoE the run kept over training (``RUN/snapshots/step_XXXXXX``: :mod:`.lm_snapshots`) give the
routing saturation curve, each snapshot's top-k overlap with the final routing per layer
(:mod:`.lm_saturation`; ``saturation=False`` skips it); the routing of another seed (or any model
of the same architecture) is compared when given (``compare``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moekit._checks import check_int
from moekit.data.source_text import ByteCorpus, stdlib_corpus, text_corpus
from moekit.exceptions import DataError, Setting
from moekit.io.models import load_model
from moekit.io.records import read_json_file
from moekit.io.run_folder import MANIFEST_FILE, RERUN_FIX, partial_folder, require_manifest
from moekit.nn.lm import MoETransformerLM
from moekit.runs.lm_routing import (
    DEFAULT_ABLATION_TOKENS,
    DEFAULT_MAX_TOKENS,
    analyze_model,
    check_analysis_out,
    check_render_layers,
    corpus_stream,
    mixtral_demo,
)
from moekit.runs.lm_snapshots import list_snapshots

ANALYSIS_DIR = "analysis"
RERUN = "moekit lm train --out {run} --overwrite"
__all__ = ["ANALYSIS_DIR", "DEFAULT_ABLATION_TOKENS", "DEFAULT_MAX_TOKENS", "analyze_lm",
           "analyze_model", "load_lm_model", "mixtral_demo", "read_history", "require_lm_run",
           "run_corpus", "run_record"]


def require_lm_run(run: Path) -> None:
    """A DataError unless ``run`` is a complete `moekit lm train` run folder."""
    if not run.is_dir():
        where = (f"; an interrupted run left its work in {str(partial_folder(run))!r}: finish it "
                 "with `moekit lm train --resume`" if partial_folder(run).is_dir() else "")
        raise DataError(f"no run folder at {str(run)!r}{where}; give the folder `moekit lm "
                        "train` wrote (its ", Setting("out"), ").")
    require_manifest(run, ("lm train",), RERUN.format(run=run))


def load_lm_model(folder: Path, what: str) -> MoETransformerLM:
    """The routed MoETransformerLM saved in ``folder`` (a run's ``moe/``)."""
    model = load_model(folder)
    if not isinstance(model, MoETransformerLM) or model.config.ffn != "moe":
        raise DataError(f"{what} {str(folder)!r} holds a {type(model).__name__}"
                        f"{' with ffn=dense' if isinstance(model, MoETransformerLM) else ''}, "
                        "not a routed MoETransformerLM; give a `moekit lm train` run's moe/.")
    return model


def run_record(model: MoETransformerLM, folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The training options and the corpus record saved with a run's model."""
    saved = getattr(model, "metadata", {}).get("lm_train")
    if not (isinstance(saved, dict) and isinstance(saved.get("options"), dict)
            and isinstance(saved.get("corpus"), dict) and "splits" in saved["corpus"]):
        raise DataError(f"{str(folder)!r}: its config.json metadata has no lm_train options and "
                        f"corpus record, so the data it was trained on is unknown. {RERUN_FIX}")
    return saved["options"], saved["corpus"]


def run_corpus(options: dict[str, Any], record: dict[str, Any],
               data: str | Path | Sequence[str | Path] | None = None) -> ByteCorpus:
    """The run's corpus rebuilt, checked against its record (a DataError when it changed):
    from ``data`` when given ('stdlib' or text paths), else from the record (the standard
    library, or the paths the run was given, else the record's own file list)."""
    sizes = {"max_bytes": record.get("max_bytes"),
             "validation_fraction": record.get("validation_fraction", 0.1)}
    if data is None and record.get("source") == "stdlib":
        data = "stdlib"
    if data is None:
        given = options.get("data")
        given = [given] if isinstance(given, str) else list(given or [])
        if not given or not all(Path(p).is_absolute() and Path(p).exists() for p in given):
            root = Path(str(record.get("root", "")))
            given = [root / name for split in record["splits"].values()
                     for name, _ in split.get("files", [])]
        missing = [str(p) for p in given if not Path(p).exists()]
        if missing:
            raise DataError(f"the run's text file {missing[0]!r} (from its corpus record) is "
                            "gone; pass ", Setting("data"), " the files or folders it was "
                            "trained on.")
        data = given
    corpus = stdlib_corpus(**sizes) if data == "stdlib" else text_corpus(data, **sizes)
    try:
        corpus.check_record(record)
    except DataError as err:
        python = record.get("python")
        hint = (f" The run was trained on Python {python}, this is {sys.version.split()[0]}."
                if python and python != sys.version.split()[0] else "")
        raise DataError(f"the corpus rebuilt for the analysis is not the run's: {err}{hint} "
                        "Pass ", Setting("data"), " the exact text the run was trained on."
                        ) from None
    return corpus


def read_history(run: Path) -> dict[str, Any]:
    """history.json's evaluations, training losses and final results, checked."""
    history = read_json_file("analyze_lm", run / "history.json", fix=RERUN_FIX)
    evals = history.get("evals") if isinstance(history, dict) else None
    keys = ("step", "moe_val_bpb", "dense_val_bpb")
    if not isinstance(evals, list) or not all(isinstance(r, dict) and all(
            isinstance(r.get(k), (int, float)) for k in keys) for r in evals):
        raise DataError(f"{str(run / 'history.json')!r} has no list of evaluations with "
                        f"{', '.join(keys)}. {RERUN_FIX}")
    steps = [{k: r[k] for k in ("step", "moe_loss", "dense_loss")} for r in
             history.get("steps", []) if isinstance(r, dict) and all(
                 isinstance(r.get(k), (int, float)) for k in ("step", "moe_loss", "dense_loss"))]
    final = history.get("final") if isinstance(history.get("final"), dict) else {}
    return {"evals": [{k: r[k] for k in keys} for r in evals], "steps": steps,
            "final": {m: final[m] for m in ("moe", "dense") if isinstance(final.get(m), dict)
                      and isinstance(final[m].get("bpb"), (int, float))}}


def analyze_lm(run: Path | str, *, data: str | Path | Sequence[str | Path] | None = None,
               max_tokens: int | None = DEFAULT_MAX_TOKENS,
               ablation_tokens: int = DEFAULT_ABLATION_TOKENS,
               layers_to_render: Sequence[int] | None = None,
               compare: Sequence[Path | str] = (), saturation: bool = True,
               out: Path | str | None = None, progress: bool = False) -> Path:
    """Analyse the MoE model of a `moekit lm train` run (module docstring) into ``out``
    (default ``RUN/analysis``, replaced whole); returns that folder.

    ``data``: where the run's text is now, when it moved ('stdlib' or paths). ``compare``: other
    runs (or model folders) of the same architecture, e.g. another seed, to measure how far their
    routing agrees. ``saturation``: measure the routing saturation over the run's snapshots
    (none when it kept none). Other arguments: :func:`analyze_model`.

    Example:
        >>> analyze_lm("runs/lm")  # doctest: +SKIP
        PosixPath('runs/lm/analysis')
    """
    run = Path(run)
    require_lm_run(run)
    out = check_analysis_out(run / ANALYSIS_DIR if out is None else out)
    if max_tokens is not None:
        check_int("analyze_lm", "max_tokens", max_tokens, minimum=1)
    model = load_lm_model(run / "moe", "the run's model")
    check_render_layers("analyze_lm", layers_to_render, model.config.n_layers)
    options, record = run_record(model, run / "moe")
    history = read_history(run)
    others = []
    for path in map(Path, compare):
        folder = path / "moe" if (path / MANIFEST_FILE).is_file() else path
        other = load_lm_model(folder, "compare")
        shapes = [(m.config.n_layers, m.config.top_k, m.config.n_experts) for m in (other, model)]
        if shapes[0] != shapes[1]:
            raise DataError(Setting("compare", str(path)), f" has (layers, top_k, experts) = "
                            f"{shapes[0]}, the run {shapes[1]}; compare runs of the same "
                            "architecture (another seed, or a checkpoint of this run).")
        others.append((str(path), other))
    corpus = run_corpus(options, record, data)
    seq_len = options.get("seq_len")
    if type(seq_len) is not int or not 1 <= seq_len <= model.config.max_seq_len:
        raise DataError(f"{str(run / 'moe')!r}: its lm_train options give seq_len={seq_len!r}, "
                        f"not a window length in [1, {model.config.max_seq_len}]. {RERUN_FIX}")
    stream = corpus_stream(corpus, seq_len, max_tokens)
    final = {m: history["final"][m]["bpb"] for m in history["final"]}
    c = model.config
    text = "the Python standard library" if record.get("source") == "stdlib" else "text files"
    steps = history["evals"][-1]["step"] if history["evals"] else len(history["steps"])
    snapshots = [(s.step, s.path) for s in list_snapshots(run)] if saturation else []
    description = (f"The MoE model of {run}: {c.n_layers} layers of {c.n_experts} experts, top-"
                   f"{c.top_k} ({c.router.kind}), width {c.d_model}, trained {steps} steps on "
                   f"{text}; final validation bits per byte: "
                   + ", ".join(f"{m} {v:.4f}" for m, v in final.items()) + ".")
    return analyze_model(model, stream.batches, record.get("categories") or [], out,
                         max_tokens=max_tokens, input_categories_T=stream.input_categories_T,
                         sample=stream.sample, layers_to_render=layers_to_render,
                         ablation_tokens=ablation_tokens, compare=others,
                         snapshots=snapshots, final_step=steps, training=history,
                         title=f"moekit lm analysis: {run.resolve().name}",
                         description=description, progress=progress)
