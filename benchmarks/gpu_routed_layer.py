"""One GPU, bf16: moekit's routed layer at Mixtral sizes against transformers' Mixtral block and the
dense matmul rate.

    python benchmarks/gpu_routed_layer.py --out gpu_routed_layer.json

Defaults are Mixtral 8x7B's feed-forward block: D = 4096, H = 14336, E = 8, K = 2, on 8192 tokens.
Every variant runs forward + backward on the same input and the same output gradient; times are
CUDA-event medians after warm-ups, variants interleaved round by round. Useful FLOPs of a routed
layer = tokens x K x 6 D H (forward) x 3 (forward + backward), as benchmarks/BENCHMARKS.md counts
them. Each rate is reported against two ceilings measured in the same run: a square bf16 matmul
(8192^3) and a dense SwiGLU MLP of hidden K*H on the same tokens (the same useful FLOPs, no
routing).

Variants:
- moekit SparseMoE with each ``experts_implementation`` the dispatch offers on this device
  ('grouped_mm', 'padded', 'loop');
- transformers' MixtralSparseMoeBlock carrying moekit's weights (so both route every token alike),
  with ``experts_implementation`` 'grouped_mm' and 'eager'.

Runs on a CPU too (small sizes, for a smoke test: ``--tokens 64 --d-model 64 --hidden 128``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moekit import SparseMoE
from moekit.interop import to_transformers
from moekit.nn.grouped_mm import grouped_mm_supported

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_throughput import DenseSwiGLU  # the same ceiling as the CPU benchmark


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    """Seconds one call of ``fn`` takes: CUDA events on a GPU, perf_counter on a CPU."""
    def time_cuda(fn: Callable[[], None]) -> float:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3

    def time_cpu(fn: Callable[[], None]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return time_cuda if device.type == "cuda" else time_cpu


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """FLOP/s of a square matmul of ``size`` on random data (median of ``repeats``)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timer = _timer(device)
    for _ in range(3):
        a @ b
    seconds = statistics.median(timer(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / seconds


def with_implementation(layer: SparseMoE, implementation: str) -> SparseMoE:
    """The same layer (the same parameters) running its experts by ``implementation``."""
    view = copy.copy(layer)
    view.config = dataclasses.replace(layer.config, experts_implementation=implementation)
    return view


def build_variants(args: argparse.Namespace, device: torch.device, dtype: torch.dtype
                   ) -> dict[str, tuple[nn.Module,
                                    Callable[[nn.Module, torch.Tensor], torch.Tensor]]]:
    """name -> (module, how to call it)."""
    d, h, e, k = args.d_model, args.hidden, args.experts, args.top_k
    gen = torch.Generator().manual_seed(0)
    with torch.device("cpu"):
        layer = SparseMoE(d, e, k, hidden=h, load_balance_weight=0.0, generator=gen)
    layer = layer.to(device=device, dtype=dtype)
    variants: dict[str, tuple] = {
        "dense SwiGLU, hidden K*H (ceiling)": (DenseSwiGLU(d, k * h).to(device, dtype),
                                              lambda m, x: m(x))}
    implementations = ["grouped_mm", "padded", "loop"]
    if not grouped_mm_supported(torch.empty(1, d, device=device, dtype=dtype),
                                torch.empty(e, d, 2 * h, device=device, dtype=dtype)):
        implementations.remove("grouped_mm")
    for implementation in implementations:
        variants[f"moekit SparseMoE ({implementation})"] = (
            with_implementation(layer, implementation), lambda m, x: m(x).output)
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        print("transformers is not installed: its block is skipped", file=sys.stderr)
        return variants
    for impl in args.transformers:
        config = MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=e,
                               num_experts_per_tok=k, hidden_act="silu",
                               experts_implementation=impl)
        with torch.device(device):
            block = MixtralSparseMoeBlock(config).to(dtype)
        variants[f"transformers Mixtral ({impl})"] = (to_transformers(layer, block),
                                                      lambda m, x: m(x))
    return variants


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    tokens, d, h, k = args.tokens, args.d_model, args.hidden, args.top_k
    useful = 3 * tokens * k * 6 * d * h  # forward + backward
    record: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu", "torch": torch.__version__, "dtype": args.dtype,
                    "tokens": tokens, "d_model": d, "hidden": h, "experts": args.experts,
                    "top_k": k, "useful_flops_fwd_bwd": useful, "load_average": os.getloadavg()}
    try:
        import transformers
        record["transformers"] = transformers.__version__
    except ImportError:
        record["transformers"] = None
    record["matmul_flops_per_s"] = matmul_rate(device, dtype, args.matmul_size, args.repeats)
    print(f"{record['device']}: square {args.dtype} matmul {args.matmul_size}^3 at "
          f"{record['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    variants = build_variants(args, device, dtype)
    # (batch, sequence, D): transformers' block takes 3-D hidden states only
    x = torch.randn(1, tokens, d, device=device, dtype=dtype)
    grad = torch.randn(1, tokens, d, device=device, dtype=dtype)
    timer = _timer(device)

    def step(name: str, backward: bool = True) -> torch.Tensor:
        module, call = variants[name]
        inp = x.detach().requires_grad_(backward)
        out = call(module, inp)
        if backward:
            out.backward(grad)
            module.zero_grad(set_to_none=True)
        return out.detach()

    outputs, grads = {}, {}
    for name in list(variants):  # warm-up, and the outputs compared with moekit's first variant
        try:
            with torch.no_grad():
                outputs[name] = step(name, backward=False).float()
            for _ in range(2):
                step(name)
        except (RuntimeError, ValueError, TypeError) as err:  # a peer that does not run here
            print(f"{name}: skipped ({type(err).__name__}: {err})", file=sys.stderr)
            record.setdefault("skipped", {})[name] = repr(err)
            del variants[name]
            continue
        if name.startswith("moekit"):
            grads[name] = _expert_grads(variants[name], x, grad)
    record["grad_check"] = _compare_grads(grads)
    reference = next(n for n in variants if n.startswith("moekit"))
    times: dict[str, list[float]] = {n: [] for n in variants}
    fwd_times: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(args.repeats):  # interleaved: A B C ... A B C ...
        for name in variants:
            times[name].append(timer(lambda name=name: step(name)))
            with torch.no_grad():
                fwd_times[name].append(timer(lambda name=name: step(name, backward=False)))
    ceiling = statistics.median(times["dense SwiGLU, hidden K*H (ceiling)"])
    rows = []
    for name in variants:
        seconds = statistics.median(times[name])
        diff = (outputs[name] - outputs[reference]).abs().max().item()
        scale = outputs[reference].abs().max().item()
        rows.append({"variant": name, "fwd_bwd_ms": 1e3 * seconds,
                     "fwd_bwd_spread_ms": [1e3 * min(times[name]), 1e3 * max(times[name])],
                     "fwd_ms": 1e3 * statistics.median(fwd_times[name]),
                     "tflops": useful / seconds / 1e12,
                     "of_matmul_rate": useful / seconds / record["matmul_flops_per_s"],
                     "of_dense_ceiling": ceiling / seconds,
                     "max_abs_diff_vs_moekit": None if name.startswith("dense") else diff,
                     "output_scale": scale})
    record["rows"] = rows
    record["peak_memory_gib"] = (torch.cuda.max_memory_allocated(device) / 2**30
                                 if device.type == "cuda" else None)
    record["load_average_after"] = os.getloadavg()
    return record


def _expert_grads(variant: tuple, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parameter gradients of one moekit variant on the benchmark's input (float32 copies)."""
    module, call = variant
    call(module, x.detach().requires_grad_(True)).backward(grad)
    out = {n: p.grad.float().clone() for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return out


def _compare_grads(grads: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Largest relative difference of each strategy's gradients from the loop's (the reference)."""
    reference = grads.get("moekit SparseMoE (loop)")
    if reference is None:
        return {}
    out = {}
    for name, g in grads.items():
        out[name] = max(((g[k] - reference[k]).norm() / reference[k].norm().clamp_min(1e-30)).item()
                        for k in reference)
    print("gradients against the loop (relative norm of the difference):", out, flush=True)
    return out


def format_table(record: dict) -> str:
    lines = [(f"{record['device']}, torch {record['torch']}, "
              f"transformers {record['transformers']}, "
              f"{record['dtype']}: {record['tokens']} tokens, D = {record['d_model']}, "
              f"H = {record['hidden']}, E = {record['experts']}, K = {record['top_k']}; "
              f"square matmul {record['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s"),
             ("| variant | fwd+bwd ms (min-max) | fwd ms | useful TFLOP/s | of matmul rate | "
              "of dense ceiling | max abs diff vs moekit |"),
             "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        diff = "-" if r["max_abs_diff_vs_moekit"] is None else f"{r['max_abs_diff_vs_moekit']:.3g}"
        lo, hi = r["fwd_bwd_spread_ms"]
        lines.append(f"| {r['variant']} | {r['fwd_bwd_ms']:.2f} ({lo:.2f}-{hi:.2f}) | "
                     f"{r['fwd_ms']:.2f} | {r['tflops']:.0f} | {r['of_matmul_rate']:.2f} | "
                     f"{r['of_dense_ceiling']:.2f} | {diff} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--transformers", default="grouped_mm,eager",
                        type=lambda s: [v for v in s.split(",") if v])
    parser.add_argument("--out", help="write the JSON record here")
    args = parser.parse_args()
    record = run(args)
    print(format_table(record))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
