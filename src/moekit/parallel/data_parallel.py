"""Expert parallelism combined with data parallelism on a 2-D (dp, ep) DeviceMesh: the experts
sharded over "ep" and replicated over "dp", every other parameter replicated on all dp x ep ranks.

Shape legend: P = dp size, Q = ep size, W = P * Q ranks, E experts, L = E / Q experts per rank.

Who holds what, and who reduces it (PyTorch's own machinery throughout):

- Experts: each :class:`~moekit.parallel.expert_parallel.ExpertParallelMoE` owns its ep block of
  L experts (:func:`~moekit.parallel.expert_parallel.shard_experts` over the "ep" dimension).
  Their gradient on a rank is already complete for its ep group's rows (the all-to-all backward
  brings every ep rank's contribution); :func:`reduce_expert_grads` adds it over the dp replicas
  by redistributing it as a DTensor from ``Partial()`` (a per-replica partial sum) to
  ``Replicate()`` over the "dp" sub-mesh (one all_reduce SUM each).
- Everything else (embeddings, linear layers, routers, shared experts): replicated on every rank
  and reduced during backward by :class:`~torch.nn.parallel.DistributedDataParallel` over the
  whole mesh, with the experts excluded (DDP's ignore list,
  ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``) and a DDP comm hook
  (``register_comm_hook``) that sums: DDP averages by default.

The global batch is the ranks' row blocks in mesh order, dp major: rank (d, q) holds block
d * Q + q (with ``init_device_mesh`` that is the global rank). Each dp replica d computes exactly
what one process's model computes on its micro-batch (its ep ranks' rows concatenated): routing,
capacity, expert choice and the auxiliary losses are over that micro-batch, so a (dp, ep) step is
one process's gradient accumulation over the P micro-batches; with row-wise routing (token choice,
no capacity) the task loss's gradient is one process's on the whole global batch.

Loss scaling (gradients are SUMMED everywhere, never averaged): each rank's loss must be its
share of one process's loss, i.e. for a mean over the global batch of G rows::

    loss_r = task_loss(rows of rank r).sum() / G + aux_loss / P

(``aux_loss`` is its ep group's, counted once per group; dividing by P averages the P
micro-batches' auxiliary losses.) With equal row counts, ``.sum() / G`` is the local mean / W.
Do not call :meth:`ExpertParallelMoE.sum_replicated_grads` here: DDP does that reduction. With
gradient accumulation, run all but the last micro-batch under ``model.no_sync()`` (DDP) and call
:func:`reduce_expert_grads` once, after the last backward.

Example, in each of 4 processes (``torchrun --nproc-per-node 4``)::

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    model = parallelize_moe(build_model(), mesh)   # same weights on every rank
    y, aux = model(x_local)
    ((y - target_local).square().sum() / global_rows + aux / 2).backward()
    reduce_expert_grads(model, mesh)
    optimizer.step()
    step_load_biases(model, dist.group.WORLD)      # a sigmoid router's bias: counts of all ranks
"""

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.nn.parallel import DistributedDataParallel

from moekit.nn.sparse import SparseMoE
from moekit.parallel.expert_parallel import ExpertParallelMoE, shard_experts
from moekit.parallel.mesh import EP_DIM, check_divisible, check_initialized

DP_DIM = "dp"
OWNER = "parallelize_moe"


