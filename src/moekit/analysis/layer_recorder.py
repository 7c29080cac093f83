"""The routing of every MoE layer of a language model over a stream of token batches, in memory or
streamed to disk with bounded memory.

Shape legend: B sequences in a batch, T positions, N = B * T tokens of a batch (in (B, T) order),
L MoE layers, E experts, K experts chosen per token in rank order; in a recording T counts every
token recorded.

Where the routing comes from (``source``):

- 'outputs': the model's forward returns it: an object with ``moe_outputs`` (moekit's
  :class:`~moekit.nn.lm.MoETransformerLM`), a :class:`~moekit.nn.outputs.MoEOutput`, or a list of
  them (a stack). No hooks.
- 'hooks': forward hooks on the routers (:func:`~moekit.analysis.layer_hooks.routing_hooks`):
  moekit SparseMoE layers inside any module, transformers' Mixtral, Qwen-MoE and OLMoE blocks.
- 'auto' (default): hooks where the model holds transformers blocks; otherwise outputs when the
  first batch's forward returns the routing, else hooks (that batch then runs a second time).

Memory: in memory (``store=None``) the arrays grow batch by batch; with ``store`` every batch is
appended to the files of a :class:`~moekit.analysis.store.RoutingStore` as it comes, so the
recorder holds one batch at a time, and the recording reads the files back as memory maps.
Statistics (:meth:`LayerRecording.stats`) read it a chunk at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moekit._checks import check_choice, check_int
from moekit.analysis.layer_hooks import LayerRouting, find_routers, routing_hooks
from moekit.analysis.layer_stats import LayerRoutingResult, LayerRoutingStats
from moekit.analysis.store import RoutingStore, StoreWriter
from moekit.io.files import write_text_atomic
from moekit.nn.outputs import MoEOutput

SOURCES = ("auto", "outputs", "hooks")
LAYERS_FILE = "layers.json"
LAYERS_FORMAT = "moekit-layer-recording"


@dataclass(frozen=True)
class LayerRecording:
    """What :func:`record_layers` recorded: for T tokens and L MoE layers.

    Attributes:
        indices_TLK: each token's experts at each layer, rank order (int16; int32 for E > 32767).
        weights_TLK: their combine weights (float32).
        probs_TLE: the full gate distributions (float32), or None (``with_probs=False``).
        categories_T: each token's category id (int32) as the batches gave it, or None.
        doc_T: each token's document id (int64): the batches' own, else one per sequence.
        n_experts: E. layer_names: the module path of each layer ('' where read from outputs).
        store: the :class:`~moekit.analysis.store.RoutingStore` the arrays are read from (memory
            maps), or None when they are in memory.
    """

    indices_TLK: np.ndarray
    weights_TLK: np.ndarray
    probs_TLE: np.ndarray | None
    categories_T: np.ndarray | None
    doc_T: np.ndarray
    n_experts: int
    layer_names: list[str] = field(default_factory=list)
    store: RoutingStore | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.indices_TLK.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.indices_TLK.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.indices_TLK.shape[2])

    def stats(self, category_names: Sequence[str] | None = None, *, chunk_tokens: int = 65536,
              top_n: int = 10, min_count: int = 1, **stats_options: Any) -> LayerRoutingResult:
        """Every :class:`~moekit.analysis.layer_stats.LayerRoutingStats` statistic of the
        recording, fed ``chunk_tokens`` tokens at a time (memory maps stay on disk);
        ``category_names`` names the category ids (needs recorded categories); ``stats_options``
        go to LayerRoutingStats (``path_layers``, ``sample_tokens``, ``random_state``)."""
        check_int("LayerRecording.stats", "chunk_tokens", chunk_tokens, minimum=1)
        if category_names is not None and self.categories_T is None:
            raise ValueError("LayerRecording.stats: got category_names but the recording has no "
                             "categories; record batches (x_BT, y_BT, category_BT) with "
                             "categories=True, or pass category_names=None.")
        stats = LayerRoutingStats(self.n_experts, category_names=category_names,
                                  chunk_tokens=chunk_tokens, **stats_options)
        for start in range(0, self.n_tokens, chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            stats.update(self.indices_TLK[chunk], self.weights_TLK[chunk],
                         categories_T=None if category_names is None else self.categories_T[chunk],
                         doc_T=self.doc_T[chunk])
        return stats.result(top_n=top_n, min_count=min_count)

    @classmethod
    def open(cls, directory: Path | str) -> LayerRecording:
        """The recording that :func:`record_layers` streamed into ``directory``."""
        store = RoutingStore.open(directory)
        meta_path = Path(directory) / LAYERS_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"LayerRecording.open: {str(directory)!r} holds a routing "
                                    f"store but no {LAYERS_FILE}; it was not written by "
                                    "record_layers (use RoutingStore.open for it).")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != LAYERS_FORMAT:
            raise ValueError(f"LayerRecording.open: {str(meta_path)!r} is not a layer recording.")
        fields = store.fields
        return cls(store["indices"], store["weights"],
                   store["probs"] if "probs" in fields else None,
                   store["categories"] if "categories" in fields else None, store["doc"],
                   int(meta["n_experts"]), list(meta["layer_names"]), store)


def index_dtype(n_experts: int) -> np.dtype:
    """The integer type of recorded expert indices: int16 up to 32767 experts, else int32."""
    return np.dtype(np.int16 if n_experts <= np.iinfo(np.int16).max else np.int32)


# --- reading batches ---------------------------------------------------------------------------

def _unpack(item: Any, categories: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(x, category, doc)`` of one batch: ``x``, or a tuple ``(x, y[, category[, doc]])``."""
    if isinstance(item, Tensor):
        return item, None, None
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        category = item[2] if len(item) > 2 and categories else None
        return item[0], category, item[3] if len(item) > 3 else None
    raise TypeError(f"record_layers: each batch must be x_BT or a tuple (x_BT, y_BT[, category_BT"
                    f"[, doc_BT]]); got {type(item).__name__}. ByteCorpus.windows(...) yields "
                    "the tuples.")


