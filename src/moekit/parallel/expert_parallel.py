"""Expert parallelism for :class:`~moekit.nn.sparse.SparseMoE`: the experts sharded over the ranks
of an "ep" group, rows exchanged with all-to-all, exactly one process's layer over the global batch.

Shape legend: N rows on this rank, D features, E experts (global), L = E / W experts per rank, W
ranks in the ep group, M this rank's kept assignments, R rows this rank's experts receive.

The global batch is the ranks' rows concatenated in rank order (rank r's row n is global row
offset_r + n). Under that convention an :class:`ExpertParallelMoE` on every rank computes what one
process's SparseMoE with the same weights computes on the global batch:

- Routing: the router is replicated; each rank routes its own rows (token choice needs nothing
  else). Expert choice selects rows per expert over the whole batch, so the ranks gather the
  router logits (not differentiable: the selection is not) and apply the router's rule to the
  global batch; each rank keeps its rows' part. Router noise (noise='gaussian' or 'jitter') is
  drawn by each rank for its own rows from the generator it passes.
- Experts: global expert e lives on rank e // L as its local expert e % L (``local_experts``);
  the rows go there and back by differentiable ``all_to_all_single``, and the local bank runs them
  through the same grouped matmul as one process, each expert's rows in global row order.
  Shared experts are replicated and run locally.
- Capacity: global, per expert, as one process: C = max(1, ceil(capacity_factor * M_global / E)),
  the lowest global rows served first (:mod:`moekit.parallel.exchange`); the drops are exactly one
  process's, and ``ExpertParallelOutput.dropped_global_rows`` names them by global row.
- Auxiliary losses: from statistics summed over the ranks, equal to one process's at every world
  size (:mod:`moekit.parallel.global_losses`).
- The sigmoid router's load bias: training forwards count their rows' load on each rank; call
  :func:`~moekit.nn.routers.step_load_biases` (model, group) once per optimizer step with the group
  over which the batch is spread (the ep group: ``layer.process_group``), and the bias moves from
  the global counts.

Gradients: ``backward`` on every rank of its loss (its rows' task loss plus ``aux_loss``, which
counts once) gives the gradient of one process's loss on the global batch: each expert weight's
gradient is complete on its owner rank; the replicated parameters' (router, shared experts) are
partial, and their sum over the ranks is one process's
(:meth:`ExpertParallelMoE.sum_replicated_grads`: a SUM, where DDP averages).

Example, in every process of a group of 2 (``torchrun --nproc-per-node 2``)::

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    layer = ExpertParallelMoE(SparseMoE(16, n_experts=8, hidden=32, generator=seeded), mesh)
    out = layer(x_local)                      # this rank's rows
    (task_loss(out.output) + out.aux_loss).backward()
    layer.sum_replicated_grads()              # router, shared experts: summed over the ranks
    optimizer.step()
    step_load_biases(layer, layer.process_group)  # a sigmoid router's bias, once per step
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from moekit.nn.dispatch import combine_rows, gather_rows, plan_dispatch
from moekit.nn.finite import check_finite_rows
from moekit.nn.outputs import MoEOutput, Routing
from moekit.nn.routers import ROUTER_KINDS, ExpertChoiceRouter
from moekit.nn.sparse import SparseMoE, SparseMoEConfig
from moekit.parallel.exchange import (
    all_to_all,
    apply_capacity,
    exchange_counts,
    gather_equal,
    gather_rows_uneven,
    plan_exchange,
)
from moekit.parallel.global_losses import global_aux_losses
from moekit.parallel.mesh import (
    EP_DIM,
    check_divisible,
    check_same_everywhere,
    resolve_group,
)

OWNER = "ExpertParallelMoE"


@dataclass(frozen=True)
class ExpertParallelOutput(MoEOutput):
    """A :class:`~moekit.nn.outputs.MoEOutput` for this rank's rows (``output``, ``routing`` and
    ``dispatch`` index them locally; ``aux_loss`` is the global batch's, the same on every rank),
    with where they sit in the global batch.

    Attributes:
        row_offset: this rank's first row in the global batch. n_global_rows: its size.
    """

    row_offset: int = 0
    n_global_rows: int = 0

    @property
    def dropped_global_rows(self) -> Tensor:
        """The global rows of this rank's dropped assignments (with ``dispatch.dropped_experts``:
        the (row, expert) pairs one process drops, those of this rank's rows)."""
        assert self.dispatch is not None
        return self.dispatch.dropped_rows + self.row_offset


