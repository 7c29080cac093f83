"""Weights to and from the MoE blocks of Hugging Face transformers (Mixtral, Qwen3-MoE).

transformers is an optional dependency (``pip install moekit[interop]``); this module imports it
only inside :func:`transformers_block`. Layout of a transformers (>= 5) sparse MoE block:

    gate.weight               (E, D)       router logits = x @ gate.weight.T
    experts.gate_up_proj      (E, 2H, D)   rows [0, H) the gate projection, [H, 2H) the up
                                           projection
    experts.down_proj         (E, D, H)

Mixtral renormalises the top-k probabilities; Qwen3-MoE does when ``norm_topk_prob`` is set. Both
weight experts by softmax probabilities chosen by top-k, which is moekit's 'topk' router; at K = 1
they renormalise the one weight to 1.0 (moekit's ``scale_top1=False``), where moekit by default
weights it by its probability, as Switch does.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.nn.routers import RouterConfig
from moekit.nn.sparse import SparseMoE

FAMILIES = ("mixtral", "qwen3_moe")


def _family(block: nn.Module) -> str:
    name = type(block).__name__
    if name == "MixtralSparseMoeBlock":
        return "mixtral"
    if name == "Qwen3MoeSparseMoeBlock":
        return "qwen3_moe"
    raise TypeError(f"from_transformers: expected a MixtralSparseMoeBlock or "
                    f"Qwen3MoeSparseMoeBlock; got {name}.")


def from_transformers(block: nn.Module) -> SparseMoE:
    """Build a :class:`SparseMoE` with the weights of a transformers Mixtral or Qwen3-MoE block;
    its outputs equal the block's."""
    family = _family(block)
    gate_up_EHD = block.experts.gate_up_proj.detach()
    n_experts, two_h, d_model = gate_up_EHD.shape
    hidden = two_h // 2
    renormalize = True if family == "mixtral" else bool(block.gate.norm_topk_prob)
    layer = SparseMoE(d_model, n_experts, block.gate.top_k, hidden=hidden,
                      router=RouterConfig(kind="topk", top_k=block.gate.top_k,
                                          renormalize=renormalize, scale_top1=False),
                      experts="swiglu", activation=_activation_name(block.experts.act_fn),
                      load_balance_weight=0.0)
    with torch.no_grad():
        layer.router.w_DE.copy_(block.gate.weight.detach().T)
        layer.experts.w13_EFD.copy_(gate_up_EHD)  # the same layout: gate rows first, then up
        layer.experts.w2_EOH.copy_(block.experts.down_proj.detach())
    return layer.to(gate_up_EHD.dtype)


def to_transformers(layer: SparseMoE, block: nn.Module) -> nn.Module:
    """Copy a SwiGLU top-k :class:`SparseMoE`'s weights into a transformers block of the same
    sizes."""
    _family(block)
    c = layer.config
    if c.experts != "swiglu" or c.router.kind not in ("topk", "switch") or c.n_shared:
        raise ValueError("to_transformers: only SwiGLU experts with a top-k router and no shared "
                         f"experts map onto a transformers block; got experts={c.experts!r}, "
                         f"router={c.router.kind!r}, n_shared={c.n_shared}.")
    want = (c.n_experts, 2 * c.hidden, c.d_model)
    if tuple(block.experts.gate_up_proj.shape) != want or block.gate.top_k != c.router.top_k:
        raise ValueError(f"to_transformers: the block's experts.gate_up_proj is "
                         f"{tuple(block.experts.gate_up_proj.shape)} "
                         f"with top_k={block.gate.top_k}; "
                         f"this layer needs {want} with top_k={c.router.top_k}.")
    _check_weighting(layer, block)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.w_DE.T)
        block.experts.gate_up_proj.copy_(layer.experts.w13_EFD)
        block.experts.down_proj.copy_(layer.experts.w2_EOH)
    return block


def transformers_block(layer: SparseMoE, family: str = "mixtral", **config_kwargs: object
                       ) -> nn.Module:
    """A new transformers block of ``family`` with this layer's sizes and weights; ``config_kwargs``
    go to the transformers config (e.g. ``experts_implementation='grouped_mm'``)."""
    if family not in FAMILIES:
        raise ValueError(f"transformers_block: family must be one of {FAMILIES}; "
                         f"got family={family!r}.")
    c = layer.config
    if family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(hidden_size=c.d_model, intermediate_size=c.hidden,
                               num_local_experts=c.n_experts, num_experts_per_tok=c.router.top_k,
                               hidden_act=c.activation, **config_kwargs)
        block = MixtralSparseMoeBlock(config)
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        config = Qwen3MoeConfig(hidden_size=c.d_model, moe_intermediate_size=c.hidden,
                                num_experts=c.n_experts, num_experts_per_tok=c.router.top_k,
                                norm_topk_prob=c.router.renormalizes, hidden_act=c.activation,
                                **config_kwargs)
        block = Qwen3MoeSparseMoeBlock(config)
    return to_transformers(layer, block.to(layer.router.w_DE.dtype))


def _check_weighting(layer: SparseMoE, block: nn.Module) -> None:
    """Refuse a layer whose expert weights the block cannot reproduce: Mixtral always renormalises
    the top-k probabilities (to 1.0 at K = 1), Qwen3-MoE does when ``norm_topk_prob`` is set."""
    renormalizes = layer.config.router.renormalizes
    block_renormalizes = (_family(block) == "mixtral") or bool(block.gate.norm_topk_prob)
    if renormalizes != block_renormalizes:
        fix = ("RouterConfig(renormalize=True, scale_top1=False)" if block_renormalizes else
               "a Qwen3-MoE block with norm_topk_prob=True")
        verb = "renormalises" if renormalizes else "does not renormalise"
        raise ValueError(
            f"to_transformers: the layer {verb} its top-{layer.config.router.top_k} weights "
            f"(renormalize="
            f"{layer.config.router.renormalize}, scale_top1={layer.config.router.scale_top1}) but "
            f"the {type(block).__name__} {'does' if block_renormalizes else 'does not'}; their "
            f"outputs would differ. Use {fix}.")


def _activation_name(act: nn.Module) -> str:
    names = {"SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu", "GELU": "gelu",
             "ReLU": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid"}
    name = names.get(type(act).__name__)
    if name is None:
        raise ValueError(f"from_transformers: unsupported expert activation {type(act).__name__}; "
                         f"supported: {sorted(names)}.")
    return name
