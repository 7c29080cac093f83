"""The runs of ``moekit.parallel.train`` the multi-process test makes, and its worker: tiny float64
models on a slice of the standard library, so that the losses can be compared to 1e-10."""

from __future__ import annotations

import dataclasses
import os
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from moekit.parallel.train import EPTrainConfig

GROUP_TIMEOUT_S = 30
ROUTERS = ("topk", "switch", "sigmoid", "expert_choice")
STEPS, RESUMED_AT = 4, 2


def config(out: Path, router: str = "topk", **changes: Any) -> EPTrainConfig:
    return dataclasses.replace(
        EPTrainConfig(out=str(out), steps=STEPS, batch_size=4, seq_len=16, d_model=16,
                      n_layers=2, n_heads=2, n_experts=4, expert_hidden=16, lr=1e-2,
                      max_bytes=60_000, dtype="float64", router=router), **changes)


def worker(rank: int, world: int, store_path: str, folder: str, queue: Any) -> None:
    """Join the group (FileStore; gloo on the loopback interface); train every router from
    scratch, then resume the single-process run the parent saved at step RESUMED_AT; send (rank,
    name, history or None, traceback or None)."""
    import torch.distributed as dist

    from moekit.parallel.train import expert_parallel_mesh, train

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                            world_size=world, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    base = Path(folder)
    mesh = expert_parallel_mesh()
    runs = {router: config(base / f"ep_{router}", router) for router in ROUTERS}
    runs["resumed"] = config(base / "ep_resumed",
                             resume=str(base / "single_half" / "checkpoint"))
    for name, run in runs.items():
        try:
            queue.put((rank, name, train(run, mesh), None))
        except Exception:  # sent to the parent, which fails the test with it
            queue.put((rank, name, None, traceback.format_exc()))
    dist.destroy_process_group()