def _sequence_shape(x: Tensor) -> tuple[int, ...]:
    """The (B, T) of token ids; float inputs (..., D) are features, one token per row."""
    return tuple(x.shape) if not x.is_floating_point() else tuple(x.shape[:-1])


def _routing_from_output(out: Any) -> list[LayerRouting] | None:
    """The per-layer routing a forward returned, or None where it returned none."""
    outputs = getattr(out, "moe_outputs", None)
    if outputs is None and isinstance(out, MoEOutput):
        outputs = [out]
    if outputs is None and isinstance(out, (list, tuple)) and out \
            and all(isinstance(o, MoEOutput) for o in out):
        outputs = list(out)
    if not outputs:
        return None
    return [LayerRouting.from_routing(o.routing, "record_layers") for o in outputs]


class _Forward:
    """Runs the model on a batch and returns ``(layer names, per-layer routing)``; resolves
    ``source='auto'`` on the first batch."""

    def __init__(self, model: nn.Module, source: str, with_probs: bool) -> None:
        self.model, self.with_probs = model, with_probs
        if source == "auto":
            kinds = {site.kind for site in find_routers(model)}
            source = "hooks" if kinds - {"SparseMoE"} else "auto"
        self.source = source

    def __call__(self, x: Tensor) -> tuple[list[str], list[LayerRouting]]:
        if self.source in ("outputs", "auto"):
            layers = _routing_from_output(self.model(x))
            if layers is not None:
                self.source = "outputs"
                return [""] * len(layers), layers
            if self.source == "outputs":
                raise TypeError(f"record_layers: source='outputs' needs a forward that returns "
                                f"moe_outputs, a MoEOutput or a list of them; "
                                f"{type(self.model).__name__} did not. Use source='hooks'.")
            self.source = "hooks"  # 'auto' on the first batch: run it again with hooks
        with routing_hooks(self.model, with_probs=self.with_probs) as capture:
            self.model(x)
        return capture.take()


