"""Forward + backward throughput of routed MoE layers against peers (../shared/BENCHMARKS.md).

    .venv/bin/pip install -c constraints.txt -e '.[bench]'
    .venv/bin/python benchmarks/layer_throughput.py [--tokens 256,2048,8192] [--experts 8,64]
                                                    [--top-k 1,2] [--repeats 3] [--quick]

fp32, 2 threads, D = 512, H = 1024. For every (tokens, E, K): each variant once to warm up, then
``repeats`` interleaved rounds (A B C ... A B C ...); the median and the spread are printed.
Useful FLOPs = rows x K x the expert's FLOPs per row x 3 (forward + backward): SwiGLU and GEGLU
experts 6*D*H per row forward, 2-matrix MLP experts 4*D*H. The ceiling is a dense SwiGLU MLP with
hidden K*H on the same rows: the same useful FLOPs as one matmul-bound block. "saved MB" is the
memory autograd keeps between forward and backward (tensors saved for backward), a deterministic
stand-in for peak activation memory on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moekit import ExpertConfig, MixtureOfExperts, SparseMoE, keep_freed_memory

D_MODEL, HIDDEN = 512, 1024


@dataclass
class Variant:
    name: str
    module: nn.Module
    run: Callable[[torch.Tensor], torch.Tensor]  # x (1, N, D) -> output (1, N, D)
    flops_per_row: int  # forward FLOPs of the experts one row passes through (K of them)
    semantics: str


class DenseSwiGLU(nn.Module):
    """The ceiling: one dense SwiGLU MLP with hidden K*H, the same useful FLOPs as the routed
    layer."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * h, bias=False)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * up)


