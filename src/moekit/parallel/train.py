"""Train the byte-level MoE language model with its experts sharded over processes, and get one
process's losses: ``torchrun --nproc-per-node N -m moekit lm train-ep --out DIR``.

Shape legend: B windows in the global batch, T bytes per window, W ranks, b = B / W windows per
rank, V = 256 byte values.

Every step draws one global batch (B, T) of the standard library's bytes from one seeded
generator, as one process would; rank r trains on its windows [r b, (r + 1) b). The model is
:class:`~moekit.nn.lm.MoETransformerLM` put on the (dp, ep) = (1, W) mesh by
:func:`~moekit.parallel.data_parallel.parallelize_moe`: every SparseMoE block becomes its
:class:`~moekit.parallel.expert_parallel.ExpertParallelMoE` over the W ranks, everything else is
replicated under DDP. One process's loss on the global batch is the mean cross-entropy over its
B T bytes plus the auxiliary losses; rank r backpropagates its share, (b T / B T) * its mean
cross-entropy plus the auxiliary loss (the EP layers' aux losses are the global batch's, and each
rank's backward carries its rows' part of their gradient). Then:

- the experts' gradients are complete on their owner ranks (the all-to-all's backward brings
  every rank's rows' part);
- every other parameter (embeddings, attention, norms, routers, shared experts) is reduced by
  DDP, which SUMS (parallelize_moe's comm hook: each rank's loss is already its share);
- the gradient norm is clipped globally: the replicated parameters' squares once, plus the
  experts' squares summed over the ranks;
- AdamW steps each rank's parameters; the sigmoid router's bias steps from counts summed over
  the ranks.

So the losses, gradients and weights are one process's on the same batches up to float rounding
(summation order), for routers without noise. Without a process group (``moekit lm train-ep``
alone) the same code trains the plain model: the single-process reference. A run
writes ``history.json`` (rank 0: the per-step losses) and a topology-free checkpoint
(:mod:`moekit.parallel.checkpoint`) into ``--out``; ``--resume CKPT`` continues one at any world
size (the batches it drew are drawn again and skipped).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moekit.data import ByteCorpus, stdlib_corpus
from moekit.exceptions import DataError, Setting
from moekit.io.files import write_text_atomic
from moekit.nn.lm import LMConfig, MoETransformerLM, cross_entropy
from moekit.nn.routers import ROUTER_KINDS, RouterConfig, step_load_biases
from moekit.parallel.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from moekit.parallel.data_parallel import (
    DP_DIM,
    expert_parameter_names,
    parallelize_moe,
    reduce_expert_grads,
)
from moekit.parallel.mesh import EP_DIM, check_divisible

logger = logging.getLogger(__name__)

HISTORY_FILE, CHECKPOINT_DIR = "history.json", "checkpoint"
BETAS, GRAD_CLIP = (0.9, 0.95), 1.0
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Options a resumed run may change: they touch neither the weights nor the batches.
RESUME_MAY_CHANGE = ("out", "steps", "resume", "overwrite", "timeout_s")


@dataclasses.dataclass(frozen=True)
class EPTrainConfig:
    """The options of ``moekit lm train-ep`` (``--batch-size`` for ``batch_size``).

    ``batch_size``: the global batch B (windows per step), split evenly over the ranks.
    ``dtype``: 'float32' or 'float64' (for comparisons to the last digits). ``resume``: a
    checkpoint to continue from (saved at any world size). ``timeout_s``: the process group's
    timeout, after which a rank whose peer died fails instead of waiting.
    """

    out: str = "runs/lm-ep"
    steps: int = 20
    batch_size: int = 8
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_experts: int = 8
    top_k: int | None = None
    router: str = "topk"
    expert_hidden: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    max_bytes: int = 1_000_000
    seed: int = 0
    dtype: str = "float32"
    resume: str | None = None
    overwrite: bool = False
    timeout_s: float = 120.0

    def model_config(self) -> LMConfig:
        return LMConfig(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                        max_seq_len=self.seq_len, n_experts=self.n_experts,
                        router=RouterConfig(kind=self.router, top_k=self.top_k),
                        expert_hidden=self.expert_hidden)


def check_options(config: EPTrainConfig, world: int) -> LMConfig:
    """Refuse options that cannot run at ``world`` ranks, on every rank alike, before any work."""
    for name in ("steps", "batch_size", "seq_len", "max_bytes"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(Setting(name), " must be an integer >= 1; got ",
                            Setting(name, value), ".")
    if config.batch_size % world:
        raise DataError(Setting("batch_size", config.batch_size), f" windows cannot be split "
                        f"evenly over {world} ranks; pass a multiple of {world}, e.g. ",
                        Setting("batch_size", world * max(1, config.batch_size // world)), ".")
    if config.dtype not in DTYPES:
        raise DataError(Setting("dtype", config.dtype), f" is not one of {sorted(DTYPES)}.")
    if config.router not in ROUTER_KINDS:
        raise DataError(Setting("router", config.router), f" is not one of {ROUTER_KINDS}.")
    check_divisible("moekit.parallel.train", config.n_experts, world)
    return config.model_config()


def clip_global_grad_norm(model: nn.Module, max_norm: float, mesh: DeviceMesh | None) -> float:
    """Scale every gradient so that the norm of the whole model's gradient (one process's: the
    replicated parameters once, every rank's experts) is at most ``max_norm``; returns the norm
    before clipping. ``mesh``: the (dp, ep) mesh the experts are sharded over (None: one
    process)."""
    names = set(expert_parameter_names(model))
    sharded = {id(p) for name, p in model.named_parameters() if name in names}
    grads = [(p.grad, id(p) in sharded) for p in model.parameters() if p.grad is not None]
    zero = grads[0][0].new_zeros(())
    replicated = sum((g.pow(2).sum() for g, s in grads if not s), zero)
    experts = sum((g.pow(2).sum() for g, s in grads if s), zero)
    if mesh is not None:
        dist.all_reduce(experts, group=mesh[EP_DIM].get_group())
    norm = torch.sqrt(replicated + experts)
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # torch's clip_grad_norm_ rule
    for g, _ in grads:
        g.mul_(scale)
    return float(norm)


@dataclasses.dataclass
class EPTrainer:
    """What a step reads and changes: the model (``step_model``: its DDP wrapper, or the model
    itself in one process), the optimizer, the (dp, ep) mesh (None: one process), the batch
    generator and the history."""

    model: nn.Module
    step_model: nn.Module
    optimizer: torch.optim.Optimizer
    mesh: DeviceMesh | None
    batches: torch.Generator
    history: list[dict[str, Any]]

    @property
    def rank_world(self) -> tuple[int, int]:
        """This process's rank (its block of the global batch) and the number of ranks."""
        return (0, 1) if self.mesh is None else (dist.get_rank(), dist.get_world_size())

    def step(self, x_BT: Tensor, y_BT: Tensor) -> dict[str, Any]:
        """One optimizer step on the global batch ``x_BT`` -> ``y_BT`` (this rank takes its
        windows); returns the step's record (the global batch's losses)."""
        began = time.perf_counter()
        rank, world = self.rank_world
        local = slice(rank * len(x_BT) // world, (rank + 1) * len(x_BT) // world)
        x_bT, y_bT = x_BT[local], y_BT[local]
        out = self.step_model(x_bT)
        share = y_bT.numel() / y_BT.numel()
        ce_share = share * cross_entropy(out.logits_BTV, y_bT)
        self.optimizer.zero_grad(set_to_none=True)
        (ce_share + out.aux_loss).backward()  # dp = 1: the aux loss counts once (module doc)
        if self.mesh is not None:
            reduce_expert_grads(self.model, self.mesh)  # over dp: of size 1, kept for the recipe
        norm = clip_global_grad_norm(self.model, GRAD_CLIP, self.mesh)
        self.optimizer.step()
        group = None if self.mesh is None else dist.group.WORLD
        step_load_biases(self.model, group)
        ce = ce_share.detach().clone()
        if group is not None:
            dist.all_reduce(ce, group=group)
        record = {"step": len(self.history) + 1, "loss": float(ce + out.aux_loss.detach()),
                  "cross_entropy": float(ce), "aux_loss": float(out.aux_loss.detach()),
                  "grad_norm": norm, "seconds": time.perf_counter() - began}
        self.history.append(record)
        return record


def expert_parallel_mesh() -> DeviceMesh:
    """Every process of the default group as one expert-parallel group: the (dp, ep) = (1, W)
    mesh of :func:`~moekit.parallel.data_parallel.parallelize_moe`."""
    return init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=(DP_DIM, EP_DIM))