class _Sink:
    """Collects each batch's arrays: in memory, or appended to a store's files."""

    def __init__(self, store: Path | str | None) -> None:
        self.directory = None if store is None else Path(store)
        self.writer = None if store is None else StoreWriter(self.directory)
        if self.directory is not None:
            (self.directory / LAYERS_FILE).unlink(missing_ok=True)
        self.parts: dict[str, list[np.ndarray]] = {}

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        if self.writer is not None:
            self.writer.write(arrays)
            return
        for name, array in arrays.items():
            self.parts.setdefault(name, []).append(array)

    def close(self, ok: bool, meta: dict[str, Any]) -> dict[str, np.ndarray] | RoutingStore | None:
        if self.writer is None:
            return {name: np.concatenate(parts) for name, parts in self.parts.items()} if ok \
                else None
        store = self.writer.close(ok)
        if ok:
            write_text_atomic(self.directory / LAYERS_FILE, json.dumps(meta, indent=1))
        return store


def _batch_arrays(layers: list[LayerRouting], shape: tuple[int, ...], category: Tensor | None,
                  doc: Tensor | None, first_doc: int, n_experts: int, with_probs: bool,
                  n_keep: int) -> dict[str, np.ndarray]:
    """One batch as the recording's arrays (its first ``n_keep`` tokens), on the CPU."""
    n_tokens = int(np.prod(shape))
    arrays = {
        "indices": torch.stack([r.experts_NK for r in layers], 1)[:n_keep].cpu().numpy().astype(
            index_dtype(n_experts)),
        "weights": torch.stack([r.weights_NK for r in layers], 1)[:n_keep].float().cpu().numpy()}
    if with_probs:
        arrays["probs"] = torch.stack([r.probs_NE for r in layers], 1)[:n_keep].float().cpu(
            ).numpy()
    if category is not None:
        if category.numel() != n_tokens:
            raise ValueError(f"record_layers: category_BT must give one category per token, "
                             f"shape {shape}; got category_BT.shape={tuple(category.shape)}.")
        arrays["categories"] = category.reshape(-1)[:n_keep].cpu().numpy().astype(np.int32)
    if doc is not None:
        if doc.numel() != n_tokens:
            raise ValueError(f"record_layers: doc_BT must give one document id per token, shape "
                             f"{shape}; got doc_BT.shape={tuple(doc.shape)}.")
        arrays["doc"] = doc.reshape(-1)[:n_keep].cpu().numpy().astype(np.int64)
    else:  # each sequence its own document: the model sees no context across them
        seq = np.arange(first_doc, first_doc + int(np.prod(shape[:-1] or (1,))), dtype=np.int64)
        arrays["doc"] = np.repeat(seq, shape[-1] if len(shape) > 1 else 1)[:n_keep]
    return arrays


def _check_layers(layers: list[LayerRouting], names: list[str], n_tokens: int,
                  first: tuple[int, int] | None) -> tuple[int, int]:
    """(L, K) of a batch's routing, checked against the token count and the first batch."""
    if not layers:
        raise ValueError("record_layers: the forward pass called no router; check that the "
                         "model's MoE layers run on this input.")
    n_rows = {int(r.experts_NK.shape[0]) for r in layers}
    if n_rows != {n_tokens}:
        raise ValueError(f"record_layers: every layer must route the batch's {n_tokens} tokens; "
                         f"the layers routed {sorted(n_rows)} rows ({names}). Pass batches the "
                         "model routes token by token (x_BT of token ids).")
    shape = (len(layers), int(layers[0].experts_NK.shape[1]))
    if any(r.experts_NK.shape[1] != shape[1] for r in layers):
        raise ValueError(f"record_layers: every layer must choose the same number of experts per "
                         f"token; got {[r.experts_NK.shape[1] for r in layers]} ({names}).")
    if first is not None and shape != first:
        raise ValueError(f"record_layers: the batches' routing changed shape from (L, K)="
                         f"{first} to {shape}; every batch must run the same layers.")
    return shape


def _n_experts(model: nn.Module, layers: list[LayerRouting]) -> int:
    if layers[0].probs_NE is not None:
        return int(layers[0].probs_NE.shape[1])
    config = getattr(model, "config", None)
    for name in ("n_experts", "num_local_experts", "num_experts"):
        if isinstance(getattr(config, name, None), int):
            return int(getattr(config, name))
    for site in find_routers(model):
        value = getattr(getattr(site.module, "config", None), "n_experts", None) or getattr(
            site.module, "num_experts", None)
        if isinstance(value, int):
            return value
    raise ValueError("record_layers: could not tell the number of experts without the gate "
                     "distributions; pass with_probs=True.")


