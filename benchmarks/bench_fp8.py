"""FP8 on this CPU: a DeepSeek-V3-layout model of more than 1 GB in bf16, loaded from its FP8 checkpoint
(weights stay FP8, the dequantize path) against the same model dequantized to bf16 and to float32.

1. Memory: bytes of the loaded weights (parameters + buffers) and the process's resident memory growth
   from before to after loading, each model in a fresh process; the goal is FP8 <= 0.55 x bf16.
2. Forward time at several batch sizes (tokens per routed expert grow with the batch, and the dequantize
   path's cost per weight does not), interleaved round by round: FP8 with float32 compute against the
   float32 model (goal <= 1.5x), FP8 with bf16 compute against the bf16 model.
3. Decode-sized forwards (1, 4, 16 tokens): FP8 (bf16 compute) against the bf16 and float32 models of the
   same weights, and the effective bandwidth of each: the bytes of the weights a forward reads (every
   weight but the embedding and the routed experts no token chose) per second, against a large bf16
   GEMV's rate measured in the same run (goals at 1 and 4 tokens: FP8 <= 0.7x the bf16 time, FP8
   bandwidth >= 0.7x the GEMV rate).
4. The experts-in-CPU-memory placement's cost per decoded token for a DeepSeek-V2-Lite-sized model: one
   MoE layer of V2-Lite's width (hidden 2048, 64 routed experts of 1408, top-6, 2 shared) forwarding one
   token on this CPU, FP8 against bf16, times V2-Lite's 26 MoE layers, and the bytes of the weights the
   token read (router, shared experts, the six chosen experts) per second against the same GEMV's rate.

    python benchmarks/bench_fp8.py [--tokens 256 1024 4096] [--decode-tokens 1 4 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved, print_table, summarise, write_json  # noqa: E402

from modeling_deepseek_moe import DeepseekMoEV2ForCausalLM, DeepseekMoEV3ForCausalLM, conversion  # noqa: E402
from modeling_deepseek_moe.synthetic import write_fp8_official_checkpoint  # noqa: E402

# ~1.1 GB in bf16, ~0.6 GB in FP8; routed experts hold 90% of the weights, as in DeepSeek-V3.
CONFIG = dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=6,
              n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, n_shared_experts=1,
              num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256,
              qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, vocab_size=16384,
              num_nextn_predict_layers=0, first_k_dense_replace=1)

LOAD = """
import gc, json, os, sys, torch
from modeling_deepseek_moe import DeepseekMoEV3ForCausalLM

