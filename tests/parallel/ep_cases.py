"""The expert-parallel cases the multi-process tests run, and the workers that run them.

One spawned group per world size runs every case (spawning costs 10-25 s on this machine); each
rank sends back plain numpy results, and the test module compares them in the parent with one
process's SparseMoE holding the same weights on the concatenated global batch.

Shape legend: N rows, D features, E experts, W ranks.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from moekit.nn.outputs import Routing
from moekit.nn.routers import RouterConfig, step_load_biases
from moekit.nn.sparse import SparseMoE

D, E, HIDDEN = 8, 8, 12
GROUP_TIMEOUT_S = 20
BIAS_STEPS, BIAS_ROWS = 2, 24


@dataclass(frozen=True)
class Case:
    """One layer and its batch: ``layer`` are SparseMoE's keyword arguments, ``rows`` the rows of
    rank r (a function of r and W), ``noise`` whether training mode draws router noise."""

    name: str
    layer: dict[str, Any] = field(default_factory=dict)
    empty_last_rank: bool = False
    dtype: torch.dtype = torch.float64
    mesh: str = "mesh"  # how the worker names the group: 'mesh' (a DeviceMesh), 'group', 'none'

    def rows(self, rank: int, world: int) -> int:
        empty = self.empty_last_rank and world > 1 and rank == world - 1
        return 0 if empty else 5 + 3 * rank

    @property
    def noisy(self) -> bool:
        return self.layer["router"].noise != "none"


def _router(kind: str, **kw: Any) -> RouterConfig:
    return RouterConfig(kind=kind, **kw)


AUX = {"load_balance_weight": 0.1, "z_loss_weight": 0.01, "importance_weight": 0.1}
CASES = [
    Case("topk", {"router": _router("topk", top_k=2), "n_shared": 1, **AUX}),
    Case("topk_capacity", {"router": _router("topk", top_k=2), "experts": "mlp",
                           "capacity_factor": 1.0, **AUX}, empty_last_rank=True, mesh="group"),
    Case("switch_capacity", {"router": _router("switch"), "n_shared": 1,
                             "capacity_factor": 1.0, **AUX}, mesh="none"),
    Case("noisy_switch", {"router": _router("switch", noise="gaussian"), **AUX}),
    Case("noisy_topk_capacity", {"router": _router("topk", top_k=2, noise="gaussian"),
                                 "capacity_factor": 1.0, "n_shared": 1, **AUX}),
    Case("expert_choice", {"router": _router("expert_choice", top_k=2), "n_shared": 1, **AUX}),
    Case("expert_choice_jitter_capacity",
         {"router": _router("expert_choice", top_k=2, noise="jitter", jitter_eps=0.3),
          "experts": "mlp", "capacity_factor": 0.5, **AUX}),
    Case("sigmoid", {"router": _router("sigmoid", top_k=2), "n_shared": 1, **AUX}),
    Case("sigmoid_capacity", {"router": _router("sigmoid", top_k=1), "experts": "mlp",
                              "capacity_factor": 1.0, **AUX}),
    Case("topk_float32_grouped_mm", {"router": _router("topk", top_k=2), "n_shared": 1,
                                     "experts_implementation": "grouped_mm", **AUX},
         dtype=torch.float32),
]
CASES_BY_NAME = {c.name: c for c in CASES}


def build_layer(case: Case) -> SparseMoE:
    """The case's layer, the same weights in every process; the sigmoid router gets a bias that
    steers its choice."""
    layer = SparseMoE(D, E, hidden=HIDDEN, generator=torch.Generator().manual_seed(7),
                      **case.layer).to(case.dtype).train()
    if hasattr(layer.router, "bias_E"):
        layer.router.bias_E.copy_(torch.linspace(-0.2, 0.2, E, dtype=case.dtype))
    return layer


def batch(case: Case, world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every rank's rows and the probe its loss is taken against: loss_r = sum(y_r * probe_r)."""
    gen = torch.Generator().manual_seed(11)
    xs, probes = [], []
    for r in range(world):
        n = case.rows(r, world)
        xs.append(torch.randn(n, D, generator=gen, dtype=case.dtype))
        probes.append(torch.randn(n, D, generator=gen, dtype=case.dtype))
    return xs, probes


