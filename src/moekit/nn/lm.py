"""A small decoder-only transformer language model over bytes whose feed-forward blocks are routed
mixtures of experts (:class:`~moekit.nn.sparse.SparseMoE`), or dense SwiGLU MLPs of the same
active cost.

Shape legend: B batch, T positions, D model width, V vocabulary (256 bytes), E experts, K experts
chosen per token, N = B * T tokens (flattened in (B, T) order: token (b, t) is row b * T + t of
every layer's routing).

Each block is pre-norm: h += attention(RMSNorm(h)); h += FFN(RMSNorm(h)) (GPT-2, LLaMA), with
causal attention and rotary or learned positions (:mod:`moekit.nn.attention`). The output head is
tied to the token embedding by default (GPT-2, nanoGPT): one vector per byte, read and written;
untied (``tie_embeddings=False``) adds only V * D parameters at V = 256.

Initial weights (GPT-2 / nanoGPT): every matrix N(0, 0.02^2), the residual output projections
(attention's ``w_out_DD``, the experts' and the dense MLP's down projections) N(0, (0.02 / sqrt(2
* n_layers))^2) so that the residual stream's variance does not grow with depth, RMSNorm gains 1,
the noisy router's noise weights 0; all drawn from the caller's ``generator`` (the global RNG is
not touched).

Causality: token-choice routing without a capacity factor routes each token alone, so logit t
depends on bytes <= t only. With ``capacity_factor`` or expert choice, tokens compete for expert
slots across the batch and a later token can displace an earlier one: not strictly causal.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moekit._checks import check_choice, check_int, check_positive_float
from moekit.nn.attention import CausalSelfAttention, SwiGLU
from moekit.nn.finite import check_flag
from moekit.nn.grouped_mm import check_implementation
from moekit.nn.outputs import MoEOutput
from moekit.nn.routers import RouterConfig
from moekit.nn.sparse import SparseMoE, SparseMoEConfig

INIT_STD = 0.02
POSITIONS = ("rope", "learned")
FFNS = ("moe", "dense")
# forward's routing controls -> SparseMoE.forward's per-layer arguments
CONTROLS = {"router_logit_offsets": "logit_offset_E", "keep_experts": "keep_E",
            "forced_indices": "forced_experts_NK"}


@dataclasses.dataclass(frozen=True)
class LMCosts:
    """What one token costs in a forward pass (:meth:`LMConfig.costs`). FLOPs count 2 per
    multiply-add; elementwise work (norms, rotary, softmax, SiLU, top-k) is left out.

    Attributes:
        total_params: every parameter (what ``model.parameters()`` counts; a tied head once).
        active_params: the parameters one token's forward uses: all but the E - K experts it
            was not routed to.
        embedding_params: the token table (and the position table for learned positions).
        router_params: the routers' parameters (0 for the dense model).
        matmul_flops: 2 * the weight-matrix entries a token multiplies by: attention, router,
            its K (+ shared) experts or the dense MLP, output head.
        router_flops: the part of ``matmul_flops`` the routers take: 2 * D * E per layer (eval
            mode; noisy top-k doubles it in training). What the MoE costs beyond its dense twin.
        ffn_flops: the feed-forward part: 2 * 3 * D * (K + n_shared) * expert_hidden per layer,
            equal for the MoE and its dense twin.
        attention_flops: q.k and the weighted sum of values, 2 * 2 * D per attended position
            per layer, averaged over the (seq_len + 1) / 2 positions of a causal sequence.
    """

    total_params: int
    active_params: int
    embedding_params: int
    router_params: int
    matmul_flops: int
    router_flops: int
    ffn_flops: int
    attention_flops: float

    @property
    def flops_per_token(self) -> float:
        """Forward FLOPs per token; a training step (forward and backward) costs about 3 times."""
        return self.matmul_flops + self.attention_flops


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Everything needed to rebuild a :class:`MoETransformerLM` (keyword arguments only).

    Attributes:
        vocab_size: V, 256 for bytes. d_model: D. n_layers: blocks. n_heads: attention heads.
        max_seq_len: the longest input (sets the learned position table).
        positions: 'rope' (rotary, the default) or 'learned' (absolute, added to the embeddings).
        rope_base: the rotary base.
        ffn: 'moe' (routed SparseMoE blocks) or 'dense' (a SwiGLU MLP of hidden size
            ``dense_hidden`` = (K + n_shared) * expert_hidden: the MoE's active FLOPs).
        n_experts: E. router: the routers' :class:`~moekit.nn.routers.RouterConfig` (K is its
            ``top_k``). expert_hidden: each SwiGLU expert's hidden size. n_shared: shared experts.
        capacity_factor: None (dropless, causal) or the experts' capacity factor.
        load_balance_weight, z_loss_weight: weights of each MoE layer's auxiliary losses.
        tie_embeddings: the output head reuses the token embedding (True) or has its own table.
        experts_implementation: the experts' matmul path (see ``SparseMoEConfig``).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    positions: str = "rope"
    rope_base: float = 10000.0
    ffn: str = "moe"
    n_experts: int = 8
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)
    expert_hidden: int = 128
    n_shared: int = 0
    capacity_factor: float | None = None
    load_balance_weight: float = 0.01
    z_loss_weight: float = 0.0
    tie_embeddings: bool = True
    experts_implementation: str = "auto"

    def __post_init__(self) -> None:
        owner = "LMConfig"
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "n_experts",
                     "expert_hidden"):
            check_int(owner, name, getattr(self, name), minimum=1)
        check_int(owner, "n_shared", self.n_shared, minimum=0)
        check_choice(owner, "positions", self.positions, POSITIONS)
        check_choice(owner, "ffn", self.ffn, FFNS)
        check_positive_float(owner, "rope_base", self.rope_base)
        if self.d_model % self.n_heads:
            raise ValueError(f"{owner}: d_model must be a multiple of n_heads; got d_model="
                             f"{self.d_model}, n_heads={self.n_heads}. Change one of them.")
        if self.positions == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"{owner}: positions='rope' rotates pairs of features, so the head "
                             f"size d_model / n_heads must be even; got d_model={self.d_model}, "
                             f"n_heads={self.n_heads} (head size {self.d_model // self.n_heads}). "
                             "Change n_heads or use positions='learned'.")
        if not isinstance(self.router, RouterConfig):
            raise TypeError(f"{owner}: router must be a RouterConfig; got "
                            f"{type(self.router).__name__}. Use router=RouterConfig(kind='topk', "
                            "top_k=2).")
        if self.top_k > self.n_experts:
            raise ValueError(f"{owner}: router.top_k must be in [1, n_experts={self.n_experts}]; "
                             f"got router.top_k={self.router.top_k}. Lower top_k or add experts.")
        if self.capacity_factor is not None:
            check_positive_float(owner, "capacity_factor", self.capacity_factor)
        for name in ("load_balance_weight", "z_loss_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 <= value < math.inf:
                raise ValueError(f"{owner}: {name} must be a finite number >= 0; got "
                                 f"{name}={value!r}. Use 0 to switch the loss off.")
        check_flag(owner, "tie_embeddings", self.tie_embeddings)
        check_implementation(owner, self.experts_implementation)

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def dense_hidden(self) -> int:
        """The dense MLP's hidden size: (K + n_shared) * expert_hidden, the MoE's active size."""
        return (self.top_k + self.n_shared) * self.expert_hidden

    def moe_config(self) -> SparseMoEConfig:
        """Each MoE block's config. Its finite check is off: the inputs are checked byte ids, and
        a diverged model shows in the loss; the check would cost a sync per layer."""
        return SparseMoEConfig(self.d_model, self.n_experts, self.expert_hidden, self.router,
                               n_shared=self.n_shared, capacity_factor=self.capacity_factor,
                               load_balance_weight=self.load_balance_weight,
                               z_loss_weight=self.z_loss_weight,
                               experts_implementation=self.experts_implementation,
                               check_finite=False)

    def costs(self, seq_len: int | None = None) -> LMCosts:
        """Parameters and forward FLOPs per token (:class:`LMCosts`), at ``seq_len`` (default
        ``max_seq_len``) for attention.

        The MoE and its dense twin (``dataclasses.replace(config, ffn='dense')``) have equal
        ``ffn_flops``; their ``matmul_flops`` differ by ``router_flops`` alone.

        Example:
            >>> moe = LMConfig(d_model=32, n_layers=2, n_heads=2, n_experts=4, expert_hidden=16)
            >>> dense = dataclasses.replace(moe, ffn="dense")
            >>> moe.costs().ffn_flops == dense.costs().ffn_flops, moe.costs().router_flops
            (True, 512)
        """
        seq_len = check_int("LMConfig.costs", "seq_len",
                            self.max_seq_len if seq_len is None else seq_len, minimum=1)
        d, n_layers, vocab = self.d_model, self.n_layers, self.vocab_size
        swiglu = 3 * d * self.expert_hidden  # one expert's W1, W3 and W2
        embedding = vocab * d + (self.max_seq_len * d if self.positions == "learned" else 0)
        head = 0 if self.tie_embeddings else vocab * d
        attn, norms = 4 * d * d, 2 * d
        if self.ffn == "moe":
            router_w = d * self.n_experts
            router = router_w * (2 if self.router.noise == "gaussian" else 1)
            ffn_total = (self.n_experts + self.n_shared) * swiglu
            ffn_active = (self.top_k + self.n_shared) * swiglu
        else:
            router_w = router = 0
            ffn_total = ffn_active = 3 * d * self.dense_hidden
        layer_fixed = attn + norms + router
        total = embedding + head + d + n_layers * (layer_fixed + ffn_total)
        active = embedding + head + d + n_layers * (layer_fixed + ffn_active)
        matmul = 2 * (n_layers * (attn + router_w + ffn_active) + vocab * d)
        return LMCosts(total_params=total, active_params=active, embedding_params=embedding,
                       router_params=n_layers * router, matmul_flops=matmul,
                       router_flops=2 * n_layers * router_w,
                       ffn_flops=2 * n_layers * ffn_active,
                       attention_flops=n_layers * 4 * d * (seq_len + 1) / 2)


@dataclasses.dataclass(frozen=True)
class LMOutput:
    """What :class:`MoETransformerLM` computed.

    Attributes:
        logits_BTV: next-byte logits at every position.
        aux_loss: the sum over MoE layers of their auxiliary losses (0-d; zero when dense).
        moe_outputs: every MoE layer's :class:`~moekit.nn.outputs.MoEOutput`, bottom layer first
            (empty when dense); their ``routing`` rows are the N = B * T tokens in (B, T) order.
    """

    logits_BTV: Tensor
    aux_loss: Tensor
    moe_outputs: list[MoEOutput]


@dataclasses.dataclass(frozen=True)
class LMLoss:
    """:meth:`MoETransformerLM.loss`: ``loss`` = ``cross_entropy`` + ``aux_loss`` is what to
    backpropagate; ``cross_entropy`` is the mean next-byte cross-entropy in nats."""

    loss: Tensor
    cross_entropy: Tensor
    aux_loss: Tensor
    output: LMOutput

    @property
    def bits_per_byte(self) -> float:
        """The cross-entropy in bits: nats / ln 2 (8 for uniform guessing over 256 bytes)."""
        return float(self.cross_entropy.detach()) / math.log(2)


def cross_entropy(logits_BTV: Tensor, y_BT: Tensor) -> Tensor:
    """Mean cross-entropy of the next bytes ``y_BT`` under ``logits_BTV``, in nats (0-d)."""
    if y_BT.shape != logits_BTV.shape[:-1]:
        raise ValueError(f"cross_entropy: y_BT must have the logits' (B, T) shape "
                         f"{tuple(logits_BTV.shape[:-1])}; got y_BT.shape={tuple(y_BT.shape)}.")
    if logits_BTV.dtype in (torch.float16, torch.bfloat16):  # a mean over many tokens
        logits_BTV = logits_BTV.float()
    return F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]), y_BT.reshape(-1).long())


def _normal(shape: tuple[int, int], generator: torch.Generator | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape).normal_(0.0, INIT_STD, generator=generator))


class Block(nn.Module):
    """One pre-norm transformer block: attention, then the MoE or dense feed-forward."""

    def __init__(self, config: LMConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        d, out_std = config.d_model, INIT_STD / math.sqrt(2 * config.n_layers)
        rope = config.rope_base if config.positions == "rope" else None
        self.attn_norm = nn.RMSNorm(d)
        self.attn = CausalSelfAttention(d, config.n_heads, rotary_base=rope, std=INIT_STD,
                                        residual_std=out_std, generator=generator)
        self.ffn_norm = nn.RMSNorm(d)
        if config.ffn == "dense":
            self.ffn = SwiGLU(d, config.dense_hidden, std=INIT_STD, residual_std=out_std,
                              generator=generator)
            return
        self.ffn = SparseMoE.from_config(config.moe_config(), generator=generator)
        with torch.no_grad():  # SparseMoE draws fan-in uniform weights; redraw as the LM's
            for name, w in self.ffn.named_parameters():
                if name != "router.w_noise_DE":  # the noise scale starts at 0
                    w.normal_(0.0, out_std if name.endswith("w2_EOH") else INIT_STD,
                              generator=generator)

    def forward(self, h_BTD: Tensor, *, generator: torch.Generator | None = None,
                **controls: Tensor) -> tuple[Tensor, MoEOutput | None]:
        h_BTD = h_BTD + self.attn(self.attn_norm(h_BTD))
        if not isinstance(self.ffn, SparseMoE):
            return h_BTD + self.ffn(self.ffn_norm(h_BTD)), None
        out = self.ffn(self.ffn_norm(h_BTD), generator=generator, **controls)
        return h_BTD + out.output, out


class MoETransformerLM(nn.Module):
    """A decoder-only byte-level transformer with routed MoE feed-forward blocks.

    ``model(x_BT)`` takes byte ids (B, T), T <= ``max_seq_len``, and returns an :class:`LMOutput`.
    Optional routing controls, dicts from a layer index to that layer's tensor (None, the
    default, costs nothing; MoE models only):

    - ``router_logit_offsets``: layer -> (E,) float, added to that layer's router logits (steering).
    - ``keep_experts``: layer -> (E,) bool, the experts that layer's router may choose (ablation).
    - ``forced_indices``: layer -> (N, K) long, each token's experts (replay of a recorded
      ``routing.experts_NK``), weighted by the live router's rule over them (top-k: its
      probabilities renormalised over them: :func:`~moekit.nn.sparse.replay_routing`).

    ``generator``: at build, the initial weights (module docstring); in forward, router noise.

    Example:
        >>> config = LMConfig(d_model=32, n_layers=2, n_heads=2, n_experts=4, expert_hidden=16)
        >>> model = MoETransformerLM(config, generator=torch.Generator().manual_seed(0))
        >>> out = model(torch.randint(0, 256, (3, 10)))
        >>> out.logits_BTV.shape, len(out.moe_outputs), out.moe_outputs[0].routing.experts_NK.shape
        (torch.Size([3, 10, 256]), 2, torch.Size([30, 2]))
    """

    config_class = LMConfig

    def __init__(self, config: LMConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(config, LMConfig):
            raise TypeError(f"MoETransformerLM: config must be an LMConfig; got "
                            f"{type(config).__name__}. Use MoETransformerLM(LMConfig(...)).")
        self.config = c = config
        self.tok_emb_VD = _normal((c.vocab_size, c.d_model), generator)
        self.pos_emb_TD = (_normal((c.max_seq_len, c.d_model), generator)
                           if c.positions == "learned" else None)
        self.blocks = nn.ModuleList(Block(c, generator=generator) for _ in range(c.n_layers))
        self.norm = nn.RMSNorm(c.d_model)
        self.head_VD = None if c.tie_embeddings else _normal((c.vocab_size, c.d_model), generator)

    @classmethod
    def from_config(cls, config: LMConfig, *, generator: torch.Generator | None = None
                    ) -> MoETransformerLM:
        return cls(config, generator=generator)

    def forward(self, x_BT: Tensor, *, router_logit_offsets: Mapping[int, Tensor] | None = None,
                keep_experts: Mapping[int, Tensor] | None = None,
                forced_indices: Mapping[int, Tensor] | None = None,
                generator: torch.Generator | None = None) -> LMOutput:
        n_pos = self._check_input(x_BT)
        controls = self._layer_controls(router_logit_offsets=router_logit_offsets,
                                        keep_experts=keep_experts, forced_indices=forced_indices)
        h_BTD = F.embedding(x_BT, self.tok_emb_VD)
        if self.pos_emb_TD is not None:
            h_BTD = h_BTD + self.pos_emb_TD[:n_pos]
        aux_loss = h_BTD.new_zeros(())
        moe_outputs: list[MoEOutput] = []
        for layer, block in enumerate(self.blocks):
            h_BTD, moe_out = block(h_BTD, generator=generator, **controls.get(layer, {}))
            if moe_out is not None:
                moe_outputs.append(moe_out)
                aux_loss = aux_loss + moe_out.aux_loss
        h_BTD = self.norm(h_BTD)
        logits_BTV = F.linear(h_BTD, self.tok_emb_VD if self.head_VD is None else self.head_VD)
        return LMOutput(logits_BTV=logits_BTV, aux_loss=aux_loss, moe_outputs=moe_outputs)

    def loss(self, x_BT: Tensor, y_BT: Tensor, **kwargs: object) -> LMLoss:
        """Forward ``x_BT`` (with ``forward``'s keyword arguments) and score the next bytes
        ``y_BT``: an :class:`LMLoss` (``.loss`` to backpropagate, ``.bits_per_byte`` to report)."""
        out = self(x_BT, **kwargs)
        ce = cross_entropy(out.logits_BTV, y_BT)
        return LMLoss(loss=ce + out.aux_loss, cross_entropy=ce, aux_loss=out.aux_loss, output=out)

    def _check_input(self, x_BT: Tensor) -> int:
        c = self.config
        if not isinstance(x_BT, Tensor) or x_BT.ndim != 2 or x_BT.dtype != torch.long:
            got = (f"{x_BT.dtype} of shape {tuple(x_BT.shape)}" if isinstance(x_BT, Tensor)
                   else type(x_BT).__name__)
            raise ValueError(f"MoETransformerLM: x_BT must be a long tensor of byte ids, shape "
                             f"(batch, positions); got {got}. Use torch.tensor(list(data))[None].")
        if not 1 <= x_BT.shape[1] <= c.max_seq_len:
            raise ValueError(f"MoETransformerLM: x_BT has {x_BT.shape[1]} positions; the model "
                             f"takes 1 to max_seq_len={c.max_seq_len}. Cut it into windows.")
        if x_BT.numel() and x_BT.device.type != "meta":
            low, high = (int(v) for v in torch.aminmax(x_BT))
            if low < 0 or high >= c.vocab_size:
                raise ValueError(f"MoETransformerLM: x_BT must hold ids in [0, vocab_size="
                                 f"{c.vocab_size}); got values from {low} to {high}.")
        return x_BT.shape[1]

    def _layer_controls(self, **given: Mapping[int, Tensor] | None
                        ) -> dict[int, dict[str, Tensor]]:
        """forward's routing controls regrouped by layer, as SparseMoE.forward's arguments."""
        per_layer: dict[int, dict[str, Tensor]] = {}
        for name, by_layer in given.items():
            if by_layer is None:
                continue
            if self.config.ffn != "moe":
                raise ValueError(f"MoETransformerLM: {name} steers routers, and this model has "
                                 "none (ffn='dense'); use an ffn='moe' model.")
            if not isinstance(by_layer, Mapping):
                raise TypeError(f"MoETransformerLM: {name} must be a dict from layer index to "
                                f"tensor; got {type(by_layer).__name__}.")
            for layer, value in by_layer.items():
                if type(layer) is not int or not 0 <= layer < self.config.n_layers:
                    raise ValueError(f"MoETransformerLM: {name} keys must be layer indices in "
                                     f"[0, n_layers={self.config.n_layers}); got {layer!r}.")
                per_layer.setdefault(layer, {})[CONTROLS[name]] = value
        return per_layer
