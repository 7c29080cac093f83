"""Expert parallelism on CPU over gloo: bytes exchanged per step, and time per phase (count
exchange, dispatch, experts, combine; forward and backward) at EP sizes 1, 2, 4
(../shared/BENCHMARKS.md).

    .venv/bin/python benchmarks/expert_parallel.py [--ep 1,2,4] [--tokens 4096] [--repeats 7]
                                                   [--quick]

Shape legend: W ranks in the ep group, E experts, L = E / W per rank, N rows per rank, D features,
H expert hidden width, K experts per row.

The layer: SparseMoE, SwiGLU experts, D = 256, H = 512, E = 8, top-2, float32, dropless, no
auxiliary loss; N = 4096 rows on every rank (weak scaling: each rank's experts do the same work at
every W). Every EP size runs in its own spawned gloo group (127.0.0.1, one thread per process);
the three groups live side by side and the parent has them run one repeat each in turn
(W = 1, 2, 4, 1, 2, 4, ...), so they are interleaved; a group waiting for its turn sleeps.

Phases: one step of ExpertParallelMoE.forward_routed run stage by stage with the same functions
(moekit.parallel.exchange, moekit.nn.dispatch, the expert bank's forward_grouped), each stage's
output detached, so each stage's backward runs (and is timed) alone: router, count exchange
(all_gather of the counts + the plan), dispatch (gather rows + all-to-all out), experts (grouped
matmuls), combine (all-to-all back + weighted sum). All ranks pass a barrier before each stage; a
stage's time is the slowest rank's. The whole layer (ExpertParallelMoE itself, unstaged) is timed
beside it; the staged output and input gradient are checked equal to it first.

Bytes (payload, per rank and step; a rank's rows to itself are a local copy and not counted):
dispatch sends the kept assignments owned by other ranks, sum_{j != r} rows(r -> j) * D * itemsize,
combine sends back what it received, sum_{j != r} rows(j -> r) * D * itemsize; the backward moves
the same amounts the other way; the count exchange sends (1 + E) int64 to each of the W - 1
others. Checked, before timing, against what the exchange's calls actually carry (the split sizes
and row sizes passed to all_to_all and gather_equal, and the gradients coming back), by wrapping
those functions in the worker processes only. Not counted: the auxiliary statistics' all_reduce
(E floats; no aux loss here) and barriers.

On this machine W processes share 2 cores: at W = 4 two processes run per core, so read the ratios
(time at W / time at W = 1, the share of each phase) rather than absolute times, and the load
average printed before and after (a loaded machine voids the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

D_MODEL, HIDDEN, N_EXPERTS, TOP_K = 256, 512, 8, 2
PHASES = ("router", "counts", "dispatch", "experts", "combine")
COUNT_BYTES = 8  # the counts travel as int64
GROUP_TIMEOUT_S = 120


# --- bookkeeping (pure; tested in tests/benchmarks/test_expert_parallel_bench.py) --------------

def exchange_bytes(counts_WE: torch.Tensor, rank: int, d_model: int, itemsize: int
                   ) -> dict[str, int]:
    """The payload rank ``rank`` sends in one step, from every rank's assignment counts per expert
    (W, E) (dropless; rank j owns experts [j L, (j + 1) L)).

    Example (2 ranks, 4 experts, D = 2, float32): rank 0 sends 1 + 2 = 3 rows to rank 1 and gets
    back 3 * 2 * 4 = 24 bytes' worth; rank 1 sends it 4 + 0 = 4 rows:
        >>> exchange_bytes(torch.tensor([[5, 0, 1, 2], [4, 0, 3, 3]]), 0, 2, 4)
        {'counts': 40, 'dispatch': 24, 'combine': 32, 'forward': 96, 'backward': 56, 'step': 152}
    """
    n_ranks, n_experts = counts_WE.shape
    rows_WW = counts_WE.reshape(n_ranks, n_ranks, n_experts // n_ranks).sum(-1)  # source, owner
    off_rank_WW = rows_WW * (1 - torch.eye(n_ranks, dtype=rows_WW.dtype))
    row_bytes = d_model * itemsize
    out = {"counts": (n_ranks - 1) * (1 + n_experts) * COUNT_BYTES,
           "dispatch": int(off_rank_WW[rank].sum()) * row_bytes,
           "combine": int(off_rank_WW[:, rank].sum()) * row_bytes}
    out["forward"] = out["counts"] + out["dispatch"] + out["combine"]
    out["backward"] = out["dispatch"] + out["combine"]  # the gradients retrace both exchanges
    out["step"] = out["forward"] + out["backward"]
    return out


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median and spread (min, max) of one phase's repeats, in milliseconds."""
    return {"median_ms": 1e3 * statistics.median(seconds), "min_ms": 1e3 * min(seconds),
            "max_ms": 1e3 * max(seconds)}


