"""Interventions on the routing of a :class:`~moekit.nn.lm.MoETransformerLM`, layer by layer,
through its forward controls, and what they do to its bits per byte on each token category.

Shape legend: B sequences, T positions, N = B * T tokens, L MoE layers, E experts, K experts chosen
per token, C token categories.

- :func:`intervention_effect`: bits per byte per category and each expert's share of tokens
  (P(e in S), S a token's K experts) with and without ``keep_experts`` (ablation) and / or
  ``router_logit_offsets`` (steering); :func:`ablate_layer_experts` and :func:`steer_layer_experts`
  build those controls from expert lists.
- :func:`ablation_table`: each expert of each layer ablated alone: Δ bits per byte, layer x expert
  x category. It runs the capped stream L * E + 1 times: ``max_tokens`` caps the stream (16384
  tokens by default), so its cost is (L * E + 1) forward passes over at most that many tokens.
- replaying recorded routing: :func:`moekit.analysis.layer_replay.replay_layers`.

Bits per byte of a category: the mean of -log2 p(y_t) over the targets y_t of that category (for
``ByteCorpus.windows``, ``category_BT`` is the category of the target byte).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from moekit._checks import check_int
from moekit.data.source_text import CATEGORIES
from moekit.io.files import jsonable
from moekit.nn.lm import MoETransformerLM

DEFAULT_MAX_TOKENS = 16384
Batch = tuple[Tensor, Tensor, Tensor | None]


def check_lm(owner: str, model: Any) -> MoETransformerLM:
    """``model`` if it is a MoETransformerLM with routed blocks (its forward takes the controls)."""
    if not isinstance(model, MoETransformerLM) or model.config.ffn != "moe":
        got = type(model).__name__ + (f" with ffn={model.config.ffn!r}"
                                      if isinstance(model, MoETransformerLM) else "")
        raise TypeError(f"{owner}: model must be a MoETransformerLM with ffn='moe' (its forward "
                        f"takes the routing controls); got {got}.")
    return model


def validation_stream(batches: Iterable, max_tokens: int | None = DEFAULT_MAX_TOKENS
                      ) -> list[Batch]:
    """The first ``max_tokens`` target tokens of ``batches`` (tuples ``(x_BT, y_BT[,
    category_BT])``), kept in memory to be run again. The cut falls inside a batch: whole
    windows, then the first positions of one more (a causal model scores them as in the whole
    window).

    Example:
        >>> x = torch.zeros(4, 8, dtype=torch.long)
        >>> [b[0].shape for b in validation_stream([(x, x)], 20)]
        [torch.Size([2, 8]), torch.Size([1, 4])]
    """
    if max_tokens is not None:
        check_int("validation_stream", "max_tokens", max_tokens, minimum=1)
    taken: list[Batch] = []
    n = 0
    for item in batches:
        if not (isinstance(item, (tuple, list)) and len(item) >= 2
                and all(isinstance(t, Tensor) for t in item[:2])):
            raise TypeError(f"validation_stream: each batch must be a tuple (x_BT, y_BT[, "
                            f"category_BT]) of tensors; got {type(item).__name__}. "
                            "ByteCorpus.windows('validation', seq_len, batch_size) yields them.")
        x, y = item[0], item[1]
        cat = item[2] if len(item) > 2 else None
        left = x.numel() if max_tokens is None else max_tokens - n
        rows, rest = divmod(min(left, x.numel()), x.shape[1])
        if rows:
            taken.append((x[:rows], y[:rows], None if cat is None else cat[:rows]))
        if rest:
            taken.append((x[rows:rows + 1, :rest], y[rows:rows + 1, :rest],
                          None if cat is None else cat[rows:rows + 1, :rest]))
        n += rows * x.shape[1] + rest
        if max_tokens is not None and n >= max_tokens:
            break
    if not taken:
        raise ValueError("validation_stream: batches held no tokens; pass at least one batch.")
    return taken


@dataclass(frozen=True)
class _Score:
    nats_C: np.ndarray
    tokens_C: np.ndarray
    chosen_LE: np.ndarray

    def bpb_C(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.tokens_C > 0, self.nats_C / self.tokens_C / math.log(2), np.nan)

    def bpb(self) -> float:
        return float(self.nats_C.sum() / max(self.tokens_C.sum(), 1) / math.log(2))

    def share_LE(self) -> np.ndarray:
        return self.chosen_LE / max(int(self.tokens_C.sum()), 1)


def _category_names(stream: list[Batch], category_names: Sequence[str] | None) -> list[str]:
    if any(cat is None for _, _, cat in stream):
        return ["all"]
    names = list(CATEGORIES if category_names is None else category_names)
    high = max(int(cat.max()) for _, _, cat in stream if cat.numel())
    if high >= len(names):
        raise ValueError(f"category_names: the batches hold category ids up to {high} but "
                         f"category_names has {len(names)} names; pass one name per id.")
    return names


@torch.no_grad()
def _score(model: MoETransformerLM, stream: list[Batch], n_categories: int,
           **controls: Mapping[int, Tensor] | None) -> _Score:
    """Summed next-byte nats and token counts per category, and per layer the tokens that chose
    each expert, over the stream under the routing ``controls``."""
    c = model.config
    device = model.tok_emb_VD.device
    nats_C, tokens_C = np.zeros(n_categories), np.zeros(n_categories, dtype=np.int64)
    chosen_LE = np.zeros((c.n_layers, c.n_experts), dtype=np.int64)
    for x, y, cat in stream:
        out = model(x.to(device), **controls)
        nats_N = F.cross_entropy(out.logits_BTV.float().reshape(-1, c.vocab_size),
                                 y.to(device).reshape(-1), reduction="none").double().cpu().numpy()
        cat_N = np.zeros(nats_N.size, dtype=np.int64) if cat is None else \
            cat.reshape(-1).cpu().numpy().astype(np.int64)
        nats_C += np.bincount(cat_N, weights=nats_N, minlength=n_categories)
        tokens_C += np.bincount(cat_N, minlength=n_categories)
        for layer, moe_out in enumerate(out.moe_outputs):
            chosen_LE[layer] += np.bincount(moe_out.routing.experts_NK.reshape(-1).cpu().numpy(),
                                            minlength=c.n_experts)
    return _Score(nats_C, tokens_C, chosen_LE)


@dataclass(frozen=True)
class InterventionEffect:
    """Bits per byte per category (nan where a category has no tokens) and each expert's share of
    tokens per layer, P(e in S), without (``baseline_*``) and with the intervention."""

    category_names: list[str]
    tokens_C: np.ndarray
    baseline_bpb_C: np.ndarray
    bpb_C: np.ndarray
    delta_bpb_C: np.ndarray
    baseline_bpb: float
    bpb: float
    delta_bpb: float
    baseline_share_LE: np.ndarray
    share_LE: np.ndarray
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


def intervention_effect(model: MoETransformerLM, batches: Iterable, *,
                        keep_experts: Mapping[int, Tensor] | None = None,
                        router_logit_offsets: Mapping[int, Tensor] | None = None,
                        max_tokens: int | None = DEFAULT_MAX_TOKENS,
                        category_names: Sequence[str] | None = None) -> InterventionEffect:
    """What an ablation (``keep_experts``: layer -> (E,) bool) and / or a steering
    (``router_logit_offsets``: layer -> (E,) float) does over the first ``max_tokens`` tokens of
    ``batches`` (tuples ``(x_BT, y_BT[, category_BT])``; categories named by ``category_names``,
    default the ByteCorpus :data:`~moekit.data.source_text.CATEGORIES`). Two passes over the
    capped stream."""
    model = check_lm("intervention_effect", model)
    stream = validation_stream(batches, max_tokens)
    names = _category_names(stream, category_names)
    base = _score(model, stream, len(names))
    after = _score(model, stream, len(names), keep_experts=keep_experts,
                   router_logit_offsets=router_logit_offsets)
    return InterventionEffect(
        category_names=names, tokens_C=base.tokens_C, baseline_bpb_C=base.bpb_C(),
        bpb_C=after.bpb_C(), delta_bpb_C=after.bpb_C() - base.bpb_C(), baseline_bpb=base.bpb(),
        bpb=after.bpb(), delta_bpb=after.bpb() - base.bpb(), baseline_share_LE=base.share_LE(),
        share_LE=after.share_LE(), n_tokens=int(base.tokens_C.sum()))


def _check_experts(owner: str, model: MoETransformerLM, layer: Any, experts: Iterable[Any]
                   ) -> list[int]:
    c = model.config
    if type(layer) is not int or not 0 <= layer < c.n_layers:
        raise ValueError(f"{owner}: layers must be indices in [0, n_layers={c.n_layers}); got "
                         f"{layer!r}.")
    experts = list(experts)
    if any(type(e) is not int or not 0 <= e < c.n_experts for e in experts):
        raise ValueError(f"{owner}: experts must be indices in [0, n_experts={c.n_experts}); got "
                         f"{experts} at layer {layer}.")
    return experts


def expert_masks(model: MoETransformerLM, drop: Mapping[int, Iterable[int]]) -> dict[int, Tensor]:
    """``keep_experts`` for the forward: layer -> (E,) bool, False at the experts in ``drop``.
    At least K experts must stay in every layer."""
    model = check_lm("expert_masks", model)
    c, masks = model.config, {}
    for layer, experts in drop.items():
        keep_E = torch.ones(c.n_experts, dtype=torch.bool)
        keep_E[_check_experts("expert_masks", model, layer, experts)] = False
        if int(keep_E.sum()) < c.top_k:
            raise ValueError(f"expert_masks: layer {layer} would keep {int(keep_E.sum())} experts, "
                             f"fewer than top_k={c.top_k} per token; drop at most "
                             f"{c.n_experts - c.top_k}.")
        masks[layer] = keep_E
    return masks


def expert_offsets(model: MoETransformerLM, offsets: Mapping[int, Mapping[int, float]]
                   ) -> dict[int, Tensor]:
    """``router_logit_offsets`` for the forward: layer -> (E,) float, ``offsets[layer][expert]``
    at the experts named, 0 elsewhere (positive draws tokens to an expert, negative pushes them
    away)."""
    model = check_lm("expert_offsets", model)
    out = {}
    for layer, by_expert in offsets.items():
        offset_E = torch.zeros(model.config.n_experts)
        for expert in _check_experts("expert_offsets", model, layer, by_expert):
            value = by_expert[expert]
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or math.isnan(value):
                raise ValueError(f"expert_offsets: offsets must be numbers; got "
                                 f"offsets[{layer}][{expert}]={value!r}.")
            offset_E[expert] = float(value)
        out[layer] = offset_E
    return out


def ablate_layer_experts(model: MoETransformerLM, batches: Iterable,
                         drop: Mapping[int, Iterable[int]], **options: Any) -> InterventionEffect:
    """:func:`intervention_effect` of removing the experts ``drop[layer]`` from their layers' choice
    (each token takes its K best among the rest).

    Example:
        >>> effect = ablate_layer_experts(lm, val, {0: [3]})  # doctest: +SKIP
        >>> dict(zip(effect.category_names, effect.delta_bpb_C))  # doctest: +SKIP
    """
    return intervention_effect(model, batches, keep_experts=expert_masks(model, drop), **options)


def steer_layer_experts(model: MoETransformerLM, batches: Iterable,
                        offsets: Mapping[int, Mapping[int, float]], **options: Any
                        ) -> InterventionEffect:
    """:func:`intervention_effect` of adding ``offsets[layer][expert]`` to those router logits;
    ``share_LE - baseline_share_LE`` is the change of routing.

    Example:
        >>> effect = steer_layer_experts(lm, val, {1: {2: 3.0}})  # doctest: +SKIP
        >>> effect.share_LE[1, 2] - effect.baseline_share_LE[1, 2]  # doctest: +SKIP
    """
    return intervention_effect(model, batches, router_logit_offsets=expert_offsets(model, offsets),
                               **options)


@dataclass(frozen=True)
class AblationTable:
    """:func:`ablation_table`: each expert ablated alone in its layer.

    Attributes:
        layers: the layers ablated (rows of the tables). category_names, tokens_C: the categories
            and their target counts in the capped stream; n_tokens: all of them.
        baseline_bpb_C, baseline_bpb: bits per byte without ablation.
        delta_bpb_LEC: ablated minus baseline bits per byte, (len(layers), E, C).
        delta_bpb_LE: the same over all tokens.
        share_LE: the baseline P(e in S) of each expert in those layers.
        max_tokens: the cap on the stream.
    """

    layers: list[int]
    category_names: list[str]
    tokens_C: np.ndarray
    n_tokens: int
    baseline_bpb_C: np.ndarray
    baseline_bpb: float
    delta_bpb_LEC: np.ndarray
    delta_bpb_LE: np.ndarray
    share_LE: np.ndarray
    max_tokens: int | None

    def ranked(self, top_n: int = 10) -> list[dict[str, Any]]:
        """The ``top_n`` most important (layer, expert) pairs (largest Δ bpb over all tokens),
        each with the category it hurts most."""
        check_int("AblationTable.ranked", "top_n", top_n, minimum=0)
        order = np.argsort(-self.delta_bpb_LE, axis=None, kind="stable")[:top_n]
        rows = []
        for flat in order:
            i, e = np.unravel_index(flat, self.delta_bpb_LE.shape)
            delta_C = np.nan_to_num(self.delta_bpb_LEC[i, e], nan=-np.inf)
            worst = int(np.argmax(delta_C))
            rows.append({"layer": self.layers[i], "expert": int(e),
                         "delta_bpb": float(self.delta_bpb_LE[i, e]),
                         "share": float(self.share_LE[i, e]),
                         "worst_category": self.category_names[worst],
                         "worst_delta_bpb": float(self.delta_bpb_LEC[i, e, worst])})
        return rows

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


def ablation_table(model: MoETransformerLM, batches: Iterable, *,
                   layers: Sequence[int] | None = None,
                   max_tokens: int | None = DEFAULT_MAX_TOKENS,
                   category_names: Sequence[str] | None = None,
                   router_logit_offsets: Mapping[int, Tensor] | None = None,
                   progress: bool = False) -> AblationTable:
    """Δ bits per byte per category of ablating each expert of each layer in ``layers`` (all by
    default) alone, over the first ``max_tokens`` tokens of ``batches``.

    Cost: the capped stream runs len(layers) * E + 1 times; ``max_tokens`` (16384 by default)
    bounds it. ``router_logit_offsets`` applies to the baseline and every ablation alike (ablate
    under a steering).

    Example:
        >>> table = ablation_table(lm, corpus.windows("validation", 128, 16))  # doctest: +SKIP
        >>> table.ranked(3)  # doctest: +SKIP
    """
    model = check_lm("ablation_table", model)
    c = model.config
    layers = list(range(c.n_layers)) if layers is None else list(layers)
    for layer in layers:
        _check_experts("ablation_table", model, layer, [])
    if c.n_experts - 1 < c.top_k:
        raise ValueError(f"ablation_table: with n_experts={c.n_experts} and top_k={c.top_k}, "
                         "removing an expert leaves fewer than top_k to choose from; nothing to "
                         "ablate one at a time.")
    stream = validation_stream(batches, max_tokens)
    names = _category_names(stream, category_names)
    base = _score(model, stream, len(names), router_logit_offsets=router_logit_offsets)
    delta_LEC = np.zeros((len(layers), c.n_experts, len(names)))
    delta_LE = np.zeros((len(layers), c.n_experts))
    runs = [(i, e) for i in range(len(layers)) for e in range(c.n_experts)]
    for i, e in tqdm(runs, desc="ablations", disable=not progress, leave=False):
        keep = expert_masks(model, {layers[i]: [e]})
        ablated = _score(model, stream, len(names), keep_experts=keep,
                         router_logit_offsets=router_logit_offsets)
        delta_LEC[i, e] = ablated.bpb_C() - base.bpb_C()
        delta_LE[i, e] = ablated.bpb() - base.bpb()
    return AblationTable(layers=layers, category_names=names, tokens_C=base.tokens_C,
                         n_tokens=int(base.tokens_C.sum()), baseline_bpb_C=base.bpb_C(),
                         baseline_bpb=base.bpb(), delta_bpb_LEC=delta_LEC, delta_bpb_LE=delta_LE,
                         share_LE=base.share_LE()[layers], max_tokens=max_tokens)

