"""Which processes share the experts: the expert-parallel ("ep") group of a DeviceMesh or process
group, checked before any work.

Shape legend: E experts (global), L experts per rank (E / W), W ranks in the ep group.

Rank r of the ep group owns the contiguous block of experts [r * L, (r + 1) * L): local expert j on
rank r is global expert r * L + j. Every check here raises on every rank alike (they read only what
every rank knows, or compare what all ranks sent), so no rank is left waiting in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

EP_DIM = "ep"


@dataclass(frozen=True)
class ExpertGroup:
    """The ep group as one rank sees it.

    Attributes:
        group: the process group the rows are exchanged over.
        rank: this process's rank in it. size: W, its number of ranks.
        device_mesh: the 1-D DeviceMesh of the ep dimension (for DTensor views), or None when a
            bare process group was given.
    """

    group: dist.ProcessGroup
    rank: int
    size: int
    device_mesh: DeviceMesh | None = None

    def experts_per_rank(self, n_experts: int) -> int:
        return n_experts // self.size

    def local_experts(self, n_experts: int) -> range:
        """The global indices of the experts this rank owns."""
        per_rank = self.experts_per_rank(n_experts)
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)


def check_initialized(owner: str) -> None:
    """Refuse to start before torch.distributed has a default process group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{owner}: torch.distributed is not initialised, so there are no ranks to share the "
            "experts with. Call torch.distributed.init_process_group(backend='gloo') (CPU; "
            "'nccl' on GPUs) in every process first, or start the script with torchrun.")


def resolve_group(owner: str, mesh: DeviceMesh | dist.ProcessGroup | None, dim: str = EP_DIM
                  ) -> ExpertGroup:
    """The ep group of ``mesh``: a DeviceMesh (1-D, or with a dimension named ``dim``), a process
    group, or None for the default (world) group."""
    check_initialized(owner)
    device_mesh = None
    if mesh is None:
        group = dist.group.WORLD
    elif isinstance(mesh, DeviceMesh):
        names = mesh.mesh_dim_names
        if (dim not in names) if names is not None else mesh.ndim != 1:
            raise ValueError(
                f"{owner}: the mesh has dimensions {names or mesh.ndim} and none is named {dim!r}; "
                f"experts are sharded over that dimension. Build the mesh with it, e.g. "
                f"init_device_mesh('cpu', (dp, ep), mesh_dim_names=('dp', {dim!r})).")
        device_mesh = mesh if mesh.ndim == 1 else mesh[dim]
        group = device_mesh.get_group()
    elif isinstance(mesh, dist.ProcessGroup):
        group = mesh
    else:
        raise TypeError(f"{owner}: mesh must be a DeviceMesh, a ProcessGroup or None (the default "
                        f"group); got {type(mesh).__name__}.")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{owner}: this process (global rank {dist.get_rank()}) is not in the "
                         "process group given; pass a group every calling process belongs to.")
    return ExpertGroup(group, rank, dist.get_world_size(group), device_mesh)


def check_divisible(owner: str, n_experts: int, ep_size: int) -> int:
    """L = E / W, the experts each rank owns; an error naming the numbers and the fix if W does not
    divide E.

    Example:
        >>> check_divisible("ExpertParallelMoE", 8, 4)
        2
    """
    if n_experts % ep_size:
        sizes = [w for w in range(1, n_experts + 1) if n_experts % w == 0]
        raise ValueError(
            f"{owner}: n_experts={n_experts} cannot be split evenly over an expert-parallel group "
            f"of {ep_size} ranks ({n_experts} % {ep_size} = {n_experts % ep_size}). Use an ep size "
            f"that divides n_experts ({', '.join(map(str, sizes))}), or n_experts a multiple of "
            f"{ep_size}.")
    return n_experts // ep_size


def check_same_everywhere(owner: str, fields: dict[str, int], ep: ExpertGroup) -> None:
    """Refuse ranks that disagree on ``fields`` (the layer's sizes, the ep group's size and first
    rank): one all_gather; every rank raises the same error, naming the field and the ranks."""
    mine_F = torch.tensor(list(fields.values()), dtype=torch.long)
    gathered = [torch.empty_like(mine_F) for _ in range(ep.size)]
    dist.all_gather(gathered, mine_F, group=ep.group)
    all_WF = torch.stack(gathered)
    for f, name in enumerate(fields):
        values = all_WF[:, f].tolist()
        if len(set(values)) > 1:
            listed = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(
                f"{owner}: the ranks of the expert-parallel group disagree on {name} ({listed}). "
                "Build the same layer, with the same mesh, on every rank (same config and seed, "
                "or load the same weights).")
