"""Expert parallelism with data parallelism on a 2 x 2 (dp, ep) mesh, 4 spawned processes (gloo,
127.0.0.1): after one backward and the reductions every gradient (the experts gathered over ep)
equals one process's on the global batch in float64 to 1e-10, and the weights after one optimizer
step agree; misbuilt meshes and models fail on every rank with messages naming the fix.

One spawned group runs every job (``worker``) and sends back numpy results; the comparisons run
here. The spawned processes import this module by its plain name (``import test_data_parallel``),
which pytest's importlib mode does not register, hence the sys.path line.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from moekit.nn.routers import RouterConfig
from moekit.nn.sparse import SparseMoE

sys.path.insert(0, str(Path(__file__).parent))
from spawned import result, spawn_and_collect

D, E, HIDDEN = 6, 4, 8
DP, EP = 2, 2
WORLD = DP * EP
LR = 0.5
GROUP_TIMEOUT_S = 20
DEADLINE_S = 120  # the whole spawned run; a hang fails here instead of blocking


class Stack(nn.Module):
    """Two routed layers with a linear map between: token choice with a shared expert, then MLP
    experts under a capacity factor (drops decided per dp micro-batch), auxiliary losses on."""

    def __init__(self, n_experts: int = E) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.moe1 = SparseMoE(D, n_experts, hidden=HIDDEN, router=RouterConfig("topk", top_k=2),
                              n_shared=1, load_balance_weight=0.1, z_loss_weight=0.01,
                              generator=gen)
        self.mix = nn.Linear(D, D)
        with torch.no_grad():
            self.mix.weight.copy_(torch.randn(D, D, generator=gen) / D**0.5)
            self.mix.bias.copy_(torch.randn(D, generator=gen) * 0.1)
        self.moe2 = SparseMoE(D, n_experts, hidden=HIDDEN, router=RouterConfig("topk", top_k=2),
                              experts="mlp", capacity_factor=1.0, importance_weight=0.1,
                              generator=gen)
        self.double()

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.moe1(x_ND)
        second = self.moe2(torch.tanh(self.mix(first.output)))
        return second.output, first.aux_loss + second.aux_loss


def rows(rank: int) -> int:
    return 3 + 2 * rank  # uneven on purpose: the SUM convention needs no equal blocks


def global_batch() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every rank's rows and probe (its task loss is sum(y * probe)), in global rank order."""
    gen = torch.Generator().manual_seed(11)
    xs = [torch.randn(rows(r), D, generator=gen, dtype=torch.float64) for r in range(WORLD)]
    probes = [torch.randn(rows(r), D, generator=gen, dtype=torch.float64) for r in range(WORLD)]
    return xs, probes


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy().copy()


# --- in the workers -----------------------------------------------------------------------------

