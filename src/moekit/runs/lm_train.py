"""`moekit lm train`: a small byte-level MoE language model and its dense twin of equal active
compute, trained side by side on the same bytes, on CPU, with checkpoints and resume.

Shape legend: B windows per batch, T bytes per window (``seq_len``), V = 256 byte values, C token
categories (:data:`moekit.data.CATEGORIES`).

Both models are :class:`~moekit.nn.lm.MoETransformerLM`: the MoE with routed SwiGLU experts, the
dense twin (``ffn='dense'``) with one SwiGLU MLP of hidden size (K + n_shared) * expert_hidden, so
that both spend the same feed-forward FLOPs per token; their whole forward costs differ by the
routers' 2 * D * E per layer (:meth:`~moekit.nn.lm.LMConfig.costs`, both recorded). Every step
draws one batch from one seeded generator and gives it to both. Weights start from
``torch.Generator().manual_seed(seed)`` (one per model), batches come from ``seed + 1``.

Optimisation (:mod:`.lm_checkpoint`): AdamW, warm-up then cosine decay to lr / 10, nanoGPT's
recipe. The MoE backpropagates its
cross-entropy plus its routers' load-balancing loss (weight 0.01); the history records the
cross-entropies, and the evaluations are cross-entropy alone, in bits per byte.

Evaluation (:mod:`.lm_eval`): every ``eval_every`` steps (and at step 0 and the last step) on a
fixed sample of the validation split; at the end on the whole split, per token category.

The default run's size, measured on this project's 2-core machine on one thread (2048 tokens per
step): a training step takes 0.21 s of CPU for the MoE and 0.17 s for its dense twin. The whole
default run (1000 steps, 11 evaluations of 32 KB, the final one on all 0.6 MB of validation
bytes, 4 MB of stdlib labelled) took 414 s of CPU: 703 s wall at a load average of 5.3-5.5 (it
got 58% of a core), about 7 minutes on a quiet machine. On a busy machine 2 threads were 2-5
times slower than one; the thread rule picks one there.

A run folder holds ``moe/`` and ``dense/`` (:func:`~moekit.io.save_model` folders whose metadata
holds the run's options, the corpus record and the final metrics), ``snapshots/step_XXXXXX/`` (the
MoE every ``snapshot_every`` steps: :mod:`.lm_snapshots`), ``history.json``, ``summary.json`` and
``log.md`` (one table row per evaluation); it is built beside ``out`` and put in place whole
(:func:`~moekit.io.run_folder.run_folder`). Checkpoints: :mod:`.lm_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from moekit.data import ByteCorpus, stdlib_corpus, text_corpus
from moekit.exceptions import DataError, Setting
from moekit.io.files import write_text_atomic
from moekit.io.models import save_model
from moekit.io.run_folder import check_run_destination, run_folder
from moekit.nn.lm import LMConfig
from moekit.nn.routers import ROUTER_KINDS, RouterConfig
from moekit.runs.lm_checkpoint import (
    MODELS,
    RESUME_MAY_CHANGE,
    LMTrainingState,
    StopRequest,
    checkpoint_path,
    new_state,
    read_lm_checkpoint,
    restore_lm_checkpoint,
    save_lm_checkpoint,
    start_or_resume,
    train_step,
)
from moekit.runs.lm_eval import EVAL_BATCH, eval_sample, evaluate
from moekit.runs.lm_snapshots import (
    SNAPSHOT_DIR,
    prune_snapshots,
    save_snapshot,
    snapshot_due,
    snapshot_interval,
)
from moekit.threads import compute_threads

logger = logging.getLogger(__name__)

COMMAND = "lm train"
HISTORY_FILE, SUMMARY_FILE, LOG_FILE = "history.json", "summary.json", "log.md"
NUMBER_RULES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "lr": ("> 0", lambda v: 0 < v < math.inf),
    "weight_decay": (">= 0", lambda v: 0 <= v < math.inf),
    "validation_fraction": ("in (0, 1)", lambda v: 0 < v < 1)}


@dataclasses.dataclass(frozen=True)
class LMTrainConfig:
    """The options of `moekit lm train` (see :func:`train_lm`; :meth:`quick` for a debug size).

    ``data``: 'stdlib' (the Python standard library's source) or the paths of text files or
    folders. ``top_k``: None takes the router kind's default (2; 1 for 'switch'). ``eval_bytes``:
    how much of the validation split each evaluation during training reads (the last reads all).
    ``snapshot_every``: steps between the MoE's snapshots (:mod:`.lm_snapshots`); None: about
    ``steps`` / 8; 0: none.
    ``threads``: None chooses for the work (:func:`moekit.threads.compute_threads`; a resumed run
    keeps the count it ran on, so that it ends bit for bit as the uninterrupted run would).
    """

    out: str = "runs/lm"
    data: str | tuple[str, ...] = "stdlib"
    max_bytes: int | None = 4_000_000
    validation_fraction: float = 0.1
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_experts: int = 8
    top_k: int | None = None
    router: str = "topk"
    expert_hidden: int = 128
    n_shared: int = 0
    max_seq_len: int = 256
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 1000
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    eval_every: int = 100
    eval_bytes: int = 32_768
    checkpoint_every: int = 100
    snapshot_every: int | None = None
    seed: int = 0
    threads: int | None = None
    overwrite: bool = False
    resume: bool = False
    progress: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> LMTrainConfig:
        """A debug-sized run (a few seconds): a 2-layer 32-wide model, 30 steps, 200 KB."""
        base = {"max_bytes": 200_000, "validation_fraction": 0.2, "d_model": 32, "n_layers": 2,
                "n_heads": 2, "n_experts": 4, "expert_hidden": 32, "max_seq_len": 64,
                "seq_len": 64, "batch_size": 4, "steps": 30, "warmup_steps": 3,
                "eval_every": 10, "eval_bytes": 2048, "checkpoint_every": 10,
                "snapshot_every": 10}
        return cls(**{**base, **overrides})

    def model_configs(self) -> dict[str, LMConfig]:
        """The MoE's :class:`~moekit.nn.lm.LMConfig` and its dense twin's, by :data:`MODELS`."""
        moe = LMConfig(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                       max_seq_len=self.max_seq_len, n_experts=self.n_experts,
                       router=RouterConfig(kind=self.router, top_k=self.top_k),
                       expert_hidden=self.expert_hidden, n_shared=self.n_shared)
        return {"moe": moe, "dense": dataclasses.replace(moe, ffn="dense")}


@dataclasses.dataclass(frozen=True)
class LMTrainOutcome:
    """What :func:`train_lm` wrote: ``summary`` (summary.json), ``history`` (history.json) and the
    paths of the run's files."""

    summary: dict[str, Any]
    history: dict[str, Any]
    files: dict[str, Path]


def _bad(name: str, value: Any, rule: str, example: Any) -> DataError:
    return DataError(Setting(name), f" must be {rule}; got ", Setting(name, value),
                     "; pass e.g. ", Setting(name, example), ".")


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_config(config: LMTrainConfig) -> dict[str, LMConfig]:
    """Refuse bad options before any work (a DataError naming the option, the value and the
    fix; the model configs' own ValueErrors for the model sizes); returns the model configs."""
    default = LMTrainConfig()
    for name in ("steps", "batch_size", "seq_len", "max_seq_len", "eval_every", "eval_bytes",
                 "checkpoint_every"):
        if not _is_int(getattr(config, name), 1):
            raise _bad(name, getattr(config, name), "an integer >= 1", getattr(default, name))
    if not _is_int(config.warmup_steps, 0):
        raise _bad("warmup_steps", config.warmup_steps, "an integer >= 0", default.warmup_steps)
    if config.snapshot_every is not None and not _is_int(config.snapshot_every, 0):
        raise _bad("snapshot_every", config.snapshot_every, "an integer >= 0 (0: no snapshots; "
                   "unset: about steps / 8)", 100)
    if config.max_bytes is not None and not _is_int(config.max_bytes, 1):
        raise _bad("max_bytes", config.max_bytes, "an integer >= 1, or None for no cap",
                   default.max_bytes)
    if config.threads is not None and not _is_int(config.threads, 1):
        raise _bad("threads", config.threads, "an integer >= 1, or None to choose", 1)
    for name, (rule, holds) in NUMBER_RULES.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not holds(value):
            raise _bad(name, value, f"a number {rule}", getattr(default, name))
    if config.router not in ROUTER_KINDS:
        raise _bad("router", config.router, f"one of {', '.join(ROUTER_KINDS)}", "topk")
    if config.seq_len > config.max_seq_len:
        raise DataError(Setting("seq_len", config.seq_len), " is longer than the "
                        "model's longest input, ", Setting("max_seq_len", config.max_seq_len),
                        "; pass ", Setting("seq_len", config.max_seq_len), " or less, or ",
                        Setting("max_seq_len", config.seq_len), ".")
    data_paths(config)
    return config.model_configs()


def data_paths(config: LMTrainConfig) -> str | list[str]:
    """'stdlib', or the data paths made absolute; a DataError for a path that does not exist."""
    if config.data == "stdlib":
        return "stdlib"
    given = [config.data] if isinstance(config.data, (str, Path)) else list(config.data)
    if not given:
        raise _bad("data", [], "'stdlib' or paths of text files or folders", "stdlib")
    for path in map(Path, given):
        if not path.exists():
            raise DataError(Setting("data", str(path)), " does not exist; pass "
                            "existing text files or folders, or ", Setting("data", "stdlib"),
                            " for the Python standard library's source.")
    return [str(Path(p).resolve()) for p in given]


def load_corpus(config: LMTrainConfig) -> ByteCorpus:
    """The run's corpus; a DataError when a split is too short for one window of ``seq_len``."""
    paths = data_paths(config)
    kwargs = {"max_bytes": config.max_bytes, "validation_fraction": config.validation_fraction}
    corpus = stdlib_corpus(**kwargs) if paths == "stdlib" else text_corpus(paths, **kwargs)
    for split, part in corpus.splits.items():
        if len(part) <= config.seq_len:
            raise DataError(f"the {split} split holds {len(part)} bytes, too few for "
                            "one window of ", Setting("seq_len", config.seq_len), "; pass a "
                            "smaller seq_len, more text, or another ", Setting("max_bytes"),
                            " or ", Setting("validation_fraction"), ".")
    return corpus


def log_table(history: dict[str, Any], tokens_per_step: int) -> str:
    """log.md: one row per evaluation (training bpb: the mean over the steps since the previous
    evaluation), and the final evaluation on the whole validation split."""
    header = "| step | bytes seen | train bpb MoE | train bpb dense | val bpb MoE | val bpb dense |"
    lines = [header, "|---:|---:|---:|---:|---:|---:|"]
    steps, previous = history["steps"], 0
    for record in history["evals"]:
        done = steps[previous:record["step"]]
        train = [sum(s[f"{m}_loss"] for s in done) / len(done) / math.log(2) if done else None
                 for m in MODELS]
        lines.append(f"| {record['step']} | {record['step'] * tokens_per_step:,} | " + " | ".join(
            "-" if v is None else f"{v:.4f}" for v in train) +
            f" | {record['moe_val_bpb']:.4f} | {record['dense_val_bpb']:.4f} |")
        previous = record["step"]
    if "final" in history:
        final = history["final"]
        lines.append(f"| final: all {final['moe']['bytes']:,} validation bytes | | | | "
                     f"{final['moe']['bpb']:.4f} | {final['dense']['bpb']:.4f} |")
    return "\n".join(lines) + "\n"


def _evaluate_both(state: LMTrainingState, sample: list, stop: StopRequest, build: Path,
                   tokens_per_step: int, bar: tqdm) -> None:
    record: dict[str, Any] = {"step": state.step}
    for name in MODELS:
        result = evaluate(state.models[name], sample, stop)
        record.update(bytes=result["bytes"], **{f"{name}_val_bpb": result["bpb"]})
    state.history["evals"].append(record)
    write_text_atomic(build / LOG_FILE, log_table(state.history, tokens_per_step))
    bar.set_postfix(moe=f"{record['moe_val_bpb']:.3f}", dense=f"{record['dense_val_bpb']:.3f}")
    logger.info("lm train: step %d: val bpb MoE %.4f, dense %.4f", state.step,
                record["moe_val_bpb"], record["dense_val_bpb"])


def _eval_due(state: LMTrainingState, config: LMTrainConfig) -> bool:
    due = state.step % config.eval_every == 0 or state.step == config.steps
    return due and not any(e["step"] == state.step for e in state.history["evals"])


def _run_steps(state: LMTrainingState, corpus: ByteCorpus, config: LMTrainConfig, build: Path,
               threads: int, on_step: Callable[[int], None] | None) -> None:
    """Train to ``config.steps``, evaluating and checkpointing as due, then evaluate on the whole
    validation split (``history['final']``); on Ctrl-C (or a KeyboardInterrupt from ``on_step``)
    save a checkpoint of the last whole step, then re-raise."""
    sample = eval_sample(corpus, config.seq_len, config.eval_bytes)
    tokens = config.batch_size * config.seq_len
    path, in_step = checkpoint_path(build), False
    every = snapshot_interval(config.snapshot_every, config.steps)
    bar = tqdm(total=config.steps, initial=state.step, desc=COMMAND, unit="step",
               disable=not config.progress, dynamic_ncols=True)
    with bar, StopRequest() as stop:
        try:
            while True:
                if _eval_due(state, config):
                    _evaluate_both(state, sample, stop, build, tokens, bar)
                if snapshot_due(state.step, every, config.steps, state.history):
                    save_snapshot(state.models["moe"], build, state.step, state.history)
                if state.step >= config.steps:
                    break
                in_step = True
                train_step(state, *corpus.batch("train", config.batch_size, config.seq_len,
                                                state.batches))
                in_step = False
                bar.update(1)
                if state.step % config.checkpoint_every == 0:
                    save_lm_checkpoint(path, state, threads)
                if on_step is not None:
                    on_step(state.step)
                stop.check()
            bar.set_postfix_str("evaluating on the whole validation split")
            full = list(corpus.windows("validation", config.seq_len, EVAL_BATCH))
            state.history["final"] = {name: evaluate(state.models[name], full, stop)
                                      for name in MODELS}
        except KeyboardInterrupt:
            if not in_step:  # a step cut midway is not saved: the last checkpoint stands
                save_lm_checkpoint(path, state, threads)
            raise


def train_lm(config: LMTrainConfig, *, on_step: Callable[[int], None] | None = None
             ) -> LMTrainOutcome:
    """Train the MoE language model and its dense twin on the same batches (module docstring),
    write the run folder, and return its summary and history.

    Every check on the options, the data and the output folder runs before anything is written.
    With ``resume=True`` a run killed or interrupted part way continues from its last checkpoint
    (Ctrl-C saves one) and ends with the weights and history of an uninterrupted run; other
    options than the interrupted run's are refused. ``on_step(step)`` is called after each step.

    Example:
        >>> train_lm(LMTrainConfig.quick(out="runs/lm-quick"))  # doctest: +SKIP
    """
    began = time.perf_counter()
    configs = check_config(config)
    check_run_destination(config.out, overwrite=config.overwrite, resume=config.resume)
    corpus = load_corpus(config)
    record = corpus.record
    identity = {**{k: v for k, v in dataclasses.asdict(config).items()
                   if k not in RESUME_MAY_CHANGE}, "data": data_paths(config),
                "corpus_sha256": [record["splits"][s]["sha256"] for s in record["splits"]],
                "labels_sha256": [record["splits"][s]["labels_sha256"] for s in record["splits"]]}
    costs = {name: {**dataclasses.asdict(c.costs(config.seq_len)),
                    "flops_per_token": c.costs(config.seq_len).flops_per_token}
             for name, c in configs.items()}
    tokens = config.batch_size * config.seq_len
    with run_folder(config.out, COMMAND, overwrite=config.overwrite, resume=config.resume) as build:
        start_or_resume(build, identity, config.resume)
        state = new_state(configs, seed=config.seed, lr=config.lr,
                          weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
                          steps=config.steps)
        payload = read_lm_checkpoint(checkpoint_path(build)) if config.resume else None
        if payload is not None:
            restore_lm_checkpoint(state, payload, config.steps)
            prune_snapshots(build, state.history)  # those written after the checkpoint
        resumed_from = state.step
        threads = config.threads or (payload["threads"] if payload is not None else None)
        step_multiply_adds = 3 * tokens * costs["moe"]["flops_per_token"] / 2
        with compute_threads(threads, step_multiply_adds) as threads:
            _run_steps(state, corpus, config, build, threads, on_step)
        history = state.history
        summary = {
            "command": COMMAND, "options": dataclasses.asdict(config), "data": data_paths(config),
            "models": {name: {"config": dataclasses.asdict(configs[name]), "costs": costs[name]}
                       for name in MODELS},
            "steps": state.step, "resumed_from": resumed_from, "bytes_seen": state.step * tokens,
            "threads": threads, "final": history["final"],
            "snapshots": [r["step"] for r in history.get("snapshots", [])],
            "last_eval": history["evals"][-1], "seconds": round(time.perf_counter() - began, 1),
            "corpus": record}
        for name in MODELS:
            save_model(state.models[name], build / name, metadata={
                "lm_train": {"options": summary["options"], "corpus": record,
                             "final": history["final"][name], "costs": costs[name]}})
        write_text_atomic(build / HISTORY_FILE, json.dumps(history, indent=1))
        write_text_atomic(build / SUMMARY_FILE, json.dumps(summary, indent=1))
        write_text_atomic(build / LOG_FILE, log_table(history, tokens))
    out = Path(config.out)
    return LMTrainOutcome(summary, history, {
        "moe": out / "moe", "dense": out / "dense", "history": out / HISTORY_FILE,
        "summary": out / SUMMARY_FILE, "log": out / LOG_FILE, "snapshots": out / SNAPSHOT_DIR})
