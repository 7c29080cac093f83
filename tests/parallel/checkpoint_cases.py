"""The checkpoint resharding round trip the multi-process test runs, and its worker.

One spawned group of 4 (spawning costs seconds): world-size-2 work runs on ranks 0-1 in a
sub-group while ranks 2-3 wait at a barrier. The chain, each load into a model built from another
seed with an optimizer of another learning rate (so only the checkpoint can make them agree):

    parent: reference LM -> model folder -> checkpoint C1 (world 1, weights only)
    phase A, ranks 0-1: load C1 (1 -> 2), 2 optimizer steps, save C2 (weights and optimizer)
    phase B, ranks 0-3: load C2 (2 -> 4), 1 step, save C4
    phase C, ranks 0-1: load C4 (4 -> 2), 1 step, save C2b
    parent: C2, C4 in one process (2 -> 1, 4 -> 1), C2b -> model folder -> load_model

A step's gradients are an elementwise function of the weights (:func:`synthetic_step`), and AdamW
is elementwise, so every topology computes the same numbers bit for bit: what differs is only how
the state travels. Each rank sends its local state right after each load, for the parent to
compare with the reference's rows.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.nn.lm import LMConfig, MoETransformerLM
from moekit.nn.routers import RouterConfig

GROUP_TIMEOUT_S = 30
CONFIG = LMConfig(d_model=8, n_layers=2, n_heads=2, max_seq_len=8, n_experts=4, expert_hidden=6,
                  router=RouterConfig(kind="sigmoid", top_k=2), n_shared=1)
LR, OTHER_LR = 0.01, 0.5
STEPS = {"C2": 2, "C4": 3, "C2b": 4}  # the reference's steps each checkpoint holds


def build_model(seed: int) -> MoETransformerLM:
    model = MoETransformerLM(CONFIG, generator=torch.Generator().manual_seed(seed)).double()
    for block in model.blocks:  # a non-zero buffer, so that buffers are seen to travel
        block.ffn.router.bias_E.copy_(torch.linspace(-0.1, 0.1 + seed, CONFIG.n_experts))
    return model


def build_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def synthetic_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Gradients cos(7 w + 1), elementwise in the weights, then the optimizer's step."""
    for p in model.parameters():
        p.grad = torch.cos(7 * p.detach() + 1)
    optimizer.step()


def local_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
                ) -> dict[str, Any]:
    """This rank's tensors by one process's names: ``model.NAME`` and the optimizer's flattened
    ``state.NAME.exp_avg``, ``param_groups.NAME.lr`` (experts: this rank's rows only). Only an
    optimizer that has stepped: torch's get_state_dict steps a fresh one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    assert optimizer is None or optimizer.state, "a fresh optimizer would be stepped"
    model_sd, optim_sd = get_state_dict(
        model, [] if optimizer is None else optimizer,
        options=StateDictOptions(flatten_optimizer_state_dict=True))
    out: dict[str, Any] = {f"model.{k}": v.detach().numpy().copy() for k, v in model_sd.items()}
    for key, value in optim_sd.items():
        out[key] = value.numpy().copy() if isinstance(value, torch.Tensor) else value
    return out


def reference_states() -> dict[str, dict[str, Any]]:
    """One process's state after each checkpoint's steps (``STEPS``), and at the start."""
    model = build_model(0)
    optimizer = build_optimizer(model, LR)
    states, done = {}, 0
    for name, steps in [("C1", 0), *STEPS.items()]:
        for _ in range(steps - done):
            synthetic_step(model, optimizer)
        done = steps
        states[name] = local_state(model, optimizer if steps else None)
        states[name]["model"] = {k: v.clone() for k, v in model.state_dict().items()}
    return states


def check_rows(got: dict[str, Any], want: dict[str, Any], rank: int, world: int) -> None:
    """``got`` (one rank's local state) equals ``want`` (one process's), the experts' rows
    [rank L, (rank + 1) L) for the expert tensors; bit for bit."""
    per_rank = CONFIG.n_experts // world
    for key in sorted(want):
        if key == "model":
            continue
        value = want[key]
        if ".experts." in key and isinstance(value, np.ndarray) and value.ndim:
            value = value[rank * per_rank:(rank + 1) * per_rank]
        np.testing.assert_array_equal(got[key], value, err_msg=f"world {world} rank {rank} {key}")


# --- in the workers -----------------------------------------------------------------------------

def _phase(name: str, rank: int, group: Any, folder: Path, load_from: str, save_to: str,
           with_optimizer: bool, steps: int) -> dict[str, Any]:
    from moekit.parallel import shard_experts
    from moekit.parallel.checkpoint import load_checkpoint, save_checkpoint

    model = shard_experts(build_model(seed=10 + rank), group)
    optimizer = build_optimizer(model, OTHER_LR)
    info = load_checkpoint(folder / load_from, model, optimizer if with_optimizer else None,
                           process_group=group)
    if not with_optimizer:  # a checkpoint of weights only: the run's own optimizer from here
        optimizer = build_optimizer(model, LR)
    loaded = local_state(model, optimizer if with_optimizer else None)
    for _ in range(steps):
        synthetic_step(model, optimizer)
    save_checkpoint(folder / save_to, model, optimizer, metadata={"phase": name},
                    process_group=group)
    result = {"loaded": loaded, "info_world": info.world_size, "info_metadata": info.metadata}
    if name == "B":
        try:
            save_checkpoint(folder / "never", model, local=True)
        except ValueError as err:
            result["local_error"] = str(err)
    return result


def worker(rank: int, world: int, store_path: str, folder: str, queue: Any) -> None:
    """Join the group (FileStore; gloo on the loopback interface) and run phases A, B, C; send
    (rank, phase, result or None, traceback or None) for each phase this rank is in."""
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                            world_size=world, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    pair = dist.new_group([0, 1])  # every rank creates it; ranks 0-1 use it
    base = Path(folder)

    def run(name: str, group: Any, *args: Any) -> None:
        try:
            queue.put((rank, name, _phase(name, rank, group, base, *args), None))
        except Exception:  # sent to the parent, which fails the test with it
            queue.put((rank, name, None, traceback.format_exc()))

    if rank < 2:
        run("A", pair, "C1", "C2", False, STEPS["C2"])
    dist.barrier()
    run("B", dist.group.WORLD, "C2", "C4", True, STEPS["C4"] - STEPS["C2"])
    dist.barrier()
    if rank < 2:
        run("C", pair, "C4", "C2b", True, STEPS["C2b"] - STEPS["C4"])
    dist.barrier()
    dist.destroy_process_group()
