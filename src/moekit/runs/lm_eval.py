"""Bits per byte of a `moekit lm train` model on validation bytes: the fixed sample the evaluations
during training read (:func:`eval_sample`: ``ceil(eval_bytes / seq_len)`` whole windows spread
evenly over the split) and the evaluation itself, overall and per token category
(:func:`evaluate`); the final evaluation reads the whole split
(:meth:`~moekit.data.ByteCorpus.windows`).

Shape legend: B windows per batch, T bytes per window, W windows, V = 256 byte values, C token
categories (:data:`moekit.data.CATEGORIES`).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch.nn import functional as F

from moekit.data import CATEGORIES, ByteCorpus
from moekit.nn.lm import MoETransformerLM
from moekit.runs.lm_checkpoint import StopRequest

EVAL_BATCH = 32


def eval_sample(corpus: ByteCorpus, seq_len: int, eval_bytes: int
                ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The fixed evaluation sample: ``ceil(eval_bytes / seq_len)`` full validation windows (at
    most all), spread evenly over the split, in batches of EVAL_BATCH ``(x_BT, y_BT, cat_BT)``."""
    x_WT, y_WT, category_WT = next(corpus.windows("validation", seq_len, batch_size=sys.maxsize))
    n_windows = len(x_WT)
    n_taken = min(n_windows, math.ceil(eval_bytes / seq_len))
    rows = torch.arange(n_taken) * n_windows // n_taken
    return [(x_WT[r], y_WT[r], category_WT[r]) for r in rows.split(EVAL_BATCH)]


@torch.no_grad()
def evaluate(model: MoETransformerLM, batches: Any, stop: StopRequest | None = None
             ) -> dict[str, Any]:
    """Bits per byte of ``model`` on ``batches`` of ``(x_BT, y_BT, category_BT)``: overall
    (``bpb``), the bytes scored, and per category (``categories``: name -> bpb and bytes; bpb
    None for a category with no bytes). The model is put back in training mode after."""
    model.eval()
    nats_C = torch.zeros(len(CATEGORIES), dtype=torch.float64)
    count_C = torch.zeros(len(CATEGORIES), dtype=torch.long)
    try:
        for x_BT, y_BT, category_BT in batches:
            if stop is not None:
                stop.check()
            logits_BTV = model(x_BT).logits_BTV
            nll_N = F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]),
                                    y_BT.reshape(-1), reduction="none")
            nats_C.index_add_(0, category_BT.reshape(-1), nll_N.double())
            count_C += torch.bincount(category_BT.reshape(-1), minlength=len(CATEGORIES))
    finally:
        model.train()
    bits_C = nats_C / math.log(2)
    return {"bpb": float(bits_C.sum() / count_C.sum()), "bytes": int(count_C.sum()),
            "categories": {name: {"bpb": float(bits_C[c] / count_C[c]) if count_C[c] else None,
                                  "bytes": int(count_C[c])} for c, name in enumerate(CATEGORIES)}}
