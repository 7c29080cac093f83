"""Why E = 64 costs more than E = 8 per useful FLOP on a CPU: the two measured causes.

    .venv/bin/python benchmarks/expert_count_cost.py [--tokens 2048] [--top-k 2] [--steps 8]
        [--layers "moekit SwiGLU,moekit MLP,deepspeed MLP"]

1. Fresh memory, page-faulted every step. Blocks over 32 MB are served by glibc with mmap and
   returned on free, so memory allocated afresh every step is faulted in again every step: at
   E = 64 the experts' weight gradients (400 MB) were, until moekit started writing them into
   memory reused from step to step (moekit.nn.grouped_mm). Each configuration runs in its own
   process, once with the default allocator and once with glibc told to keep freed memory
   (``mallopt``: no mmap, no trim), which shows what page faults still cost; the minor page faults
   per step are counted with ``getrusage``. ``--layers`` adds deepspeed's MoE layer (per-expert
   nn.Linear weights) for comparison.
2. Small blocks. With N*K/E rows per expert (64 at 2048 tokens, K = 2, E = 64), each expert's
   matmuls are skinny and E = 64 streams 8x the weight bytes of E = 8; the per-expert loop of the
   forward, input-gradient and weight-gradient matmuls is timed against the same FLOPs as one dense
   matmul, both writing into memory allocated once.

fp32, 2 threads, D = 512, H = 1024 (benchmarks/layer_throughput.py's sizes); medians of ``steps``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

D_MODEL, HIDDEN = 512, 1024
LAYERS = ("moekit SwiGLU", "moekit MLP", "deepspeed MLP")


def _layer(name: str, n_experts: int, top_k: int):
    """(module, run) for one of ``LAYERS``; run(module, x) gives the output to differentiate."""
    import torch
    from torch import nn

    from moekit import SparseMoE

    generator = torch.Generator().manual_seed(0)
    if name == "deepspeed MLP":  # per-expert nn.Linear weights, dropless
        from deepspeed.moe.layer import MoE

        expert = nn.Sequential(nn.Linear(D_MODEL, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, D_MODEL))
        layer = MoE(hidden_size=D_MODEL, expert=expert, num_experts=n_experts, ep_size=1, k=top_k,
                    drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
        return layer, lambda m, x: m(x)[0]
    experts = {"moekit SwiGLU": {}, "moekit MLP": {"experts": "mlp", "activation": "relu"}}[name]
    layer = SparseMoE(D_MODEL, n_experts, top_k, hidden=HIDDEN, load_balance_weight=0.0,
                      generator=generator, **experts)
    return layer, lambda m, x: m(x).output


def layer_step(name: str, n_experts: int, tokens: int, top_k: int, steps: int, keep: bool
               ) -> dict:
    """Median forward + backward time and minor page faults per step of one layer."""
    from moekit import keep_freed_memory

    kept = keep_freed_memory() if keep else False
    import torch

    torch.set_num_threads(2)
    if name.startswith("deepspeed"):
        from layer_throughput import _deepspeed_group

        _deepspeed_group()
    layer, run = _layer(name, n_experts, top_k)
    x = torch.randn(1, tokens, D_MODEL, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(1, tokens, D_MODEL, generator=torch.Generator().manual_seed(2))

    def step() -> None:
        run(layer, x.detach().requires_grad_(True)).backward(grad)
        layer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times, faults = [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"layer": name, "experts": n_experts, "allocator": "kept" if kept else "default",
            "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "max_ms": 1e3 * max(times), "faults_per_step": statistics.median(faults)}


def matmul_blocks(n_experts: int, rows: int, steps: int) -> list[dict]:
    """Per-expert loops of the three matmuls of each projection against one dense matmul."""
    import torch

    torch.set_num_threads(2)
    out = []
    for name, d_in, d_out in (("w13 (D -> 2H)", D_MODEL, 2 * HIDDEN),
                              ("w2 (H -> D)", HIDDEN, D_MODEL)):
        w_EOI = torch.randn(n_experts, d_out, d_in)  # output-first, as moekit stores them
        cases = _matmul_cases(torch.randn(n_experts, rows, d_in),
                              torch.randn(n_experts, rows, d_out), w_EOI)
        for case, (loop, dense) in cases.items():
            loop_ms, dense_ms = _interleaved(loop, dense, steps)
            out.append({"projection": name, "matmul": case, "per_expert_loop_ms": loop_ms,
                        "dense_ms": dense_ms, "ratio": loop_ms / dense_ms})
    return out


def _matmul_cases(x_ECI, dy_ECO, w_EOI) -> dict:
    """(per-expert loop, one dense matmul of the same FLOPs) for each matmul of a projection. Both
    write into memory allocated once, as the layer does for its weight gradients, so that the times
    are the matmuls' alone and not the allocator's."""
    import torch

    x_MI, dy_MO = x_ECI.flatten(0, 1), dy_ECO.flatten(0, 1)
    experts = range(w_EOI.shape[0])
    y_ECO, dx_ECI, dw_EOI = (torch.empty_like(dy_ECO), torch.empty_like(x_ECI),
                             torch.empty_like(w_EOI))
    y_MO, dx_MI, dw_OI = y_ECO.flatten(0, 1), dx_ECI.flatten(0, 1), dw_EOI[0]

    def loop(a, b, out):
        return lambda: [torch.mm(a(e), b(e), out=out[e]) for e in experts]

    return {
        "forward": (loop(lambda e: x_ECI[e], lambda e: w_EOI[e].T, y_ECO),
                    lambda: torch.mm(x_MI, w_EOI[0].T, out=y_MO)),
        "input gradient": (loop(lambda e: dy_ECO[e], lambda e: w_EOI[e], dx_ECI),
                           lambda: torch.mm(dy_MO, w_EOI[0], out=dx_MI)),
        "weight gradient": (loop(lambda e: dy_ECO[e].T, lambda e: x_ECI[e], dw_EOI),
                            lambda: torch.mm(dy_MO.T, x_MI, out=dw_OI)),
    }


def _interleaved(a, b, steps: int) -> tuple[float, float]:
    a(), b()
    times_a, times_b = [], []
    for _ in range(steps):
        for f, times in ((a, times_a), (b, times_b)):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times_a), 1e3 * statistics.median(times_b)


def _in_subprocess(name: str, n_experts: int, args: argparse.Namespace, keep: bool) -> dict:
    """A fresh process per configuration: the allocator setting and heap state do not leak."""
    cmd = [sys.executable, __file__, "--_child", f"{name},{n_experts},{int(keep)}", "--tokens",
           str(args.tokens), "--top-k", str(args.top_k), "--steps", str(args.steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of each configuration")
    parser.add_argument("--layers", default=",".join(LAYERS[:2]),
                        help=f"comma-separated, of {', '.join(LAYERS)} (deepspeed: an extra)")
    parser.add_argument("--json", default="benchmarks/expert_count_cost.json")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        name, n_experts, keep = args._child.split(",")
        print(json.dumps(layer_step(name, int(n_experts), args.tokens, args.top_k, args.steps,
                                    keep == "1")))
        return
    load_before = os.getloadavg()[0]
    print(f"2 threads, fp32, D={D_MODEL}, H={HIDDEN}, {args.tokens} tokens, K={args.top_k}; "
          f"load average {load_before:.2f}")
    layers = [name for name in LAYERS if name in args.layers]
    runs = [_in_subprocess(name, e, args, keep) for _ in range(args.rounds) for name in layers
            for e in (8, 64) for keep in (False, True)]
    print(f"\n  {'layer':<14} {'E':>3} {'allocator':>10} {'ms (median)':>12} {'min-max':>12} "
          f"{'faults/step':>12}")
    for r in runs:
        print(f"  {r['layer']:<14} {r['experts']:>3} {r['allocator']:>10} {r['median_ms']:>12.0f} "
              f"{r['min_ms']:>5.0f}-{r['max_ms']:<6.0f} {r['faults_per_step']:>12.0f}")
    rows_per_expert = args.tokens * args.top_k // 64
    blocks = matmul_blocks(64, rows_per_expert, args.steps)
    print(f"\n  64 experts x {rows_per_expert} rows against one dense matmul of the same FLOPs:")
    for b in blocks:
        print(f"  {b['projection']:<14} {b['matmul']:<16} loop {b['per_expert_loop_ms']:>7.1f} ms"
              f"  dense {b['dense_ms']:>6.1f} ms  x{b['ratio']:.2f}")
    load_after = os.getloadavg()[0]
    print(f"\nload average before {load_before:.2f}, after {load_after:.2f}")
    Path(args.json).write_text(json.dumps({"tokens": args.tokens, "top_k": args.top_k,
                                           "layer_steps": runs, "matmul_blocks": blocks,
                                           "load_before": load_before, "load_after": load_after},
                                          indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
