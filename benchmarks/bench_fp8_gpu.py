"""FP8 routed experts on a GPU at DeepSeek-V3's shapes (hidden 7168, moe_intermediate 2048, 256 experts,
top-8): one MoE layer's expert forward with block-wise FP8 weights (this package's FP8 path) against the
same experts in bf16 (grouped_mm), in TFLOP/s, and both against the card's dense FP8 GEMM rate measured in
the same run (``torch._scaled_mm``, per-tensor scales, 8192^3). Needs a CUDA GPU (H100-class: ~34 GB for
the two copies of the experts); ``--device cpu --small`` runs the same code at small shapes (a check of
the script, not a measurement).

    python benchmarks/bench_fp8_gpu.py [--tokens 4096] [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved, print_table, summarise, write_json  # noqa: E402

from modeling_deepseek_moe import DeepseekMoEV3Config  # noqa: E402
from modeling_deepseek_moe.experts import RoutedExperts  # noqa: E402
from modeling_deepseek_moe.fp8 import FP8_QUANTIZATION_CONFIG  # noqa: E402

V3_SHAPE = dict(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4)
SMALL_SHAPE = dict(hidden_size=256, moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)


def build(shape: dict, device: str) -> tuple[RoutedExperts, RoutedExperts]:
    """The same random experts twice: FP8 (block-wise, as released) and bf16 (their dequantized values)."""
    fp8 = RoutedExperts(DeepseekMoEV3Config(**shape, quantization_config=dict(FP8_QUANTIZATION_CONFIG))).to(device)
    bf16 = RoutedExperts(DeepseekMoEV3Config(**shape)).to(device, torch.bfloat16)
    generator = torch.Generator(device).manual_seed(0)
    for chunk_fp8, chunk_bf16 in zip(fp8.chunks, bf16.chunks):
        for name in chunk_fp8.PARTS:
            for expert in range(chunk_fp8.num_experts):  # one expert at a time: bounded float32 memory
                values = torch.randn(getattr(chunk_fp8, name).shape[1:], device=device, generator=generator) * 0.02
                chunk_fp8.set_weights(name, values[None], slice(expert, expert + 1))
                getattr(chunk_bf16, name).data[expert] = chunk_fp8.dequantized(name, torch.bfloat16, slice(expert, expert + 1))[0]
    return fp8, bf16


def dense_fp8_rate(device: str, size: int) -> float | None:
    """TFLOP/s of one FP8 GEMM ``[size, size] @ [size, size]`` (None where the device has no FP8 GEMM)."""
    if not device.startswith("cuda") or torch.cuda.get_device_capability(device) < (8, 9):
        return None
    a = torch.randn(size, size, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(size, size, device=device).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=device)
    times = interleaved({"fp8 gemm": lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)}, 10)
    return 2 * size**3 / sorted(times["fp8 gemm"])[len(times["fp8 gemm"]) // 2] / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="small shapes (to check the script)")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_fp8_gpu.json"))
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_fp8_gpu needs a CUDA GPU (or --device cpu --small to check the script)")
    shape = SMALL_SHAPE if args.small else V3_SHAPE
    fp8, bf16 = build(shape, args.device)
    generator = torch.Generator(args.device).manual_seed(1)
    hidden = torch.randn(args.tokens, shape["hidden_size"], device=args.device, generator=generator, dtype=torch.bfloat16)
    scores = torch.rand(args.tokens, shape["n_routed_experts"], device=args.device, generator=generator)
    indices = scores.topk(shape["num_experts_per_tok"], dim=-1).indices  # near-balanced, as trained routers
    weights = torch.full(indices.shape, 1.0 / shape["num_experts_per_tok"], device=args.device, dtype=torch.bfloat16)
    flops = 2 * args.tokens * shape["num_experts_per_tok"] * 3 * shape["moe_intermediate_size"] * shape["hidden_size"]
    with torch.no_grad():
        error = (fp8(hidden, indices, weights).float() - bf16(hidden, indices, weights).float()).norm() / bf16(hidden, indices, weights).float().norm()
        times = interleaved({"bf16 experts (grouped_mm)": lambda: bf16(hidden, indices, weights),
                             "FP8 experts (this package)": lambda: fp8(hidden, indices, weights)}, args.rounds)
    summary = summarise(times, "bf16 experts (grouped_mm)")
    rate = dense_fp8_rate(args.device, 1024 if args.small else 8192)
    for row in summary.values():
        row["tflops"] = flops / (row["median_ms"] / 1000) / 1e12
        row["ratio_to_dense_fp8_gemm"] = row["tflops"] / rate if rate else float("nan")
    print_table(f"{args.tokens} tokens, shape {shape}, dense FP8 GEMM {rate or float('nan'):.0f} TFLOP/s, FP8 vs bf16 rel. error {error:.1e}", summary)
    write_json(args.json, {"shape": shape, "tokens": args.tokens, "dense_fp8_tflops": rate, "relative_error": float(error),
                           "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
                           "results": summary})


if __name__ == "__main__":
    main()
