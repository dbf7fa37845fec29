"""One DeepSeek-V3 MoE block forward on this CPU: this package vs transformers' native DeepseekV3MoE
(``eager`` and ``grouped_mm`` experts) on the same weights, against the floor of one dense GEMM doing
the same FLOPs (prefill) or reading the same weight bytes (decode); then forward + backward.

The router is near-balanced (small gate weights, correction biases ~1e-3), as trained V3 routers are.
glibc's allocator returns freed buffers to the OS between calls, so every large intermediate page-faults
again; run once as is and once with ``MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432``
(what PyTorch's CPU tuning guides suggest, or jemalloc/tcmalloc) to see both.

    python benchmarks/bench_moe.py [--rounds 15] [--json benchmarks/results/bench_moe.json]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from modeling_deepseek_moe import DeepseekMoEV3Config
from modeling_deepseek_moe.moe import MoEBlock
from timing import interleaved, print_table, summarise, write_json

SHAPE = dict(hidden_size=1024, moe_intermediate_size=256, n_routed_experts=64, num_experts_per_tok=6,
             n_shared_experts=1, n_group=8, topk_group=4)


def build_pair(dtype: torch.dtype):
    torch.manual_seed(0)
    ours = MoEBlock(DeepseekMoEV3Config(**SHAPE))
    for name, param in ours.named_parameters():
        param.data.normal_(0, 0.02)
    ours.gate.e_score_correction_bias.normal_(0, 0.001)  # a balanced router, as trained V3 routers are
    native_config = DeepseekV3Config(**SHAPE)
    native = DeepseekV3MoE(native_config)
    chunk = ours.experts.chunks[0]
    native.experts.gate_up_proj.data.copy_(chunk.gate_up_proj)
    native.experts.down_proj.data.copy_(chunk.down_proj)
    native.gate.weight.data.copy_(ours.gate.weight)
    native.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
    native.shared_experts.load_state_dict(ours.shared_experts.state_dict())
    ours, native = ours.to(dtype), native.to(dtype)
    native.gate.e_score_correction_bias.data = native.gate.e_score_correction_bias.float()
    return ours, native, native_config


def floor_weights(tokens: int, routed_rows: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense GEMM with the block's FLOPs: [tokens, hidden] @ [hidden, N], N = FLOPs / (2 tokens hidden)."""
    hidden, inter = SHAPE["hidden_size"], SHAPE["moe_intermediate_size"]
    flops = 2 * hidden * (tokens * SHAPE["n_routed_experts"] + routed_rows * 3 * inter + tokens * 3 * inter * SHAPE["n_shared_experts"])
    width = round(flops / (2 * tokens * hidden))
    return torch.randn(tokens, hidden, dtype=dtype), torch.randn(width, hidden, dtype=dtype)


def decode_floor_weights(touched_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """Decode: as many weight bytes as the experts the batch touches (plus shared expert and router),
    to be read once (a sum: memory bound)."""
    hidden, inter = SHAPE["hidden_size"], SHAPE["moe_intermediate_size"]
    rows = 3 * inter * (touched_experts + SHAPE["n_shared_experts"]) + SHAPE["n_routed_experts"]
    return torch.randn(rows, hidden, dtype=dtype)


def run(tokens: int, dtype: torch.dtype, rounds: int) -> dict:
    ours, native, native_config = build_pair(dtype)
    ours.eval(), native.eval()  # inference: no balance loss, no load statistics for the step
    x = torch.randn(1, tokens, SHAPE["hidden_size"], dtype=dtype)
    with torch.inference_mode():
        routing = ours.gate(x.view(tokens, -1))
        touched = int(routing.topk_indices.unique().numel())
        if tokens >= 256:
            floor_name = "dense GEMM floor"
            a, w = floor_weights(tokens, tokens * SHAPE["num_experts_per_tok"], dtype)
            floor = lambda: torch.nn.functional.linear(a, w)  # noqa: E731
        else:
            floor_name = "weight-read floor"
            w = decode_floor_weights(touched, dtype)
            floor = w.sum

        def native_with(implementation):
            def call():
                native_config._experts_implementation = implementation
                return native(x)
            return call

        candidates = {
            floor_name: floor,
            "modeling_deepseek_moe": lambda: ours(x),
            "native eager": native_with("eager"),
            "native grouped_mm": native_with("grouped_mm"),
        }
        out_ours, _ = ours(x)  # (output, routing decision)
        out_native = native_with("eager")()
        error = ((out_ours.float() - out_native.float()).norm() / out_native.float().norm()).item()
        times = interleaved(candidates, rounds)
    summary = summarise(times, floor_name)
    speedups = {
        name: statistics.median(n / o for n, o in zip(times[name], times["modeling_deepseek_moe"]))
        for name in ("native eager", "native grouped_mm")
    }
    title = f"MoE block forward, {tokens} tokens, {str(dtype).removeprefix('torch.')} (experts touched: {touched}, rel. error vs native {error:.1e})"
    print_table(title, summary)
    for name, speedup in speedups.items():
        print(f"  speed-up of this package over {name} (median of per-round ratios): {speedup:.2f}x")
    return {"tokens": tokens, "dtype": str(dtype), "experts_touched": touched, "relative_error_vs_native": error,
            "results": summary, "speedup_of_this_package_over": speedups}


def run_backward(tokens: int, rounds: int) -> dict:
    """Forward + backward (input and weight gradients) of the block, fp32: ours vs native."""
    ours, native, native_config = build_pair(torch.float32)
    x = torch.randn(1, tokens, SHAPE["hidden_size"], requires_grad=True)
    upstream = torch.randn(1, tokens, SHAPE["hidden_size"])

    def step(module, implementation=None):
        def call():
            if implementation:
                native_config._experts_implementation = implementation
            module.zero_grad(set_to_none=True)
            x.grad = None
            output = module(x)  # ours: (output, routing decision)
            ((output[0] if isinstance(output, tuple) else output) * upstream).sum().backward()
        return call

    a, w = floor_weights(tokens, tokens * SHAPE["num_experts_per_tok"], torch.float32)
    times = interleaved(
        {
            "dense GEMM floor x3 (fwd+bwd)": lambda: [torch.nn.functional.linear(a, w) for _ in range(3)],
            "modeling_deepseek_moe": step(ours),
            "native eager": step(native, "eager"),
            "native grouped_mm": step(native, "grouped_mm"),
        },
        rounds,
        warmup=1,
    )
    summary = summarise(times, "dense GEMM floor x3 (fwd+bwd)")
    print_table(f"MoE block forward + backward, {tokens} tokens, float32", summary)
    return {"tokens": tokens, "dtype": "torch.float32", "pass": "forward+backward", "results": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", default="benchmarks/results/bench_moe.json")
    parser.add_argument("--quick", action="store_true", help="fp32 1024 tokens only")
    args = parser.parse_args()
    print(f"shape: {SHAPE}, torch threads: {torch.get_num_threads()}")
    runs = [run(1024, torch.float32, args.rounds)]
    if not args.quick:
        runs.append(run(1, torch.float32, args.rounds * 4))
        runs.append(run(16, torch.float32, args.rounds * 4))
        runs.append(run(64, torch.float32, args.rounds * 2))
        runs.append(run(1024, torch.bfloat16, max(3, args.rounds // 3)))
        runs.append(run_backward(1024, max(3, args.rounds // 3)))
    write_json(args.json, {"benchmark": "bench_moe", "shape": SHAPE, "runs": runs})


if __name__ == "__main__":
    main()