def _device(model: nn.Module) -> torch.device | None:
    param = next(iter(model.parameters()), None)
    return None if param is None else param.device


@torch.no_grad()
def record_layers(model: nn.Module, batches: Iterable | Tensor, *, store: Path | str | None = None,
                  with_probs: bool = False, categories: bool = True, source: str = "auto",
                  max_tokens: int | None = None, progress: bool = False) -> LayerRecording:
    """Run ``model`` in evaluation mode over ``batches`` and record every MoE layer's routing.

    Args:
        model: a moekit MoETransformerLM (or any module returning MoE outputs), a module holding
            SparseMoE layers, or a transformers Mixtral / Qwen-MoE / OLMoE model.
        batches: an iterable of ``x_BT`` or of tuples ``(x_BT, y_BT[, category_BT[, doc_BT]])``
            (``ByteCorpus.windows(split, seq_len, batch_size)`` yields ``(x, y, category)``), or
            one tensor ``x_BT``. Moved to the model's device.
        store: a folder to stream the recording into (bounded memory: one batch at a time);
            None keeps it in memory.
        with_probs: also record the full gate distributions ``probs_TLE`` (T x L x E floats).
        categories: record each batch's ``category_BT`` (for ByteCorpus, the category of the
            byte each position predicts) as ``categories_T``.
        source: 'auto', 'outputs' or 'hooks' (module docstring).
        max_tokens: stop after this many tokens (the last batch is cut), None for all.
        progress: show a progress bar.

    Returns:
        a :class:`LayerRecording`; ``doc_T`` is each sequence's index unless the batches give ids.

    Example:
        >>> from moekit.nn.lm import LMConfig, MoETransformerLM
        >>> gen = torch.Generator().manual_seed(0)
        >>> lm = MoETransformerLM(LMConfig(d_model=16, n_layers=2, n_heads=2, n_experts=4,
        ...                                expert_hidden=16), generator=gen)
        >>> rec = record_layers(lm, [torch.randint(0, 256, (2, 8), generator=gen)] * 3)
        >>> rec.indices_TLK.shape, rec.n_experts, rec.stats().load_LE.shape
        ((48, 2, 2), 4, (2, 4))
    """
    owner = "record_layers"
    check_choice(owner, "source", source, SOURCES)
    if max_tokens is not None:
        check_int(owner, "max_tokens", max_tokens, minimum=1)
    forward, device = _Forward(model, source, with_probs), _device(model)
    sink = _Sink(store)
    shape: tuple[int, int] | None = None
    names: list[str] = []
    n_experts = n_tokens = n_sequences = 0
    was_training, ok = model.training, False
    model.eval()
    try:
        items = [batches] if isinstance(batches, Tensor) else batches
        for item in tqdm(items, desc="routing", unit="batch", disable=not progress, leave=False):
            x, category, doc = _unpack(item, categories)
            seq_shape = _sequence_shape(x)
            batch_tokens = int(np.prod(seq_shape))
            names, layers = forward(x if device is None else x.to(device))
            shape = _check_layers(layers, names, batch_tokens, shape)
            n_experts = n_experts or _n_experts(model, layers)
            n_keep = batch_tokens if max_tokens is None else min(batch_tokens,
                                                                 max_tokens - n_tokens)
            sink.add(_batch_arrays(layers, seq_shape, category, doc, n_sequences, n_experts,
                                   with_probs, n_keep))
            n_tokens += n_keep
            n_sequences += int(np.prod(seq_shape[:-1] or (1,)))
            if max_tokens is not None and n_tokens >= max_tokens:
                break
        ok = shape is not None
    finally:
        model.train(was_training)
        meta = {"format": LAYERS_FORMAT, "version": 1, "n_experts": n_experts,
                "layer_names": names, "source": forward.source}
        result = sink.close(ok, meta)
    if not ok:
        raise ValueError("record_layers: batches held no batch; pass at least one x_BT.")
    if isinstance(result, RoutingStore):
        return LayerRecording.open(result.directory)
    return LayerRecording(result["indices"], result["weights"], result.get("probs"),
                          result.get("categories"), result["doc"], n_experts, names)

