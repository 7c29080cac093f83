"""The routing analysis of any MoE language model over a stream of token batches: a moekit
:class:`~moekit.nn.lm.MoETransformerLM` (read from its outputs) or a transformers Mixtral (through
hooks), written as ``lm_analysis.json``, ``report.html`` and ``figures/`` (:func:`analyze_model`);
:func:`mixtral_demo` runs it on an untrained Mixtral built from a config. `moekit lm analyze RUN`
(:mod:`moekit.runs.lm_analyze`) feeds it a trained run's model and held-out bytes.

Shape legend: B windows per batch, T tokens recorded (in order), L MoE layers, E experts, K
experts chosen per token, C token categories, N bytes drawn.

:func:`analyze_model` records the routing of every layer
(:func:`~moekit.analysis.layer_recorder.record_layers`) and computes:

- every :class:`~moekit.analysis.layer_stats.LayerRoutingStats` statistic (load, entropy, dead
  experts, expert x category tables and NMI per layer: the selectivity curve; the strongest
  expert-category pairs by lift; transitions; top paths; repeat rates against chance), and the NMI
  with the category of the byte each position reads when given;
- per category, the experts tied to it (risk difference of the category against the rest:
  :func:`~moekit.analysis.layer_risk.risk_difference`);
- for a moekit LM, the ablation table (Δ bits per byte per category with each expert removed
  alone, over ``ablation_tokens`` positions in windows spread over the stream: (L * E + 1)
  forward passes);
- against each ``compare`` model (a checkpoint or another seed of the same architecture), the
  routing overlap with experts as numbered (saturation) and after matching them (seeds);
- for ``snapshots`` of the model over its training, the saturation curve: each one's top-k
  overlap with the model per layer (:mod:`~moekit.runs.lm_saturation`).

``lm_analysis.json`` holds every number, and the figures are drawn from it alone
(:func:`moekit.reports.lm.lm_report`); the output folder is replaced whole.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moekit._checks import check_int
from moekit.analysis.layer_interventions import ablation_table, validation_stream
from moekit.analysis.layer_overlap import match_seed_experts, routing_saturation
from moekit.analysis.layer_recorder import record_layers
from moekit.analysis.layer_risk import risk_difference
from moekit.data.source_text import CATEGORIES, ByteCorpus, stdlib_corpus
from moekit.exceptions import DataError, Setting
from moekit.io.files import jsonable, write_text_atomic
from moekit.io.run_folder import folder_built_whole
from moekit.nn.lm import MoETransformerLM
from moekit.reports.lm import JSON_FILE, lm_report, lm_summary
from moekit.runs.lm_saturation import check_snapshots, saturation_over_training

FORMAT = "moekit-lm-analysis"
DEFAULT_MAX_TOKENS = 65536  # positions recorded: ~1/6 of the default validation split
DEFAULT_ABLATION_TOKENS = 8192  # each of the L * E + 1 ablation passes runs over these
SAMPLE_BYTES = 600  # bytes of one validation file drawn coloured by expert
WINDOW_BATCH = 32


@dataclasses.dataclass(frozen=True)
class TextSample:
    """Positions to draw coloured by expert: ``batches`` of ``(x_BT, y_BT, category_BT)`` run on
    their own, and the positions ``[start, stop)`` of their inputs flattened in order, named by
    ``label``."""

    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    start: int
    stop: int
    label: str


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """Validation positions in memory: ``batches`` of ``(x_BT, y_BT, category_BT)`` (the category
    of the predicted byte), ``input_categories_T`` (of the byte read), and the ``sample`` of
    text to draw coloured by expert."""

    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    input_categories_T: np.ndarray
    sample: TextSample


def corpus_stream(corpus: ByteCorpus, seq_len: int, max_tokens: int | None) -> TokenStream:
    """``max_tokens`` positions of the validation split (all for None): whole windows of
    ``seq_len`` spread evenly over the split (files are in path order, so the first windows
    alone would hold the first packages only), the last one cut. Window w holds what
    ``ByteCorpus.windows`` gives: inputs at bytes w * seq_len + t, targets and their categories
    one byte later. The sample: code from one file, in the windows that cover it."""
    part = corpus.splits["validation"]
    n_windows = (len(part) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"corpus_stream: seq_len must be below the validation split's length "
                         f"({len(part)} bytes); got seq_len={seq_len}.")
    n_taken = n_windows if max_tokens is None else min(n_windows, -(-max_tokens // seq_len))
    rows_W = np.arange(n_taken) * n_windows // n_taken

    def windows(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        at_WT = rows[:, None] * seq_len + np.arange(seq_len)
        return tuple(torch.from_numpy(a[i].astype(np.int64)) for a, i in (
            (part.data_N, at_WT), (part.data_N, at_WT + 1), (part.category_N, at_WT + 1)))

    batches = validation_stream([windows(rows_W[i:i + WINDOW_BATCH])
                                 for i in range(0, n_taken, WINDOW_BATCH)], max_tokens)
    n_tokens = sum(x.numel() for x, _, _ in batches)
    at_T = (rows_W[:, None] * seq_len + np.arange(seq_len)).reshape(-1)[:n_tokens]
    prose_N = np.isin(part.category_N, [CATEGORIES.index("string"), CATEGORIES.index("comment")])
    start, stop, label = sample_range(part.data_N, prose_N, part.files, part.file_starts,
                                      n_windows * seq_len)
    first, last = start // seq_len, (stop - 1) // seq_len
    sample = TextSample([windows(np.arange(first, last + 1))], start - first * seq_len,
                        stop - first * seq_len, label)
    return TokenStream(batches, part.category_N[at_T].astype(np.int64), sample)


def sample_range(data_N: np.ndarray, prose_N: np.ndarray, files: Sequence[str],
                 starts: np.ndarray, n_tokens: int, n_bytes: int = SAMPLE_BYTES
                 ) -> tuple[int, int, str]:
    """A few hundred ASCII bytes of one file inside the first ``n_tokens`` bytes, for the
    coloured text: of the stretches that start at a ``def`` or ``class`` line, the one with the
    fewest bytes in strings and comments (``prose_N``: code rather than docstrings), cut at a
    line end; the first bytes when no file has one. Returns ``(start, stop, label)``."""
    bounds = [*map(int, starts), len(data_N)]
    best, best_prose = (0, min(n_bytes, n_tokens), "the first positions"), 2.0
    for i, name in enumerate(files):
        lo, hi = bounds[i], min(bounds[i + 1], n_tokens)
        text = bytes(data_N[lo:hi])
        for key in (b"\ndef ", b"\nclass ", b"\n    def "):
            at = text.find(key)
            while 0 <= at < len(text) - n_bytes // 2:
                begin = lo + at + 1
                stop = begin + bytes(data_N[begin:min(begin + n_bytes, hi)]).rfind(b"\n") + 1
                prose = float(prose_N[begin:stop].mean()) if stop > begin else 2.0
                if prose < best_prose and bytes(data_N[begin:stop]).isascii():
                    best = (begin, stop, f"{name}, bytes {begin - lo} to {stop - lo}")
                    best_prose = prose
                at = text.find(key, at + n_bytes)
    return best


def analyze_model(model: nn.Module, batches: Iterable, category_names: Sequence[str],
                  out: Path | str, *, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                  source: str = "auto", input_categories_T: np.ndarray | None = None,
                  sample: TextSample | None = None,
                  layers_to_render: Sequence[int] | None = None,
                  ablation_tokens: int = DEFAULT_ABLATION_TOKENS,
                  compare: Sequence[tuple[str, nn.Module]] = (),
                  snapshots: Sequence[tuple[int, Any]] = (), final_step: int | None = None,
                  training: dict[str, Any] | None = None, title: str = "moekit lm analysis",
                  description: str = "", notes: Sequence[str] = (), progress: bool = False
                  ) -> Path:
    """Analyse the routing of every MoE layer of ``model`` over ``batches`` (tuples ``(x_BT,
    y_BT, category_BT)``, categories named by ``category_names``) and write ``out`` (replaced
    whole): lm_analysis.json, report.html, figures/. Returns ``out``.

    Args:
        model: a moekit MoETransformerLM, or any model record_layers reads (a transformers
            Mixtral with ``source='hooks'``). The ablation table needs a moekit LM.
        max_tokens: positions analysed (the first ones of ``batches``), None for all.
        input_categories_T: the category of the byte each position reads, for a second NMI curve.
        sample: the :class:`TextSample` drawn coloured by expert (inputs shown as bytes when
            every id is < 256); default the first SAMPLE_BYTES positions of ``batches``.
        layers_to_render: the layers of that drawing (default the first, middle and last).
        ablation_tokens: positions of the ablation table (whole windows spread over the
            stream: :func:`spread_windows`); 0 skips it.
        compare: ``(name, model)`` pairs of the same shape (checkpoints, other seeds).
        snapshots, final_step: ``(step, model or saved model folder)`` pairs of the model over
            its training, steps below ``final_step`` (the model's own): the saturation curve.
        training: ``{"evals", "steps", "final"}`` of the training history, for its figure.
        title, description, notes: the report's title, a sentence on the model and data, and
            warnings shown on top (e.g. "the routing is untrained").

    Example:
        >>> analyze_model(lm, corpus.windows("validation", 128, 32), CATEGORIES,
        ...               "runs/lm/analysis")  # doctest: +SKIP
    """
    owner = "analyze_model"
    out = check_analysis_out(out)
    check_int(owner, "ablation_tokens", ablation_tokens, minimum=0)
    snapshots = check_snapshots(owner, snapshots, final_step)
    stream = validation_stream(batches, max_tokens)
    names = [str(c) for c in category_names]
    rec = record_layers(model, stream, source=source, progress=progress)
    if rec.categories_T is None:
        raise ValueError(f"{owner}: the batches carry no categories; pass tuples (x_BT, y_BT, "
                         "category_BT), as ByteCorpus.windows yields them.")
    result = rec.stats(names, top_n=10, min_count=max(1, rec.n_tokens // 1000))
    input_nmi = None
    if input_categories_T is not None:
        cats_T = np.asarray(input_categories_T)
        if cats_T.shape != (rec.n_tokens,):
            raise ValueError(f"{owner}: input_categories_T must have one category per analysed "
                             f"position, shape ({rec.n_tokens},); got shape {cats_T.shape}.")
        input_nmi = dataclasses.replace(rec, categories_T=cats_T.astype(np.int32)).stats(
            names, top_n=0).categories.nmi_L
    layers = check_render_layers(owner, layers_to_render, rec.n_layers)
    analysis = {
        "format": FORMAT, "version": 1, "title": title, "description": description,
        "notes": list(notes), "model": _model_record(model, rec),
        "tokens": {"n_tokens": rec.n_tokens, "max_tokens": max_tokens,
                   "category_of": "the predicted (next) byte", "category_names": names},
        "routing": result.to_dict(), "input_nmi_L": input_nmi,
        "risk": _risk(rec, names),
        "ablation": _ablation(model, stream, names, ablation_tokens, progress),
        "overlap": [_overlap(rec, name, other, stream, source, progress)
                    for name, other in compare],
        "saturation": saturation_over_training(
            rec.indices_TLK, snapshots, stream, n_experts=rec.n_experts, final_step=final_step,
            source=source, progress=progress) if snapshots else None,
        "sample": _sample(model, sample or TextSample(validation_stream(stream, SAMPLE_BYTES),
                                                      0, SAMPLE_BYTES, "the first positions"),
                          layers, source),
        "training": training}
    analysis = jsonable(analysis)
    analysis["summary"] = lm_summary(analysis)
    with folder_built_whole(out) as build:
        write_text_atomic(build / JSON_FILE, json.dumps(analysis, indent=1))
        lm_report(analysis, build)
    return out


def check_analysis_out(out: Path | str) -> Path:
    """``out`` if an analysis may be written there: absent, empty, or an earlier analysis (it
    holds lm_analysis.json); a DataError otherwise, before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(Setting("out", str(out)), " is a file; give a folder.")
    if out.is_dir() and any(out.iterdir()) and not (out / JSON_FILE).is_file():
        raise DataError(Setting("out", str(out)), f" holds files that are not a moekit lm "
                        f"analysis (no {JSON_FILE}); it would be replaced whole: choose another ",
                        Setting("out"), ".")
    return out


def check_render_layers(owner: str, layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """The layers to draw the coloured text for: ``layers`` checked, or the first, middle and
    last."""
    if layers is None:
        return sorted({0, n_layers // 2, n_layers - 1})
    layers = list(layers)
    if not layers or any(type(i) is not int or not 0 <= i < n_layers for i in layers):
        raise ValueError(f"{owner}: layers_to_render must be layer indices in [0, n_layers="
                         f"{n_layers}); got layers_to_render={layers}. Pass e.g. [0, "
                         f"{n_layers - 1}].")
    return layers


def _model_record(model: nn.Module, rec: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {"class": type(model).__name__, "n_layers": rec.n_layers,
            "n_experts": rec.n_experts, "top_k": rec.top_k, "layer_names": rec.layer_names,
            "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None}


def _risk(rec: Any, names: list[str]) -> dict[str, Any]:
    """Per category with tokens (and tokens outside it): the experts tied to it, category
    against the rest."""
    per_category, rd_CLE = {}, np.full((len(names), rec.n_layers, rec.n_experts), np.nan)
    for c, name in enumerate(names):
        in_a_T = np.asarray(rec.categories_T) == c
        if in_a_T.all() or not in_a_T.any():
            continue
        rd = risk_difference(rec.indices_TLK, in_a_T, n_experts=rec.n_experts)
        rd_CLE[c] = rd.rd_LE
        per_category[name] = {"n_tokens": rd.n_a, "top": rd.ranked(3)}
    return {"rank": "any", "per_category": per_category, "rd_CLE": rd_CLE}


def spread_windows(stream: list, max_tokens: int) -> list:
    """``max_tokens`` positions of ``stream`` (batches ``(x_BT, y_BT, category_BT)``) in its
    whole windows spread evenly over it, in batches of WINDOW_BATCH, the last window cut: a
    sample of every part of the stream rather than its beginning.

    Example:
        >>> x = torch.arange(12).view(6, 2)
        >>> [b[0].tolist() for b in spread_windows([(x, x, x)], 5)]
        [[[0, 1], [4, 5]], [[8]]]
    """
    width = stream[0][0].shape[1]
    rows = [tuple(t[i] for t in batch) for batch in stream for i in range(batch[0].shape[0])
            if batch[0].shape[1] == width]
    n = min(len(rows), -(-max_tokens // width))
    picked = [rows[j] for j in np.arange(n) * len(rows) // n]
    batches = [tuple(torch.stack(parts) for parts in zip(*picked[i:i + WINDOW_BATCH],
                                                         strict=True))
               for i in range(0, n, WINDOW_BATCH)]
    return validation_stream(batches, max_tokens)


def _ablation(model: nn.Module, stream: list, names: list[str], ablation_tokens: int,
              progress: bool) -> dict[str, Any] | None:
    if not (isinstance(model, MoETransformerLM) and model.config.ffn == "moe") \
            or not ablation_tokens or model.config.n_experts - 1 < model.config.top_k:
        return None
    table = ablation_table(model, spread_windows(stream, ablation_tokens),
                           max_tokens=ablation_tokens,
                           category_names=names, progress=progress)
    return {**table.to_dict(), "ranked": table.ranked(10)}


def _overlap(rec: Any, name: str, other: nn.Module, stream: list, source: str, progress: bool
             ) -> dict[str, Any]:
    """The routing of ``other`` on the same tokens against ``rec``'s."""
    theirs = record_layers(other, stream, source=source, categories=False, progress=progress)
    shape, their_shape = (rec.n_layers, rec.top_k, rec.n_experts), \
        (theirs.n_layers, theirs.top_k, theirs.n_experts)
    if shape != their_shape:
        raise DataError(Setting("compare", name), f" routes (layers, top_k, experts) = "
                        f"{their_shape}, the analysed model {shape}; compare models of the same "
                        "architecture (checkpoints or seeds of one run's options).")
    return {"name": name,
            "saturation": routing_saturation(rec.indices_TLK, theirs.indices_TLK,
                                             n_experts=rec.n_experts).to_dict(),
            "matched": match_seed_experts(rec.indices_TLK, theirs.indices_TLK,
                                          n_experts=rec.n_experts).to_dict()}


def _sample(model: nn.Module, sample: TextSample, layers: list[int], source: str
            ) -> dict[str, Any] | None:
    """The sample's bytes and their first-choice experts at ``layers``, from its own run."""
    ids_T = torch.cat([item[0].reshape(-1) for item in sample.batches]).numpy()
    start, stop = sample.start, min(sample.stop, len(ids_T))
    if not 0 <= start < stop or int(ids_T[start:stop].max()) > 255:
        return None  # nothing to draw, or ids that are not bytes
    rec = record_layers(model, sample.batches, source=source, categories=False)
    return {"label": sample.label, "bytes": ids_T[start:stop], "layers": layers,
            "experts_LN": np.asarray(rec.indices_TLK[start:stop, layers, 0]).T}


MIXTRAL_DEMO = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 256}
UNTRAINED_NOTE = ("This Mixtral is untrained: its weights are random. Its routing is a fixed "
                  "random function of the input, driven mostly by the byte being read, so any "
                  "selectivity below reflects byte identity, not learned specialisation. This "
                  "demo shows that the analysis runs on a transformers model through hooks.")


def mixtral_demo(out: Path | str, *, max_tokens: int = 8192, max_bytes: int = 300_000,
                 seq_len: int = 128, seed: int = 0, mixtral_config: dict[str, Any] | None = None,
                 progress: bool = False) -> Path:
    """:func:`analyze_model` on a transformers ``MixtralForCausalLM`` built offline from a
    ``MixtralConfig`` (:data:`MIXTRAL_DEMO`, updated by ``mixtral_config``), its routing read
    through hooks, fed the bytes of the standard library's validation split (vocabulary 256).
    Its weights are random (drawn from ``seed`` inside a forked RNG; the global one is left as it
    was): the routing it shows is untrained, and the report says so. Returns ``out``.

    Example:
        >>> mixtral_demo("runs/mixtral-demo")  # doctest: +SKIP
    """
    out = check_analysis_out(out)
    try:
        import transformers
    except ImportError:
        raise ModuleNotFoundError("mixtral_demo: needs transformers (pip install transformers); "
                                  "moekit's own models need nothing more.") from None
    settings = {**MIXTRAL_DEMO, **(mixtral_config or {})}
    config = transformers.MixtralConfig(**settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.MixtralForCausalLM(config).eval()
    corpus = stdlib_corpus(max_bytes=max_bytes, validation_fraction=0.3)
    stream = corpus_stream(corpus, seq_len, max_tokens)
    description = (f"A transformers MixtralForCausalLM built from a MixtralConfig ("
                   f"{settings['num_hidden_layers']} layers of {settings['num_local_experts']} "
                   f"experts, top-{settings['num_experts_per_tok']}, hidden size "
                   f"{settings['hidden_size']}, vocabulary 256: one token per byte), its routing "
                   "read through forward hooks on the MixtralSparseMoeBlock gates, on the first "
                   f"{stream.input_categories_T.size} positions of the standard library's "
                   "validation split.")
    return analyze_model(model, stream.batches, corpus.record["categories"], out,
                         max_tokens=max_tokens, source="hooks",
                         input_categories_T=stream.input_categories_T, sample=stream.sample,
                         ablation_tokens=0, title="moekit lm analysis: an untrained Mixtral "
                         "through hooks", description=description, progress=progress,
                         notes=[UNTRAINED_NOTE])