def slowest_rank(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One repeat's time per phase: the slowest rank's (every stage starts at a barrier)."""
    return {key: max(r[key] for r in per_rank) for key in per_rank[0]}


def human_bytes(n: float) -> str:
    """``n`` bytes for the table: exact below 1 KiB, else KiB or MiB to two decimals.

        >>> human_bytes(72), human_bytes(4 * 2**20), human_bytes(1536)
        ('72 B', '4.00 MiB', '1.50 KiB')
    """
    if n < 1024:
        return f"{n:.0f} B"
    return f"{n / 2**10:.2f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def markdown(summary: dict[int, dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table: per EP size and phase, forward and backward medians (spread), the
    share of the staged step, the time relative to EP size 1, and bytes per rank."""
    base = min(summary)
    lines = [(f"Expert parallelism on CPU, gloo: SparseMoE D={meta['d_model']}, "
              f"H={meta['hidden']}, E={meta['n_experts']}, K={meta['top_k']}, {meta['tokens']} "
              f"tokens per rank, {meta['dtype']}, 1 thread per process, {meta['repeats']} "
              f"interleaved repeats (median, min-max); torch {meta['torch']}; load average "
              f"{meta['load_before']:.2f} before, {meta['load_after']:.2f} after (the after figure "
              "counts the benchmark's own up to 4 busy processes). The W processes share 2 "
              "cores (at W = 4, two per core): read the ratios, not the absolute times."),
             "",
             ("| EP size | phase | forward ms | backward ms | share of step | time / EP 1 "
              "| bytes sent per rank per step |"),
             "|---|---|---|---|---|---|---|"]

    def cell(s: dict[str, float] | None) -> str:
        return "-" if s is None else f"{s['median_ms']:.1f} ({s['min_ms']:.1f}-{s['max_ms']:.1f})"

    for world, s in sorted(summary.items()):
        staged = s["staged_total"]["median_ms"]
        for phase in (*PHASES, "staged_total", "layer"):
            fwd, bwd = s.get(f"{phase}_fwd"), s.get(f"{phase}_bwd")
            both = s.get(phase) or {"median_ms": sum(x["median_ms"] for x in (fwd, bwd) if x)}
            ref = summary[base].get(phase) or {"median_ms": sum(
                x["median_ms"] for x in (summary[base].get(f"{phase}_fwd"),
                                         summary[base].get(f"{phase}_bwd")) if x)}
            share = f"{both['median_ms'] / staged:.0%}" if phase in PHASES else "-"
            ratio = both["median_ms"] / ref["median_ms"] if ref["median_ms"] else float("nan")
            b = s["bytes_per_rank"]
            both_ways = b["dispatch"] + b["combine"]  # each exchange's rows, then gradients back
            sent = {"counts": b["counts"], "dispatch": both_ways, "combine": both_ways,
                    "staged_total": b["step"], "layer": b["step"]}.get(phase)
            label = {"staged_total": "**sum of phases**",
                     "layer": "whole layer (unstaged)"}.get(phase, phase)
            lines.append(f"| {world} | {label} | {cell(fwd)} | {cell(bwd)} | {share} | "
                         f"{ratio:.2f} | {'-' if sent is None else human_bytes(sent)} |")
    lines += ["", ("Bytes: the payload a rank sends to other ranks in one forward + backward, "
                   "mean over ranks (dispatch, combine: the rows one way and their gradients "
                   "back), computed from the split sizes and checked equal to what the "
                   "exchange's calls carried."),
              "", ("How to read it: the experts phase does the same work per rank at every EP "
                   "size, so its time / EP 1 is the CPU contention alone (W processes on 2 "
                   "cores, plus any other load); the exchange's own cost is how much the "
                   "dispatch and combine shares grow beyond the local copies they make at EP 1.")]
    return "\n".join(lines) + "\n"


# --- in the workers -----------------------------------------------------------------------------

class Timer:
    """Wall time per phase, each started after a barrier of the group."""

    def __init__(self, barrier: Callable[[], None]) -> None:
        self.barrier, self.seconds = barrier, {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.barrier()
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _settled(t: torch.Tensor) -> torch.Tensor:
    """A collective's result, waited for (funcol returns it before it has arrived)."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return t.wait() if isinstance(t, AsyncCollectiveTensor) else t


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return _settled(t).detach().requires_grad_(True)


def staged_step(layer: Any, x_ND: torch.Tensor, grad_ND: torch.Tensor, timer: Timer
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """ExpertParallelMoE.forward_routed (without the auxiliary losses) stage by stage, then its
    backward stage by stage; returns the output and the input's gradient."""
    from moekit.nn.dispatch import combine_rows, gather_rows, plan_dispatch
    from moekit.parallel.exchange import all_to_all, apply_capacity, exchange_counts, plan_exchange

    c, ep = layer.config, layer.ep
    x_ND = x_ND.detach().requires_grad_(True)
    with timer.phase("router_fwd"):
        routing = layer.route(x_ND)
        plan = plan_dispatch(routing, c.n_experts)
    with timer.phase("counts_fwd"):
        rows_W, counts_WE = exchange_counts(x_ND.shape[0], plan.counts_E, ep)
        exchange = plan_exchange(rows_W, counts_WE, ep.rank, capacity_factor=c.capacity_factor)
        plan = apply_capacity(plan, exchange, ep.rank)
    weights_M = _leaf(plan.weights_M)
    local_plan = dataclasses.replace(plan, weights_M=weights_M)
    with timer.phase("dispatch_fwd"):
        x_RD = _settled(all_to_all(gather_rows(x_ND, plan), exchange.recv_splits,
                                   exchange.send_splits, ep))
        x_in_RD = _leaf(x_RD)
    with timer.phase("experts_fwd"):
        y_RD = layer.experts.forward_grouped(
            x_in_RD.index_select(0, exchange.order_R), exchange.recv_counts_L,
            implementation=c.experts_implementation).index_select(0, exchange.restore_R)
        y_in_RD = _leaf(y_RD)
    with timer.phase("combine_fwd"):
        y_MD = _settled(all_to_all(y_in_RD, exchange.send_splits, exchange.recv_splits, ep))
        y_ND = combine_rows(y_MD, local_plan, x_ND.shape[0])
    with timer.phase("combine_bwd"):
        y_ND.backward(grad_ND)
        grad_y_RD = _settled(y_in_RD.grad)
    with timer.phase("experts_bwd"):
        y_RD.backward(grad_y_RD)
        grad_x_RD = _settled(x_in_RD.grad)
    with timer.phase("dispatch_bwd"):
        x_RD.backward(grad_x_RD)
    with timer.phase("router_bwd"):
        plan.weights_M.backward(_settled(weights_M.grad))
    return y_ND.detach(), _settled(x_ND.grad)


def layer_step(layer: Any, x_ND: torch.Tensor, grad_ND: torch.Tensor, timer: Timer
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The unstaged layer's forward and backward."""
    x_ND = x_ND.detach().requires_grad_(True)
    with timer.phase("layer_fwd"):
        out = layer(x_ND)
    with timer.phase("layer_bwd"):
        (out.output * grad_ND).sum().backward()
    return out.output.detach(), x_ND.grad


def measured_bytes(layer: Any, x_ND: torch.Tensor, grad_ND: torch.Tensor) -> dict[str, int]:
    """One step of the real layer with the exchange's functions wrapped to count what they carry
    to other ranks: gather_equal's counts, all_to_all's rows out, and the gradients back."""
    import moekit.parallel.exchange as exchange
    import moekit.parallel.expert_parallel as expert_parallel

    sent = {"counts": 0, "all_to_all_fwd": 0, "all_to_all_bwd": 0}
    ep = layer.ep
    original_gather, original_a2a = exchange.gather_equal, expert_parallel.all_to_all

    def off_rank(splits: list[int]) -> int:
        return sum(s for j, s in enumerate(splits) if j != ep.rank)

    def gather_equal(value_F: torch.Tensor, group: Any) -> torch.Tensor:
        sent["counts"] += (group.size - 1) * value_F.numel() * value_F.element_size()
        return original_gather(value_F, group)

    def all_to_all(x_MD: torch.Tensor, output_splits: list[int], input_splits: list[int],
                   group: Any) -> torch.Tensor:
        row_bytes = x_MD.shape[1:].numel() * x_MD.element_size()
        sent["all_to_all_fwd"] += off_rank(input_splits) * row_bytes
        out = original_a2a(x_MD, output_splits, input_splits, group)

        def count_grad(grad: torch.Tensor) -> None:  # the backward sends this back to its sources
            row = grad.shape[1:].numel() * grad.element_size()
            sent["all_to_all_bwd"] += off_rank(output_splits) * row

        out.register_hook(count_grad)
        return out

    exchange.gather_equal, expert_parallel.all_to_all = gather_equal, all_to_all
    try:
        x_ND = x_ND.detach().requires_grad_(True)
        (layer(x_ND).output * grad_ND).sum().backward()
    finally:
        exchange.gather_equal, expert_parallel.all_to_all = original_gather, original_a2a
    layer.zero_grad(set_to_none=True)
    return sent


def worker(rank: int, world: int, store_path: str, tokens: int, commands: Any, results: Any
           ) -> None:
    """Build the layer on a gloo group of ``world`` ranks, check the bytes and the staged step,
    warm up, then run one timed repeat per command until 'stop'. Sends (world, rank, kind,
    payload) tuples; an error is sent as kind 'error' with its traceback."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from moekit.nn.sparse import SparseMoE
    from moekit.parallel import ExpertParallelMoE

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                                world_size=world, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        full = SparseMoE(D_MODEL, N_EXPERTS, TOP_K, hidden=HIDDEN, load_balance_weight=0.0,
                         generator=torch.Generator().manual_seed(0)).train()
        layer = ExpertParallelMoE(full, mesh)
        gen = torch.Generator().manual_seed(1000 + rank)
        x_ND = torch.randn(tokens, D_MODEL, generator=gen)
        grad_ND = torch.randn(tokens, D_MODEL, generator=gen)
        counts_E = torch.bincount(layer.route(x_ND).experts_NK.flatten(), minlength=N_EXPERTS)
        table = [torch.empty_like(counts_E) for _ in range(world)]
        dist.all_gather(table, counts_E)
        want = exchange_bytes(torch.stack(table), rank, D_MODEL, x_ND.element_size())
        got = measured_bytes(layer, x_ND, grad_ND)
        carried = {"counts": got["counts"], "forward": sum(got.values()) - got["all_to_all_bwd"],
                   "backward": got["all_to_all_bwd"]}
        if any(carried[k] != want[k] for k in carried):
            raise AssertionError(f"rank {rank}: the bytes formula says {want}, the exchange "
                                 f"carried {got}")
        barrier = dist.barrier
        y_staged, gx_staged = staged_step(layer, x_ND, grad_ND, Timer(barrier))
        layer.zero_grad(set_to_none=True)
        y_layer, gx_layer = layer_step(layer, x_ND, grad_ND, Timer(barrier))  # also a warm-up
        torch.testing.assert_close(y_staged, y_layer, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx_staged, gx_layer, rtol=1e-5, atol=1e-5)
        results.put((world, rank, "ready", {"bytes": want, "carried": got}))
        while commands.get() == "run":
            timer = Timer(barrier)
            layer.zero_grad(set_to_none=True)
            staged_step(layer, x_ND, grad_ND, timer)
            layer.zero_grad(set_to_none=True)
            layer_step(layer, x_ND, grad_ND, timer)
            results.put((world, rank, "repeat", timer.seconds))
        dist.destroy_process_group()
    except Exception:  # sent to the parent, which stops the run with it
        results.put((world, rank, "error", traceback.format_exc()))


# --- in the parent ------------------------------------------------------------------------------

def _collect(results: Any, expected: int, kind: str, timeout_s: float) -> list[tuple]:
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < expected:
        world, rank, what, payload = results.get(timeout=max(1.0, deadline - time.monotonic()))
        if what == "error":
            raise RuntimeError(f"EP size {world}, rank {rank} failed:\n{payload}")
        if what != kind:
            raise RuntimeError(f"EP size {world}, rank {rank} sent {what!r}, expected {kind!r}")
        got.append((world, rank, payload))
    return got


def run(ep_sizes: list[int], tokens: int, repeats: int) -> tuple[dict[int, Any], list[Any]]:
    """Spawn the groups, check them, run the interleaved repeats; the per-size summary and the
    raw repeats (slowest rank per phase)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    commands = {w: [ctx.Queue() for _ in range(w)] for w in ep_sizes}
    store_dir = Path(tempfile.mkdtemp(prefix="moekit_ep_bench_"))
    procs = [ctx.Process(target=worker, daemon=True,
                         args=(r, w, str(store_dir / f"store{w}"), tokens, commands[w][r],
                               results))
             for w in ep_sizes for r in range(w)]
    for p in procs:
        p.start()
    try:
        ready = _collect(results, len(procs), "ready", 600)
        bytes_by_world = {w: [p["bytes"] for (ww, _, p) in sorted(ready) if ww == w]
                          for w in ep_sizes}
        raw: dict[int, list[dict[str, float]]] = {w: [] for w in ep_sizes}
        for _ in range(repeats):
            for w in ep_sizes:  # interleaved: W = 1, 2, 4, 1, 2, 4, ...
                for q in commands[w]:
                    q.put("run")
                per_rank = [p for (_, _, p) in _collect(results, w, "repeat", 600)]
                raw[w].append(slowest_rank(per_rank))
    finally:
        for w in ep_sizes:
            for q in commands[w]:
                q.put("stop")
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    summary: dict[int, Any] = {}
    for w in ep_sizes:
        s: dict[str, Any] = {}
        for key in raw[w][0]:
            s[key] = summarize([rep[key] for rep in raw[w]])
        for stage in ("fwd", "bwd"):
            s[f"staged_total_{stage}"] = summarize(
                [sum(rep[f"{p}_{stage}"] for p in PHASES if f"{p}_{stage}" in rep)
                 for rep in raw[w]])
        s["staged_total"] = summarize([sum(v for k, v in rep.items() if not k.startswith("layer"))
                                       for rep in raw[w]])
        s["bytes_per_rank"] = {k: statistics.mean(b[k] for b in bytes_by_world[w])
                               for k in bytes_by_world[w][0]}
        s["bytes_by_rank"] = bytes_by_world[w]
        summary[w] = s
    return summary, raw


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", type=_ints, default=[1, 2, 4])
    parser.add_argument("--tokens", type=int, default=4096, help="rows per rank")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="512 tokens per rank, 2 repeats")
    parser.add_argument("--out", default="benchmarks/results/expert_parallel")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats = 512, 2
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    print(f"torch {torch.__version__}, 1 thread per process, float32, D={D_MODEL}, H={HIDDEN}, "
          f"E={N_EXPERTS}, K={TOP_K}, {args.tokens} tokens per rank, EP sizes {args.ep}, "
          f"{os.cpu_count()} CPUs; load average {load_before:.2f}", flush=True)
    summary, raw = run(args.ep, args.tokens, args.repeats)
    load_after = os.getloadavg()[0]
    meta = {"torch": torch.__version__, "d_model": D_MODEL, "hidden": HIDDEN,
            "n_experts": N_EXPERTS, "top_k": TOP_K, "tokens": args.tokens, "dtype": "float32",
            "threads_per_process": 1, "repeats": args.repeats, "cpus": os.cpu_count(),
            "load_before": load_before, "load_after": load_after}
    table = markdown(summary, meta)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {**meta, "summary": {str(w): s for w, s in summary.items()},
         "repeats_slowest_rank_s": {str(w): r for w, r in raw.items()}}, indent=2))
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())