def rss():  # resident bytes now (the loaded model, not the peak while loading)
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = rss()
model = DeepseekMoEV3ForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
gc.collect()
weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(json.dumps({"weight_bytes": weights, "rss_growth_bytes": rss() - before}))
"""


def measure_load(directory: str, dtype: str) -> dict:
    done = subprocess.run([sys.executable, "-c", LOAD, directory, dtype], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_bytes(model) -> int:
    """Bytes of the weights the last forward of ``model`` (a model or one MoE layer) read: every parameter
    and buffer but the embedding, and of the routed experts only those that received a token (router
    statistics of that forward)."""
    total = 0
    for name, module in model.named_modules():
        for attr, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor is None or name.endswith("embed_tokens") or attr.endswith("_load"):
                continue
            size = tensor.numel() * tensor.element_size()
            if ".experts.chunks." in f".{name}.":
                gate = model.get_submodule(name.rsplit("experts.chunks", 1)[0].rstrip(".")).gate
                size = size * int((gate.last_forward_load > 0).sum()) // gate.num_experts
            total += size
    return total


def gemv_bytes_per_second(rounds: int) -> float:
    """A large bf16 GEMV's weight bytes per second (the decode floor's rate)."""
    weight, vector = torch.randn(16384, 4096, dtype=torch.bfloat16), torch.randn(1, 4096, dtype=torch.bfloat16)
    times = interleaved({"gemv": lambda: torch.nn.functional.linear(vector, weight)}, rounds=rounds, warmup=2)["gemv"]
    return weight.numel() * 2 / sorted(times)[len(times) // 2]


def decode_rows(models: dict, tokens_list: list[int], rounds: int) -> dict:
    rate = gemv_bytes_per_second(rounds * 4)
    print(f"\nlarge bf16 GEMV: {rate / 1e9:.1f} GB/s of weights")
    names = ("fp8, bf16 compute", "bf16 (dequantized copy)", "fp32 (dequantized copy)")
    rows = {"gemv_bytes_per_second": rate}
    for tokens in tokens_list:
        ids = torch.randint(0, CONFIG["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(tokens))

        def forward(model):
            return lambda: model(ids, use_cache=False)

        with torch.no_grad():
            times = interleaved({name: forward(models[name]) for name in names}, rounds=rounds * 4, warmup=2)
            summary = summarise(times, "bf16 (dequantized copy)")
            for name in names:
                models[name](ids, use_cache=False)
                summary[name]["read_GB"] = read_bytes(models[name]) / 1e9
                summary[name]["bandwidth_to_gemv"] = read_bytes(models[name]) / (summary[name]["median_ms"] / 1000) / rate
        print_table(f"decode-sized forward, {tokens} tokens", summary)
        rows[f"{tokens} tokens"] = summary
    return rows


# DeepSeek-V2-Lite's widths; one dense and one MoE layer (V2-Lite has 1 and 26).
V2_LITE = dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=2,
               n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, num_attention_heads=16,
               num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
               qk_rope_head_dim=64, v_head_dim=128, vocab_size=1024, first_k_dense_replace=1)
V2_LITE_MOE_LAYERS = 26


def v2_lite_experts_per_token(work: str, rounds: int, gemv_rate: float) -> dict:
    """One V2-Lite MoE layer (router, routed and shared experts) forwarding one token, FP8 and bf16 weights,
    and the same times V2-Lite's MoE layers: the CPU's share of a decoded token with the experts in CPU
    memory; with the bytes of the weights the token read, per second, against ``gemv_rate``."""
    fp8, bf16 = os.path.join(work, "v2-lite-fp8"), os.path.join(work, "v2-lite-bf16")
    write_fp8_official_checkpoint(fp8, "v2", **V2_LITE)
    conversion.dequantize(fp8, bf16, quiet=True)
    layers = {"fp8, bf16 compute": DeepseekMoEV2ForCausalLM.from_pretrained(fp8, dtype=torch.bfloat16, fp8_compute="dequantize"),
              "bf16": DeepseekMoEV2ForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16)}
    layers = {name: model.model.layers[1].mlp for name, model in layers.items()}
    hidden = torch.randn(1, 1, V2_LITE["hidden_size"], dtype=torch.bfloat16)
    with torch.no_grad():
        times = interleaved({name: (lambda layer=layer: layer(hidden)) for name, layer in layers.items()},
                            rounds=rounds * 4, warmup=2)
    summary = summarise(times, "bf16")
    for name, row in summary.items():
        with torch.no_grad():
            layers[name](hidden)
        row["read_GB"] = read_bytes(layers[name]) / 1e9
        row["bandwidth_to_gemv"] = row["read_GB"] * 1e9 / (row["median_ms"] / 1000) / gemv_rate
        row["per_token_ms_26_layers"] = row["median_ms"] * V2_LITE_MOE_LAYERS
        row["tokens_per_second"] = 1000 / row["per_token_ms_26_layers"]
    print_table(f"one V2-Lite MoE layer, 1 token (x{V2_LITE_MOE_LAYERS} layers per decoded token)", summary)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--decode-tokens", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bf16-up-to", type=int, default=1024,
                        help="compare with the bf16 model up to this many tokens (bf16 GEMMs are slow on CPUs without AMX)")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_fp8.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        fp8, bf16 = os.path.join(work, "fp8"), os.path.join(work, "bf16")
        write_fp8_official_checkpoint(fp8, "v3", num_shards=4, **CONFIG)
        conversion.dequantize(fp8, bf16, quiet=True)

        memory = {"fp8": measure_load(fp8, "bfloat16"), "bf16": measure_load(bf16, "bfloat16")}
        ratio = memory["fp8"]["weight_bytes"] / memory["bf16"]["weight_bytes"]
        rss_ratio = memory["fp8"]["rss_growth_bytes"] / memory["bf16"]["rss_growth_bytes"]
        print(f"weights: FP8 {memory['fp8']['weight_bytes'] / 1e9:.3f} GB, bf16 {memory['bf16']['weight_bytes'] / 1e9:.3f} GB"
              f" -> {ratio:.3f} (goal <= 0.55); resident memory growth: {rss_ratio:.3f}")

        models = {
            "fp32 (dequantized copy)": DeepseekMoEV3ForCausalLM.from_pretrained(bf16, dtype=torch.float32),
            "fp8, fp32 compute": DeepseekMoEV3ForCausalLM.from_pretrained(fp8, dtype=torch.float32, fp8_compute="dequantize"),
            "bf16 (dequantized copy)": DeepseekMoEV3ForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16),
            "fp8, bf16 compute": DeepseekMoEV3ForCausalLM.from_pretrained(fp8, dtype=torch.bfloat16, fp8_compute="dequantize"),
        }
        results = {"config": CONFIG, "memory": memory, "weight_ratio": ratio, "rss_ratio": rss_ratio, "forward": {}}
        results["decode"] = decode_rows(models, args.decode_tokens, args.rounds)
        results["v2_lite_moe_layer"] = v2_lite_experts_per_token(work, args.rounds, results["decode"]["gemv_bytes_per_second"])
        for tokens in args.tokens:
            ids = torch.randint(0, CONFIG["vocab_size"], (1, tokens))

            def forward(model):
                def prefill():
                    with torch.no_grad():
                        return model(ids, use_cache=False)
                return prefill

            pairs = [("fp32 (dequantized copy)", "fp8, fp32 compute")]
            if tokens <= args.bf16_up_to:
                pairs.append(("bf16 (dequantized copy)", "fp8, bf16 compute"))
            for reference, candidate in pairs:
                times = interleaved({name: forward(models[name]) for name in (reference, candidate)}, rounds=args.rounds, warmup=1)
                summary = summarise(times, reference)
                per_expert = tokens * CONFIG["num_experts_per_tok"] / CONFIG["n_routed_experts"]
                print_table(f"{tokens} tokens ({per_expert:.0f} per routed expert)", summary)
                results["forward"][f"{tokens} tokens, {reference}"] = summary
        write_json(args.json, results)


if __name__ == "__main__":
    main()
