"""End to end on this CPU: load, prefill and decode of a DeepSeek-V2-Lite-width model, this package against
transformers' native DeepseekV3ForCausalLM (``experts_implementation="grouped_mm"``) on the same weights, in
float32 and bf16, eager and compiled (static-cache decoding through ``torch.compile``), with this machine's
floors measured in the same run:

- prefill floor: the model's FLOPs for the prompt at a large GEMM's rate in the same dtype (in half precision the
  faster of that and float32's: a CPU without bf16 instructions multiplies bf16 matrices faster in float32);
- decode floor: the bytes of the weights one decoded token reads (everything but the embedding; of the routed
  experts, the top-k a token chooses) at a large GEMV's rate in the same dtype.

The model: hidden 2048, 64 routed experts of 1408, top-6, 2 shared experts, MLA with kv_lora_rank 512 (no
q_lora, as V2-Lite), V3 routing; a dense first layer and one MoE layer; V2-Lite's vocabulary. Built locally in
DeepSeek's layout. Candidates are interleaved round by round; ratios are medians of per-round ratios. A
decode step is (generate N tokens - generate 1 token) / (N - 1), both timed in the same round.

    python benchmarks/bench_e2e.py [--rounds 3] [--prefill 512] [--prompt 128] [--new-tokens 32]
                                   [--dtypes float32 bfloat16] [--no-compile]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import CompileConfig, DeepseekV3ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved, write_json  # noqa: E402

from modeling_deepseek_moe import DeepseekMoEV3ForCausalLM  # noqa: E402
from modeling_deepseek_moe.synthetic import tiny_official_config, write_official_checkpoint  # noqa: E402

MODEL = dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=2,
             first_k_dense_replace=1, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, n_group=1,
             topk_group=1, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=102400,
             num_nextn_predict_layers=0, max_position_embeddings=4096)


def load(kind: str, directory: str, dtype: torch.dtype):
    if kind == "ours":
        return DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    return DeepseekV3ForCausalLM.from_pretrained(directory, dtype=dtype, experts_implementation="grouped_mm").eval()


def weight_bytes_per_decoded_token(model) -> int:
    """Bytes of the weights one decoded token reads: all but the input embedding, and of each MoE layer's
    routed experts only the top-k."""
    config, total = model.config, 0
    for name, tensor in model.named_parameters():
        if "embed_tokens" in name:
            continue
        size = tensor.numel() * tensor.element_size()
        if ".mlp.experts." in name:  # stacked or one module per expert: a top-k share either way
            size = size * config.num_experts_per_tok // config.n_routed_experts
        total += size
    return total


def prefill_flops(model, tokens: int) -> float:
    """Multiply-adds x 2 of a prompt of ``tokens``: every weight a token uses (top-k routed experts), the
    causal attention products, and the head for every position (both models compute all logits)."""
    config = model.config
    per_token = weight_bytes_per_decoded_token(model) / next(model.parameters()).element_size()
    attention = (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * config.num_attention_heads
    causal_pairs = tokens * (tokens + 1) / 2
    return 2 * (per_token * tokens + attention * causal_pairs * config.num_hidden_layers)


def gemm_flops_per_second(dtype: torch.dtype, rounds: int) -> float:
    """A large GEMM's rate in the models' layout (``x @ W.T``), for half precision the faster of its own and float32's:
    on a CPU without instructions for its products both models' bf16 products could run in float32, 4-7x faster
    (and ours do: modeling_deepseek_moe/linear.py)."""
    x, weight = torch.randn(512, 2048), torch.randn(8192, 2048)
    candidates = {str(dtype): (x.to(dtype), weight.to(dtype))}
    if dtype != torch.float32:
        candidates["float32"] = (x, weight)
    times = interleaved({name: (lambda a=a, w=w: torch.nn.functional.linear(a, w)) for name, (a, w) in candidates.items()},
                        rounds=rounds, warmup=2)
    return 2 * 512 * 2048 * 8192 / min(statistics.median(t) for t in times.values())


def gemv_bytes_per_second(dtype: torch.dtype, rounds: int) -> float:
    """A large GEMV's weight bytes per second from memory, the faster of F.linear and torch.mv (in bf16
    torch.mv reads faster on this CPU: modeling_deepseek_moe/linear.py)."""
    # 1 GB of bf16 weights (2 GB float32), well beyond the last-level cache, as a decoded token's weights are
    weight, vector = torch.randn(131072, 4096, dtype=torch.bfloat16).to(dtype), torch.randn(1, 4096, dtype=dtype)
    times = interleaved({"linear": lambda: torch.nn.functional.linear(vector, weight),
                         "mv": lambda: torch.mv(weight, vector[0])}, rounds=rounds, warmup=2)
    return weight.numel() * weight.element_size() / min(statistics.median(t) for t in times.values())


def generate(model, prompt: torch.Tensor, new_tokens: int, compiled: bool) -> None:
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False)
    if compiled:
        config = CompileConfig(fullgraph=True)
        config._compile_all_devices = True  # transformers compiles on accelerators only by default
        kwargs.update(cache_implementation="static", compile_config=config)
    else:
        kwargs.update(disable_compile=True)
    with torch.no_grad():
        model.generate(prompt, **kwargs)


def ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    return statistics.median(n / d for n, d in zip(times[numerator], times[denominator]))


def measure_dtype(directory: str, dtype: torch.dtype, args) -> dict:
    name = str(dtype).removeprefix("torch.")
    load_times = {"ours": [], "native": []}
    for round_index in range(-1, args.rounds):  # loading, alternating; round -1 warms the page cache, untimed
        for kind in ("ours", "native") if round_index % 2 == 0 else ("native", "ours"):
            start = time.perf_counter()
            model = load(kind, directory, dtype)
            if round_index >= 0:
                load_times[kind].append(time.perf_counter() - start)
            del model
            gc.collect()
    models = {kind: load(kind, directory, dtype) for kind in ("ours", "native")}
    with torch.no_grad():
        prompt = torch.randint(0, MODEL["vocab_size"], (1, args.prefill), generator=torch.Generator().manual_seed(0))
        prefill = interleaved({kind: (lambda m=m: m(prompt, use_cache=False)) for kind, m in models.items()},
                              rounds=args.rounds, warmup=1)
    short = torch.randint(0, MODEL["vocab_size"], (1, args.prompt), generator=torch.Generator().manual_seed(1))
    modes = [False, True] if args.compile else [False]
    decode = {}
    for compiled in modes:
        torch._dynamo.reset()
        candidates = {}
        for kind, model in models.items():
            for new in (1, args.new_tokens):
                candidates[f"{kind} {new}"] = (lambda m=model, n=new, c=compiled: generate(m, short, n, c))
        times = interleaved(candidates, rounds=args.rounds, warmup=1)
        for kind in models:
            decode[f"{kind}{' compiled' if compiled else ''}"] = [
                (long - one) / (args.new_tokens - 1) for long, one in zip(times[f"{kind} {args.new_tokens}"], times[f"{kind} 1"])]

    gemm_rate, gemv_rate = gemm_flops_per_second(dtype, args.rounds * 4), gemv_bytes_per_second(dtype, args.rounds * 4)
    prefill_floor = prefill_flops(models["ours"], args.prefill) / gemm_rate
    decode_floor = weight_bytes_per_decoded_token(models["ours"]) / gemv_rate
    result = {
        "load_s": {kind: statistics.median(t) for kind, t in load_times.items()},
        "load_native_over_ours": ratio(load_times, "native", "ours"),
        "prefill_ms": {kind: 1000 * statistics.median(t) for kind, t in prefill.items()},
        "prefill_native_over_ours": ratio(prefill, "native", "ours"),
        "prefill_floor_ms": 1000 * prefill_floor,
        "prefill_ours_over_floor": statistics.median(prefill["ours"]) / prefill_floor,
        "decode_step_ms": {kind: 1000 * statistics.median(t) for kind, t in decode.items()},
        "decode_native_over_ours": ratio(decode, "native", "ours"),
        "decode_floor_ms": 1000 * decode_floor,
        "decode_ours_over_floor": statistics.median(decode["ours"]) / decode_floor,
        "gemm_gflops": gemm_rate / 1e9,
        "gemv_gb_per_s": gemv_rate / 1e9,
    }
    if args.compile:
        result["decode_eager_over_compiled"] = ratio(decode, "ours", "ours compiled")
        result["decode_native_compiled_over_ours_compiled"] = ratio(decode, "native compiled", "ours compiled")
        result["decode_ours_compiled_over_floor"] = statistics.median(decode["ours compiled"]) / decode_floor
    print(f"\n{name}: GEMM {result['gemm_gflops']:.0f} GFLOP/s, GEMV {result['gemv_gb_per_s']:.1f} GB/s")
    print(f"  load      ours {result['load_s']['ours']:.2f} s, native {result['load_s']['native']:.2f} s"
          f" -> ours {result['load_native_over_ours']:.2f}x faster")
    print(f"  prefill   ours {result['prefill_ms']['ours']:.0f} ms, native {result['prefill_ms']['native']:.0f} ms"
          f" -> ours {result['prefill_native_over_ours']:.2f}x faster; floor {result['prefill_floor_ms']:.0f} ms,"
          f" ours {result['prefill_ours_over_floor']:.2f}x the floor")
    for kind, value in result["decode_step_ms"].items():
        print(f"  decode    {kind:<16} {value:.1f} ms per token")
    print(f"  decode    ours {result['decode_native_over_ours']:.2f}x faster than native (eager); floor"
          f" {result['decode_floor_ms']:.1f} ms, ours {result['decode_ours_over_floor']:.2f}x the floor")
    if args.compile:
        print(f"  compiled  {result['decode_eager_over_compiled']:.2f}x faster than eager; ours"
              f" {result['decode_native_compiled_over_ours_compiled']:.2f}x faster than native compiled;"
              f" {result['decode_ours_compiled_over_floor']:.2f}x the floor")
    del models
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_e2e.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        write_official_checkpoint(directory, tiny_official_config("v3", **MODEL), num_shards=4)
        results = {str(dtype): measure_dtype(directory, getattr(torch, dtype), args) for dtype in args.dtypes}
    write_json(args.json, {"benchmark": "bench_e2e", "model": MODEL, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