def noise_generator(rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(100 + rank)


def global_routing(layer: SparseMoE, xs: list[torch.Tensor]) -> Routing:
    """One process's routing of the global batch when rank r drew its rows' noise from
    ``noise_generator(r)``: the ranks' routings concatenated (expert choice: its rule applied to
    the concatenated logits)."""
    parts = [layer.route(x, generator=noise_generator(r)) for r, x in enumerate(xs)]
    logits_NE = torch.cat([p.logits_NE for p in parts])
    if layer.config.router.kind == "expert_choice":
        return layer.router.choose(logits_NE)
    loads = [p.load_E for p in parts]
    return Routing(torch.cat([p.weights_NK for p in parts]),
                   torch.cat([p.experts_NK for p in parts]),
                   torch.cat([p.probs_NE for p in parts]), logits_NE,
                   load_E=None if loads[0] is None else torch.stack(loads).sum(0))


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float64 if t.is_floating_point()
                                                else torch.long).numpy().copy()


# --- in the workers -----------------------------------------------------------------------------

def _mesh(case: Case, world: int) -> Any:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if case.mesh == "mesh":
        return init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    return dist.group.WORLD if case.mesh == "group" else None


def run_case(case: Case, rank: int, world: int) -> dict[str, Any]:
    from moekit.parallel import ExpertParallelMoE

    layer = ExpertParallelMoE(build_layer(case), _mesh(case, world))
    xs, probes = batch(case, world)
    x = xs[rank].clone().requires_grad_(True)
    out = layer(x, generator=noise_generator(rank))
    ((out.output * probes[rank]).sum() + out.aux_loss).backward()
    layer.sum_replicated_grads()
    grads = {name: _np(p.grad) for name, p in layer.named_parameters()}
    return {"output": _np(out.output), "aux_loss": float(out.aux_loss.detach()),
            "aux_parts": {k: float(v.detach()) for k, v in out.aux_parts.items()},
            "dropped": sorted(zip(out.dropped_global_rows.tolist(),
                                  out.dispatch.dropped_experts.tolist(), strict=True)),
            "grads": grads, "x_grad": _np(x.grad), "local_experts": list(layer.local_experts),
            "row_offset": out.row_offset, "n_global_rows": out.n_global_rows}


def bias_rows(world: int) -> list[torch.Tensor]:
    """The global batch of each bias step, split evenly over the ranks."""
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(BIAS_ROWS, D, generator=gen, dtype=torch.float64).chunk(world)
            for _ in range(BIAS_STEPS)]


def bias_layer() -> SparseMoE:
    return SparseMoE(D, E, hidden=HIDDEN, router=_router("sigmoid", top_k=2,
                                                         bias_update_rate=0.05),
                     generator=torch.Generator().manual_seed(3)).double().train()


def run_bias(rank: int, world: int) -> dict[str, Any]:
    """Two optimizer steps, each over two micro-batches of this rank's rows; the bias after each."""
    from moekit.parallel import ExpertParallelMoE

    layer = ExpertParallelMoE(bias_layer())
    biases = []
    for rows in bias_rows(world):
        for half in rows[rank].chunk(2):
            layer(half).output.sum().backward()
        step_load_biases(layer, layer.process_group)
        biases.append(_np(layer.router.bias_E))
    return {"biases": biases}


def run_extras(rank: int, world: int) -> dict[str, Any]:
    """The global views (DTensor, the gathered layer) and shard_experts on a stack of layers."""
    from torch import nn

    from moekit.parallel import ExpertParallelMoE, shard_experts

    case = CASES_BY_NAME["topk"]
    layer = ExpertParallelMoE(build_layer(case), _mesh(case, world))
    full = {name: _np(t.full_tensor()) for name, t in layer.expert_dtensors().items()}
    gathered = {k: _np(v) for k, v in layer.full_layer().state_dict().items()}
    stack = shard_experts(nn.ModuleList([build_layer(case), build_layer(case)]))
    return {"dtensor_full": full, "full_layer": gathered,
            "stack": [type(m).__name__ for m in stack]}


