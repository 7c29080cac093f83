"""Replay of recorded routing on a :class:`~moekit.nn.lm.MoETransformerLM`: every layer's experts
forced to those recorded (:func:`~moekit.analysis.layer_recorder.record_layers`), their weights
from the live routers (:func:`~moekit.nn.sparse.replay_routing`: the router's own rule over the
forced experts). Replaying what the model chose reproduces its routing and logits bit for bit, and
since the weights stay functions of the router logits, the task loss reaches the routers.

Shape legend: B sequences, T positions, N = B * T tokens in (B, T) order, L MoE layers, K experts
chosen per token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from moekit.analysis.layer_interventions import check_lm
from moekit.nn.lm import LMOutput, MoETransformerLM


def forced_indices(indices_NLK: Any, device: torch.device | str | None = None
                   ) -> dict[int, Tensor]:
    """The forward's ``forced_indices`` from recorded (N, L, K) indices (a LayerRecording's
    ``indices_TLK`` rows of one batch): layer l -> (N, K) long."""
    idx_NLK = torch.as_tensor(np.asarray(indices_NLK)).long()
    if idx_NLK.ndim != 3:
        raise ValueError(f"forced_indices: indices_NLK must have shape (N, L, K); got "
                         f"{tuple(idx_NLK.shape)}. Pass recording.indices_TLK[start:stop].")
    return {layer: idx_NLK[:, layer].to(device) for layer in range(idx_NLK.shape[1])}


def replay_layers(model: MoETransformerLM, x_BT: Tensor, indices_NLK: Any,
                  **forward_kwargs: Any) -> LMOutput:
    """Run ``model`` on ``x_BT`` with every layer's experts forced to the recorded ``indices_NLK``
    (N = B * T tokens in (B, T) order, from :func:`~moekit.analysis.layer_recorder.record_layers`),
    weighted by the live routers (:func:`~moekit.nn.sparse.replay_routing`). Not under no_grad:
    the task loss reaches the routers through the weights.

    Example:
        >>> from moekit.analysis.layer_recorder import record_layers
        >>> from moekit.nn.lm import LMConfig
        >>> gen = torch.Generator().manual_seed(0)
        >>> lm = MoETransformerLM(LMConfig(d_model=16, n_layers=2, n_heads=2, n_experts=4,
        ...                                expert_hidden=16), generator=gen).eval()
        >>> x_BT = torch.randint(0, 256, (2, 8), generator=gen)
        >>> rec = record_layers(lm, x_BT)
        >>> torch.equal(replay_layers(lm, x_BT, rec.indices_TLK).logits_BTV, lm(x_BT).logits_BTV)
        True
    """
    model = check_lm("replay_layers", model)
    forced = forced_indices(indices_NLK, model.tok_emb_VD.device)
    n_layers, n_tokens = model.config.n_layers, x_BT.numel()
    rows = next(iter(forced.values())).shape[0]
    if len(forced) != n_layers or rows != n_tokens:
        raise ValueError(f"replay_layers: indices_NLK must have shape (N={n_tokens}, "
                         f"L={n_layers}, K), one row per token of x_BT {tuple(x_BT.shape)}; got "
                         f"({rows}, {len(forced)}, K).")
    return model(x_BT, forced_indices=forced, **forward_kwargs)