def build_trainer(config: EPTrainConfig, mesh: DeviceMesh | None) -> EPTrainer:
    """The model at its seeded initial weights (experts sharded over ``mesh`` when given, the rest
    under DDP), AdamW (weight decay on matrices), and the batch generator (seed + 1)."""
    model = MoETransformerLM(config.model_config(),
                             generator=torch.Generator().manual_seed(config.seed))
    model = model.to(DTYPES[config.dtype]).train()
    step_model: nn.Module = model
    if mesh is not None:
        step_model = parallelize_moe(model, mesh)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}],
                                  lr=config.lr, betas=BETAS)
    return EPTrainer(model, step_model, optimizer, mesh,
                     torch.Generator().manual_seed(config.seed + 1), [])


def _identity(config: EPTrainConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUME_MAY_CHANGE}


def _resume(trainer: EPTrainer, config: EPTrainConfig, corpus: ByteCorpus) -> None:
    """Load ``config.resume`` (any world size) and fast-forward the batch generator past the
    batches its steps drew; a DataError naming the options that differ from the saved run's."""
    saved = read_checkpoint_info(config.resume).metadata.get("options", {})
    changed = [k for k, v in _identity(config).items() if saved.get(k) != v]
    if changed:
        parts: list[str | Setting] = [f"cannot resume {config.resume!r}: it ran with "]
        for i, key in enumerate(changed):
            parts += [", " if i else "", Setting(key, saved.get(key)), " not ",
                      Setting(key, getattr(config, key))]
        raise DataError(*parts, "; pass its options, or start a new run.")
    info = load_checkpoint(config.resume, trainer.model, trainer.optimizer,
                           local=trainer.mesh is None)
    trainer.history = list(info.metadata["history"])
    if len(trainer.history) > config.steps:
        raise DataError(f"{config.resume!r} has run {len(trainer.history)} steps; pass ",
                        Setting("steps", len(trainer.history)), " or more.")
    for _ in trainer.history:
        corpus.batch("train", config.batch_size, config.seq_len, trainer.batches)