def _variants(n: int, e: int, k: int, peers: set[str]) -> list[Variant]:
    swiglu = 6 * D_MODEL * HIDDEN * k
    mlp = 4 * D_MODEL * HIDDEN * k
    g = torch.Generator().manual_seed(0)
    moekit = SparseMoE(D_MODEL, e, k, hidden=HIDDEN, load_balance_weight=0.0, generator=g)
    out = [
        Variant("dense ceiling (SwiGLU, hidden K*H)", DenseSwiGLU(D_MODEL, k * HIDDEN),
                lambda m, x: m(x), swiglu, "same FLOPs, no routing"),
        Variant("moekit SparseMoE SwiGLU", moekit, lambda m, x: m(x).output, swiglu,
                "dropless top-k"),
        Variant("moekit SparseMoE MLP", SparseMoE(D_MODEL, e, k, hidden=HIDDEN, experts="mlp",
                                                  activation="relu", load_balance_weight=0.0,
                                                  generator=g),
                lambda m, x: m(x).output, mlp, "dropless top-k"),
    ]
    if "transformers" in peers:
        # A block built from a config alone holds uninitialised memory (NaNs, every row routed to
        # the same two experts); these blocks get moekit's weights, so both route identically.
        from moekit.interop import transformers_block

        # The eager loop over experts takes over 10 s a step at E = 64 beyond 256 tokens.
        impls = ("grouped_mm",) if e >= 64 and n > 256 else ("eager", "grouped_mm")
        out += [Variant(f"transformers Mixtral ({impl})",
                        transformers_block(moekit, "mixtral", experts_implementation=impl),
                        lambda m, x: m(x), swiglu, "dropless top-k, the same weights")
                for impl in impls]
    if "st_moe" in peers:
        from st_moe_pytorch import MoE

        layer = MoE(D_MODEL, num_experts=e, expert_hidden_mult=3 * HIDDEN / (2 * D_MODEL),
                    gating_top_n=max(k, 2), threshold_train=0.0)
        # st-moe routes at least 2 experts per row; its FLOPs count its own top-n.
        out.append(Variant("st-moe-pytorch (GEGLU)", layer, lambda m, x: m(x).outputs,
                           6 * D_MODEL * HIDDEN * max(k, 2),
                           "top-n >= 2, capacity 1.25: drops rows"))
    if "lucidrains" in peers and k == 2:
        from mixture_of_experts import MoE

        layer = MoE(D_MODEL, num_experts=e, hidden_dim=HIDDEN, second_policy_train="all")
        out.append(Variant("lucidrains mixture-of-experts (MLP)", layer, lambda m, x: m(x)[0], mlp,
                           "top-2, capacity 1.25: drops rows"))
    if "deepspeed" in peers:
        from deepspeed.moe.layer import MoE

        expert = nn.Sequential(nn.Linear(D_MODEL, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, D_MODEL))
        layer = MoE(hidden_size=D_MODEL, expert=expert, num_experts=e, ep_size=1, k=k,
                    drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
        out.append(Variant("deepspeed MoE (MLP, drop_tokens=False)", layer, lambda m, x: m(x)[0],
                           mlp, "dropless top-k (capacity padded to the largest expert)"))
    # all experts on every row: E/K times the work; only where it is affordable
    if n * e <= 2048 * 8:
        dense = MixtureOfExperts(D_MODEL, D_MODEL, e, expert=ExpertConfig(
            kind="glu", hidden=HIDDEN, activation="silu"), generator=g)
        out.append(Variant("moekit dense 1991 mixture (all E experts)", dense,
                           lambda m, x: m(x.reshape(-1, D_MODEL)).output.reshape(x.shape), swiglu,
                           "every expert on every row"))
    return out


def _step(variant: Variant, x: torch.Tensor, grad: torch.Tensor) -> None:
    x = x.detach().requires_grad_(True)
    variant.run(variant.module, x).backward(grad)
    variant.module.zero_grad(set_to_none=True)


def _saved_megabytes(variant: Variant, x: torch.Tensor) -> float:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = variant.run(variant.module, x.detach().requires_grad_(True))
    del out
    return total / 2**20


def bench(n: int, e: int, k: int, repeats: int, peers: set[str]) -> list[dict]:
    x = torch.randn(1, n, D_MODEL, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(1, n, D_MODEL, generator=torch.Generator().manual_seed(2))
    variants = _variants(n, e, k, peers)
    for v in variants:
        v.module.train()
        _step(v, x, grad)  # warm-up
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(repeats if n < 8192 else max(2, repeats - 1)):
        for v in variants:
            start = time.perf_counter()
            _step(v, x, grad)
            times[v.name].append(time.perf_counter() - start)
    ceiling = statistics.median(times[variants[0].name])
    ceiling_rate = 3 * n * variants[0].flops_per_row / ceiling
    rows = []
    for v in variants:
        median = statistics.median(times[v.name])
        rate = 3 * n * v.flops_per_row / median
        rows.append({"tokens": n, "experts": e, "top_k": k, "variant": v.name,
                     "semantics": v.semantics, "median_ms": 1e3 * median,
                     "min_ms": 1e3 * min(times[v.name]), "max_ms": 1e3 * max(times[v.name]),
                     "useful_gflops": rate / 1e9, "fraction_of_ceiling": rate / ceiling_rate,
                     "saved_mb": _saved_megabytes(v, x)})
    moekit = next(r for r in rows if r["variant"] == "moekit SparseMoE SwiGLU")
    for r in rows:
        r["moekit_speedup"] = r["median_ms"] / moekit["median_ms"]
    return rows


def _available_peers() -> set[str]:
    found = set()
    for name, module in (("transformers", "transformers"), ("st_moe", "st_moe_pytorch"),
                         ("lucidrains", "mixture_of_experts"), ("deepspeed", "deepspeed")):
        try:
            __import__(module)
            found.add(name)
        except ImportError:
            pass
    return found


def _deepspeed_group() -> None:
    """deepspeed's MoE layer needs a process group: one process, gloo."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533")):
        os.environ.setdefault(key, value)
    import deepspeed

    deepspeed.init_distributed("gloo")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=_ints, default=[256, 2048, 8192])
    parser.add_argument("--experts", type=_ints, default=[8, 64])
    parser.add_argument("--top-k", type=_ints, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="256 tokens, E = 8, K = 2, 1 repeat")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory (moekit.keep_freed_memory), "
                             "for every variant")
    parser.add_argument("--json", default="benchmarks/layer_throughput.json")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.experts, args.top_k, args.repeats = [256], [8], [2], 1
    kept = keep_freed_memory() if args.keep_freed_memory else False
    peers = _available_peers()
    if "deepspeed" in peers:
        _deepspeed_group()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32, D={D_MODEL}, "
          f"H={HIDDEN}; peers: {sorted(peers) or 'none installed'}; freed memory kept: {kept}; "
          f"load average {load_before:.2f}")
    rows = []
    for n in args.tokens:
        for e in args.experts:
            for k in args.top_k:
                part = bench(n, e, k, args.repeats, peers)
                rows += part
                print(f"\ntokens {n}, E {e}, K {k}")
                print(f"  {'variant':<44}{'ms':>9}{'spread':>16}{'GFLOP/s':>9}{'ceiling':>9}"
                      f"{'time/moekit':>12}{'saved MB':>10}  semantics")
                for r in part:
                    spread = f"{r['min_ms']:.0f}-{r['max_ms']:.0f}"
                    print(f"  {r['variant']:<44}{r['median_ms']:>9.1f}{spread:>16}"
                          f"{r['useful_gflops']:>9.1f}{r['fraction_of_ceiling']:>9.2f}"
                          f"{r['moekit_speedup']:>12.2f}{r['saved_mb']:>10.1f}  {r['semantics']}",
                          flush=True)
    load_after = os.getloadavg()[0]
    print(f"\nload average before {load_before:.2f}, after {load_after:.2f}")
    Path(args.json).write_text(json.dumps({"torch": torch.__version__, "threads": args.threads,
                                           "keep_freed_memory": kept,
                                           "load_before": load_before, "load_after": load_after,
                                           "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