class ExpertParallelMoE(SparseMoE):
    """``layer`` with its experts sharded over the ep group of ``mesh`` (module docstring).

    Args:
        layer: the SparseMoE to shard, the same (config and weights) on every rank; this rank
            keeps a copy of its router and shared experts and of its block of experts.
        mesh: a DeviceMesh (1-D, or with a dimension named ``dim``), a ProcessGroup, or None for
            the default group. Every rank of it must build the layer, in the same order.
        dim: the mesh dimension the experts are sharded over.

    Raises, on every rank alike and before any exchange: RuntimeError when torch.distributed is
    not initialised; ValueError when the ep size does not divide n_experts, the mesh has no
    ``dim`` dimension or lives on another device type than the layer, or the ranks' layers or
    groups differ.
    """

    def __init__(self, layer: SparseMoE, mesh: DeviceMesh | dist.ProcessGroup | None = None, *,
                 dim: str = EP_DIM) -> None:
        nn.Module.__init__(self)
        if not isinstance(layer, SparseMoE) or isinstance(layer, ExpertParallelMoE):
            raise TypeError(f"{OWNER}: layer must be a SparseMoE (not yet sharded); got "
                            f"{type(layer).__name__}.")
        ep = resolve_group(OWNER, mesh, dim)
        c = layer.config
        per_rank = check_divisible(OWNER, c.n_experts, ep.size)
        device = next(layer.parameters()).device
        if ep.device_mesh is not None and ep.device_mesh.device_type != device.type:
            raise ValueError(f"{OWNER}: the mesh is on {ep.device_mesh.device_type!r} but the "
                             f"layer's weights are on {device.type!r}; move the layer "
                             "(layer.to(...)) or build the mesh on its device type.")
        check_same_everywhere(OWNER, {
            "n_experts": c.n_experts, "d_model": c.d_model, "hidden": c.hidden,
            "top_k": c.router.top_k, "n_shared": c.n_shared, "ep size": ep.size,
            "router kind": ROUTER_KINDS.index(c.router.kind),
            "experts (0: swiglu, 1: mlp)": int(c.experts == "mlp"),
            "the ep group's first rank": dist.get_process_group_ranks(ep.group)[0],
            "capacity_factor (x 1e9)": -1 if c.capacity_factor is None
            else round(c.capacity_factor * 1e9)}, ep)
        self.config = c
        self.ep = ep
        self.router = copy.deepcopy(layer.router)
        self.shared = copy.deepcopy(layer.shared)
        block = ep.local_experts(c.n_experts)
        self.experts = c.expert_config().build(c.d_model, c.d_model, per_rank)
        self.experts.to(device=device, dtype=next(layer.experts.parameters()).dtype)
        source = dict(layer.experts.named_parameters())
        with torch.no_grad():
            for name, p in self.experts.named_parameters():
                p.copy_(source[name][block.start:block.stop])
                p.requires_grad_(source[name].requires_grad)
        self.train(layer.training)

    @classmethod
    def from_config(cls, config: SparseMoEConfig, *, generator: torch.Generator | None = None
                    ) -> SparseMoE:
        raise TypeError(f"{OWNER}: build the layer first, then shard it: "
                        "ExpertParallelMoE(SparseMoE.from_config(config), mesh).")

    @property
    def process_group(self) -> dist.ProcessGroup:
        """The ep group: the group to sum the sigmoid router's counts over
        (``step_load_biases(model, layer.process_group)``)."""
        return self.ep.group

    @property
    def local_experts(self) -> range:
        """The global indices of this rank's experts: local expert j is global expert start + j."""
        return self.ep.local_experts(self.config.n_experts)

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None,
                logit_offset_E: Tensor | None = None, keep_E: Tensor | None = None,
                forced_experts_NK: Tensor | None = None) -> ExpertParallelOutput:
        """Route this rank's rows ``x`` (..., D), run them on the experts' ranks, combine.

        Every rank of the group must call it (with its own rows, possibly none) in the same
        order; the routing controls are :meth:`SparseMoE.route`'s.
        """
        c = self.config
        if x.shape[-1] != c.d_model:
            raise ValueError(f"{OWNER}: x has {x.shape[-1]} features in its last axis but the "
                             f"layer expects d_model={c.d_model}; got x.shape={tuple(x.shape)}.")
        if c.check_finite:
            check_finite_rows(OWNER, x)
        x_ND = x.reshape(-1, c.d_model)
        routing = self.route(x_ND, generator=generator, logit_offset_E=logit_offset_E,
                             keep_E=keep_E, forced_experts_NK=forced_experts_NK)
        if isinstance(self.router, ExpertChoiceRouter):
            routing = self._choose_over_global_batch(routing, keep_E)
        out = self.forward_routed(x_ND, routing)
        return dataclasses.replace(out, output=out.output.reshape(x.shape))

    def forward_routed(self, x_ND: Tensor, routing: Routing) -> ExpertParallelOutput:
        """Everything after the router for this rank's rows ``x_ND`` (N, D), as
        :meth:`SparseMoE.forward_routed` over the global batch: the count exchange, global
        capacity, the rows to their experts' ranks and back, the combine, the shared experts and
        the global auxiliary losses. Every rank of the group must call it."""
        c = self.config
        plan = plan_dispatch(routing, c.n_experts)  # dropless here: capacity is global
        rows_W, counts_WE = exchange_counts(x_ND.shape[0], plan.counts_E, self.ep)
        exchange = plan_exchange(rows_W, counts_WE, self.ep.rank,
                                 capacity_factor=c.capacity_factor)
        plan = apply_capacity(plan, exchange, self.ep.rank)
        x_RD = all_to_all(gather_rows(x_ND, plan), exchange.recv_splits, exchange.send_splits,
                          self.ep)
        y_RD = self.experts.forward_grouped(x_RD.index_select(0, exchange.order_R),
                                            exchange.recv_counts_L,
                                            implementation=c.experts_implementation)
        y_MD = all_to_all(y_RD.index_select(0, exchange.restore_R), exchange.send_splits,
                          exchange.recv_splits, self.ep)
        y_ND = combine_rows(y_MD, plan, x_ND.shape[0])
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND).sum(1)
        aux_loss, parts = global_aux_losses(c, routing, counts_WE.sum(0), exchange.n_global_rows,
                                            self.ep)
        return ExpertParallelOutput(output=y_ND, routing=routing,
                                    aux_loss=aux_loss, aux_parts=parts, dispatch=plan,
                                    row_offset=exchange.row_offset,
                                    n_global_rows=exchange.n_global_rows)

    def _choose_over_global_batch(self, routing: Routing, keep_E: Tensor | None) -> Routing:
        """Expert choice over the global batch: every rank applies the rule to every rank's
        logits (the same selection everywhere) and keeps its rows' part."""
        n_rows = routing.logits_NE.shape[0]
        rows_W = gather_equal(routing.logits_NE.new_tensor([n_rows], dtype=torch.long),
                              self.ep)[:, 0].tolist()
        logits_GE = gather_rows_uneven(routing.logits_NE, rows_W, self.ep)  # G: global rows
        offset = sum(rows_W[: self.ep.rank])
        chosen_NE = self.router.choose(logits_GE, keep_E).mask_NK[offset:offset + n_rows]
        return Routing(routing.probs_NE * chosen_NE, routing.experts_NK, routing.probs_NE,
                       routing.logits_NE, mask_NK=chosen_NE)

    def replicated_parameters(self) -> list[nn.Parameter]:
        """The parameters every rank holds alike: the router's and the shared experts'."""
        shared = [] if self.shared is None else list(self.shared.parameters())
        return [*self.router.parameters(), *shared]

    @torch.no_grad()
    def sum_replicated_grads(self) -> None:
        """Sum the replicated parameters' gradients over the ep group (all_reduce SUM), so every
        rank holds one process's gradient; call after the step's backwards, before the optimizer.
        Expert gradients need nothing (each lives on its owner). Every rank must call it."""
        for p in self.replicated_parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad, group=self.ep.group)
            p.grad = grad

    def expert_dtensors(self) -> dict[str, DTensor]:
        """The experts' weights as global (E, ...) DTensors sharded on their first axis over the ep
        mesh (``Shard(0)``), each rank's block local (no copy): the global view, for
        torch.distributed.checkpoint and DTensor tools."""
        mesh = self.ep.device_mesh or DeviceMesh.from_group(
            self.ep.group, next(self.parameters()).device.type)
        views = {}
        for name, p in self.experts.named_parameters():
            shape = (self.config.n_experts, *p.shape[1:])
            stride = torch.empty(shape, device="meta").stride()
            views[name] = DTensor.from_local(p, mesh, [Shard(0)], run_check=False, shape=shape,
                                             stride=stride)
        return views

    def full_layer(self) -> SparseMoE:
        """The unsharded SparseMoE on every rank (the experts gathered): one process's layer, e.g.
        to save with :func:`moekit.io.save_model` from rank 0. Every rank must call it."""
        layer = SparseMoE.from_config(self.config)
        first = next(self.experts.parameters())
        layer.to(device=first.device, dtype=first.dtype)
        layer.router.load_state_dict(self.router.state_dict())
        if self.shared is not None:
            layer.shared.load_state_dict(self.shared.state_dict())
        with torch.no_grad():
            for name, p in layer.experts.named_parameters():
                local = dict(self.experts.named_parameters())[name].detach()
                p.copy_(gather_equal(local, self.ep).reshape(p.shape))
        return layer.train(self.training)


def shard_experts(model: nn.Module, mesh: DeviceMesh | dist.ProcessGroup | None = None, *,
                  dim: str = EP_DIM) -> nn.Module:
    """Replace every :class:`~moekit.nn.sparse.SparseMoE` in ``model`` by its
    :class:`ExpertParallelMoE` over ``mesh``, in place (the model itself if it is one); returns the
    model. Every rank must call it on the same model."""
    if isinstance(model, SparseMoE) and not isinstance(model, ExpertParallelMoE):
        return ExpertParallelMoE(model, mesh, dim=dim)
    for name, child in list(model.named_children()):
        setattr(model, name, shard_experts(child, mesh, dim=dim))
    return model