def parallelize_moe(model: nn.Module, mesh: DeviceMesh, *, find_unused_parameters: bool = False,
                    bucket_cap_mb: float | None = None) -> DistributedDataParallel:
    """Shard ``model``'s experts over ``mesh``'s "ep" dimension and wrap it in DDP over the whole
    mesh for everything else (module docstring: placement, loss scaling).

    Args:
        model: the same model (config and weights) on every rank, holding SparseMoE layers
            (or being one); they are replaced in place by their ExpertParallelMoE.
        mesh: a 2-D DeviceMesh named ("dp", "ep") over every process of the default group.
        find_unused_parameters, bucket_cap_mb: passed to DDP.

    Returns:
        The DDP-wrapped model (``.module`` is the sharded model). Its buffers are copied from
        rank 0 once, then never broadcast in forward: each rank's sigmoid-router load counts are
        its own until ``step_load_biases`` sums them.

    Raises, on every rank alike and before any collective of its own: RuntimeError when
    torch.distributed is not initialised; TypeError for a model already wrapped or a mesh that
    is not a DeviceMesh; ValueError when the mesh lacks a "dp" or "ep" dimension, does not span
    every process, or the ep size does not divide a layer's n_experts (naming the layer).
    """
    check_initialized(OWNER)
    if isinstance(model, DistributedDataParallel):
        raise TypeError(f"{OWNER}: model is already wrapped in DistributedDataParallel; pass the "
                        "bare model (model.module).")
    _check_mesh(mesh)
    ep_size = mesh[EP_DIM].size()
    for name, layer in model.named_modules():
        if isinstance(layer, ExpertParallelMoE):
            raise TypeError(f"{OWNER}: layer {name or '(the model)'!r} is already an "
                            "ExpertParallelMoE; pass the unsharded model, parallelize_moe shards "
                            "it over the mesh's 'ep' dimension itself.")
        if isinstance(layer, SparseMoE):
            check_divisible(f"{OWNER}: layer {name or '(the model)'!r}",
                            layer.config.n_experts, ep_size)
    model = shard_experts(model, mesh, dim=EP_DIM)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, expert_parameter_names(model))
    kwargs: dict[str, object] = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
    # No buffer broadcast in forward: the load counts are per rank. torch >= 2.13 renamed it.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    ddp = DistributedDataParallel(model, process_group=dist.group.WORLD,
                                  find_unused_parameters=find_unused_parameters, **kwargs)
    ddp.register_comm_hook(dist.group.WORLD, _sum_hook)
    return ddp


def _check_mesh(mesh: DeviceMesh) -> None:
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"{OWNER}: mesh must be a DeviceMesh with dimensions ('dp', 'ep'); got "
                        f"{type(mesh).__name__}. Build it with init_device_mesh('cpu', (dp, ep), "
                        "mesh_dim_names=('dp', 'ep')).")
    names = mesh.mesh_dim_names or ()
    if mesh.ndim != 2 or set(names) != {DP_DIM, EP_DIM}:
        raise ValueError(
            f"{OWNER}: mesh must have exactly the dimensions ('dp', 'ep'); got mesh_dim_names="
            f"{tuple(names) or None} (ndim={mesh.ndim}). Build it with init_device_mesh('cpu', "
            "(dp, ep), mesh_dim_names=('dp', 'ep')); for expert parallelism alone use "
            "ExpertParallelMoE or shard_experts.")
    if mesh.size() != dist.get_world_size():
        raise ValueError(
            f"{OWNER}: the mesh spans {mesh.size()} processes but the default group has "
            f"{dist.get_world_size()}; the replicated parameters are reduced over the default "
            "group, so build the (dp, ep) mesh over every process (dp * ep = world size).")


def expert_parameter_names(model: nn.Module) -> list[str]:
    """The qualified names, in ``model``, of the sharded experts' parameters: what DDP must leave
    to :func:`reduce_expert_grads`."""
    return [f"{name}.experts.{p}" if name else f"experts.{p}"
            for name, layer in model.named_modules() if isinstance(layer, ExpertParallelMoE)
            for p, _ in layer.experts.named_parameters()]


def _sum_hook(group: dist.ProcessGroup, bucket: dist.GradBucket
              ) -> torch.futures.Future[torch.Tensor]:
    """DDP's comm hook, summing (its default, ``allreduce_hook``, divides by the group size):
    each rank's loss is already its share of one process's loss."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, mesh: DeviceMesh) -> int:
    """Sum the sharded experts' gradients over the dp replicas (``Partial()`` -> ``Replicate()``
    over ``mesh["dp"]``); call after the step's last backward, before the optimizer. Every rank
    must call it. A missing gradient counts as zeros. Returns the number of tensors reduced.
    """
    _check_mesh(mesh)
    dp_mesh = mesh[DP_DIM]
    reduced = 0
    for layer in model.modules():
        if not isinstance(layer, ExpertParallelMoE):
            continue
        for p in layer.experts.parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            partial = DTensor.from_local(grad, dp_mesh, [Partial()], run_check=False)
            p.grad = partial.redistribute(dp_mesh, [Replicate()]).to_local()
            reduced += 1
    return reduced