def train(config: EPTrainConfig, mesh: DeviceMesh | None = None) -> dict[str, Any]:
    """Run ``config`` with the experts sharded over ``mesh`` (:func:`expert_parallel_mesh`: every
    process of the default group calls this), or in one process (None: the plain model, the
    reference); returns the history rank 0 writes to ``out/history.json``, beside the
    checkpoint ``out/checkpoint``.

    Example (one process, a few seconds)::

        train(EPTrainConfig(steps=3, d_model=16, n_experts=4, expert_hidden=16, seq_len=16,
                            max_bytes=100_000, out="runs/lm-ep-tiny"))
    """
    world = 1 if mesh is None else mesh.size()
    lm_config = check_options(config, world)
    out = Path(config.out)
    if not config.overwrite and ((out / HISTORY_FILE).exists() or (out / CHECKPOINT_DIR).exists()):
        raise DataError(f"{str(out)!r} holds a run; pass ", Setting("overwrite", True),
                        " to replace it, or another ", Setting("out"), ".")
    corpus = stdlib_corpus(max_bytes=config.max_bytes)
    trainer = build_trainer(config, mesh)
    if config.resume is not None:
        _resume(trainer, config, corpus)
    rank = trainer.rank_world[0]
    while len(trainer.history) < config.steps:
        record = trainer.step(*corpus.batch("train", config.batch_size, config.seq_len,
                                            trainer.batches))
        if rank == 0:
            logger.info("step %d: loss %.6f (cross-entropy %.6f, aux %.6f), %.2f s",
                        record["step"], record["loss"], record["cross_entropy"],
                        record["aux_loss"], record["seconds"])
    history = {"mode": "single-process" if mesh is None else "expert-parallel",
               "world_size": world, "options": dataclasses.asdict(config),
               "model": dataclasses.asdict(lm_config), "corpus_sha256":
               corpus.record["splits"]["train"]["sha256"], "steps": trainer.history}
    save_checkpoint(out / CHECKPOINT_DIR, trainer.model, trainer.optimizer,
                    metadata={"options": _identity(config), "history": trainer.history},
                    overwrite=True, local=mesh is None)
    if rank == 0:
        write_text_atomic(out / HISTORY_FILE, json.dumps(history, indent=1))
    return history


def run_launched(config: EPTrainConfig) -> dict[str, Any]:
    """:func:`train`, in torchrun's process group when launched by it (gloo; on the loopback
    interface when the master is local), else in this one process; the history."""
    launched = "WORLD_SIZE" in os.environ and not dist.is_initialized()
    if launched:
        local = os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost")
        if local and sys.platform.startswith("linux"):  # gloo's peers: loopback only
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", timeout=timedelta(seconds=config.timeout_s))
    try:
        return train(config, expert_parallel_mesh() if dist.is_initialized() else None)
    finally:
        if launched:
            dist.destroy_process_group()


__all__ = ["EPTrainConfig", "EPTrainer", "build_trainer", "check_options",
           "clip_global_grad_norm", "expert_parallel_mesh", "run_launched", "train"]