def run_step(rank: int) -> dict[str, Any]:
    """One forward, backward, reduction and SGD step; the gradients and weights after it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from moekit.parallel.data_parallel import parallelize_moe, reduce_expert_grads

    mesh = init_device_mesh("cpu", (DP, EP), mesh_dim_names=("dp", "ep"))
    model = parallelize_moe(Stack(), mesh)
    xs, probes = global_batch()
    n_global = sum(len(x) for x in xs)
    y_ND, aux = model(xs[rank])
    ((y_ND * probes[rank]).sum() / n_global + aux / DP).backward()
    n_reduced = reduce_expert_grads(model, mesh)
    grads = {name: _np(p.grad) for name, p in model.module.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    optimizer.step()
    weights = {name: _np(p) for name, p in model.module.named_parameters()}
    dist.barrier()
    return {"coordinate": tuple(mesh.get_coordinate()), "grads": grads, "weights": weights,
            "output": _np(y_ND), "n_reduced": n_reduced}


def run_error(name: str) -> str:
    """The message of the error a misbuilt mesh or model raises on this rank ('' if none)."""
    from torch.distributed.device_mesh import init_device_mesh

    from moekit.parallel.data_parallel import parallelize_moe

    try:
        if name == "mesh_without_dp":
            parallelize_moe(Stack(), init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",)))
        elif name == "not_divisible":
            parallelize_moe(Stack(n_experts=3), init_device_mesh(
                "cpu", (DP, EP), mesh_dim_names=("dp", "ep")))
        elif name == "not_a_mesh":
            parallelize_moe(Stack(), None)  # type: ignore[arg-type]
    except (ValueError, TypeError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    return ""


ERRORS = ["mesh_without_dp", "not_divisible", "not_a_mesh"]


def worker(rank: int, store_path: str, results: Any) -> None:
    """Join the group (a FileStore, gloo on the loopback interface), run every job, send each
    result as (rank, job, result or None, traceback or None), then 'done'."""
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    jobs = [("step", lambda: run_step(rank))]
    jobs += [(f"error:{name}", lambda name=name: run_error(name)) for name in ERRORS]
    for name, job in jobs:
        try:
            results.put((rank, name, job(), None))
        except Exception:  # sent to the parent, which fails the test with it
            results.put((rank, name, None, traceback.format_exc()))
    results.put((rank, "done", None, None))
    dist.destroy_process_group()


# --- in the parent ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> dict[tuple[int, str], tuple[Any, str | None]]:
    import test_data_parallel as by_plain_name  # what the spawned processes can import

    store = tmp_path_factory.mktemp("dp_ep") / "store"
    return spawn_and_collect(by_plain_name.worker, WORLD, (str(store),),
                             {(r, "done") for r in range(WORLD)}, DEADLINE_S)


def _ranks(spawned: dict, name: str) -> list[Any]:
    return [result(spawned, rank, name) for rank in range(WORLD)]


def reference() -> tuple[Stack, list[torch.Tensor]]:
    """One process, the same weights: the global batch as DP micro-batches (micro-batch d = the
    rows of ranks d * EP .. d * EP + EP - 1), loss = sum(y * probe) / G + mean of the micro-batches'
    aux losses, gradients accumulated; then one SGD step. Returns the model (its gradients and
    stepped weights) and the outputs per micro-batch."""
    model = Stack()
    xs, probes = global_batch()
    n_global = sum(len(x) for x in xs)
    loss, outputs = torch.zeros((), dtype=torch.float64), []
    for d in range(DP):
        block = slice(d * EP, (d + 1) * EP)
        y_ND, aux = model(torch.cat(xs[block]))
        loss = loss + (y_ND * torch.cat(probes[block])).sum() / n_global + aux / DP
        outputs.append(y_ND.detach())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=LR).step()
    model.grads = grads  # type: ignore[attr-defined]
    return model, outputs


def _gathered(ranks: list[dict], key: str, name: str, d: int) -> np.ndarray:
    """Dp replica d's expert tensor: its ep ranks' blocks concatenated (ranks in mesh order)."""
    return np.concatenate([ranks[d * EP + q][key][name] for q in range(EP)])


@pytest.mark.parametrize("key", ["grads", "weights"])
def test_every_parameter_equals_one_process_on_the_global_batch(spawned, key):
    ranks = _ranks(spawned, "step")
    model, outputs = reference()
    want = {name: _np(t) for name, t in (model.grads.items() if key == "grads"  # type: ignore
                                         else model.named_parameters())}
    assert [r["coordinate"] for r in ranks] == [(d, q) for d in range(DP) for q in range(EP)]
    assert ranks[0][key].keys() == want.keys()
    experts = [name for name in want if ".experts." in name]
    assert len(experts) == 6 and all(r["n_reduced"] == len(experts) for r in ranks)
    for name, value in want.items():
        for d in range(DP):
            if name in experts:  # sharded over ep: rank (d, q) holds experts [q L, (q + 1) L)
                got = _gathered(ranks, key, name, d)
                np.testing.assert_allclose(got, value, rtol=0, atol=1e-10, err_msg=name)
            else:  # replicated on every rank
                for q in range(EP):
                    np.testing.assert_allclose(ranks[d * EP + q][key][name], value, rtol=0,
                                               atol=1e-10, err_msg=f"rank ({d}, {q}): {name}")
    for d in range(DP):
        got = np.concatenate([ranks[d * EP + q]["output"] for q in range(EP)])
        np.testing.assert_allclose(got, _np(outputs[d]), rtol=0, atol=1e-10)


def test_the_gradients_are_not_trivially_equal():
    """What the equality test would miss if the reductions were skipped: one replica's experts
    see only half the batch, so their gradient differs from the global one."""
    model, _ = reference()
    half = Stack()
    xs, probes = global_batch()
    y_ND, aux = half(torch.cat(xs[:EP]))
    ((y_ND * torch.cat(probes[:EP])).sum() / sum(map(len, xs)) + aux / DP).backward()
    differs = {name: not torch.allclose(p.grad, model.grads[name], atol=1e-6)  # type: ignore
               for name, p in half.named_parameters()}
    assert differs["moe1.experts.w2_EOH"] and differs["moe2.experts.w2_EHO"]
    assert differs["moe1.router.w_DE"] and differs["mix.weight"]


@pytest.mark.parametrize("name, message", [
    ("mesh_without_dp", ("ValueError: parallelize_moe: mesh must have exactly the dimensions "
                         "('dp', 'ep'); got mesh_dim_names=('ep',) (ndim=1).")),
    ("not_divisible", ("ValueError: parallelize_moe: layer 'moe1': n_experts=3 cannot be split "
                       "evenly over an expert-parallel group of 2 ranks")),
    ("not_a_mesh", ("TypeError: parallelize_moe: mesh must be a DeviceMesh with dimensions "
                    "('dp', 'ep'); got NoneType."))])
def test_misbuilt_meshes_and_models_fail_on_every_rank(spawned, name, message):
    for rank, got in enumerate(_ranks(spawned, f"error:{name}")):
        assert got.startswith(message), (rank, got)


def test_refuses_without_a_process_group():
    from moekit.parallel.data_parallel import parallelize_moe

    with pytest.raises(RuntimeError, match=r"parallelize_moe: torch.distributed is not "
                                           r"initialised.*init_process_group"):
        parallelize_moe(Stack(), None)  # type: ignore[arg-type]