def run_error(name: str, rank: int, world: int) -> str:
    """The message of the error a misbuilt layer raises on this rank ('' if none)."""
    from torch.distributed.device_mesh import init_device_mesh

    from moekit.parallel import ExpertParallelMoE

    try:
        if name == "not_divisible":
            ExpertParallelMoE(SparseMoE(D, world + 1, hidden=HIDDEN))
        elif name == "mismatched_layers":
            ExpertParallelMoE(SparseMoE(D, 2 * world if rank == 0 else world, hidden=HIDDEN))
        elif name == "mesh_without_ep":
            ExpertParallelMoE(SparseMoE(D, E, hidden=HIDDEN),
                              init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)))
    except (ValueError, TypeError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    return ""


ERRORS = ["not_divisible", "mismatched_layers", "mesh_without_ep"]


def run_dying_peer(rank: int, world: int, flush: Any) -> dict[str, Any]:
    """The last rank exits (after sending its results: ``flush``) once the layer is built; the
    others must fail inside a collective within the group's timeout."""
    from moekit.parallel import ExpertParallelMoE

    layer = ExpertParallelMoE(build_layer(CASES_BY_NAME["topk"]))
    if rank == world - 1:
        flush()
        os._exit(3)
    start = time.monotonic()
    try:
        for _ in range(50):  # the first exchange may start before the peer is gone
            layer(torch.randn(4, D, dtype=torch.float64))
    except Exception as err:  # any error is the point; its type is reported
        return {"error": f"{type(err).__name__}: {err}"[:300],
                "seconds": time.monotonic() - start}
    return {"error": "", "seconds": time.monotonic() - start}


def worker(rank: int, world: int, store_path: str, queue: Any) -> None:
    """Join the group (a FileStore: no store port is opened; gloo on the loopback interface), run
    every case, send each result as (rank, case, result or None, traceback or None), then 'done',
    then the dying-peer case, which ends the group."""
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    torch.set_num_threads(1)

    def flush() -> None:  # os._exit skips the queue's feeder thread: send everything first
        queue.close()
        queue.join_thread()

    def send(name: str, job: Any) -> None:
        try:
            queue.put((rank, name, job(), None))
        except Exception:  # sent to the parent, which fails the test with it
            queue.put((rank, name, None, traceback.format_exc()))

    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    for case in CASES:
        send(case.name, lambda case=case: run_case(case, rank, world))
    send("bias", lambda: run_bias(rank, world))
    send("extras", lambda: run_extras(rank, world))
    for name in ERRORS:
        send(f"error:{name}", lambda name=name: run_error(name, rank, world))
    queue.put((rank, "done", None, None))
    send("dying_peer", lambda: run_dying_peer(rank, world, flush))
    flush()
    os._exit(0)  # the dying peer broke the group: skip its teardown


# --- in the parent: one process's answers, and the comparison -----------------------------------

def reference(case: Case, world: int) -> dict[str, Any]:
    """One process's SparseMoE, the same weights, on the ranks' rows concatenated; the loss is
    the sum of the ranks' losses with the auxiliary loss once."""
    layer = build_layer(case)
    xs, probes = batch(case, world)
    x = torch.cat(xs).requires_grad_(True)
    if case.noisy:
        out = layer.forward_routed(x, global_routing(layer, list(x.split([len(t) for t in xs]))))
    else:
        out = layer(x)
    ((out.output * torch.cat(probes)).sum() + out.aux_loss).backward()
    return {"output": _np(out.output), "aux_loss": float(out.aux_loss.detach()),
            "aux_parts": {k: float(v.detach()) for k, v in out.aux_parts.items()},
            "dropped": sorted(zip(out.dispatch.dropped_rows.tolist(),
                                  out.dispatch.dropped_experts.tolist(), strict=True)),
            "grads": {name: _np(p.grad) for name, p in layer.named_parameters()},
            "x_grad": _np(x.grad), "rows": [len(t) for t in xs]}


def check_against_one_process(case: Case, world: int, ranks: list[dict[str, Any]]) -> None:
    """Every rank's results (``run_case``) against one process's (``reference``)."""
    want = reference(case, world)
    tol = {"rtol": 0, "atol": 1e-10} if case.dtype == torch.float64 else {"rtol": 1e-5,
                                                                            "atol": 1e-5}
    close = np.testing.assert_allclose
    close(np.concatenate([r["output"] for r in ranks]), want["output"], **tol)
    close(np.concatenate([r["x_grad"] for r in ranks]), want["x_grad"], **tol)
    per_rank = len(range(E)) // world
    for rank, got in enumerate(ranks):
        assert got["local_experts"] == list(range(rank * per_rank, (rank + 1) * per_rank))
        assert got["row_offset"] == sum(want["rows"][:rank])
        assert got["n_global_rows"] == sum(want["rows"])
        close(got["aux_loss"], want["aux_loss"], **tol)
        assert got["aux_parts"].keys() == want["aux_parts"].keys()
        for name, value in want["aux_parts"].items():
            close(got["aux_parts"][name], value, **tol, err_msg=name)
        for name, grad in want["grads"].items():
            if not name.startswith("experts."):  # replicated, summed over the ranks
                close(got["grads"][name], grad, **tol, err_msg=f"rank {rank}: {name}")
    for name, grad in want["grads"].items():
        if name.startswith("experts."):  # sharded: rank r holds experts [r L, (r + 1) L)
            close(np.concatenate([r["grads"][name] for r in ranks]), grad, **tol, err_msg=name)
    assert sorted(d for r in ranks for d in r["dropped"]) == want["dropped"]
    assert bool(want["dropped"]) == (case.layer.get("capacity_factor") is not None)
