"""Peak memory and time of every ``deepseek-moe-convert`` subcommand on a synthetic DeepSeek-V3-layout
checkpoint of more than 4 GB in 8 shards. Each subcommand runs in a fresh process; its peak RSS (whole
process: Python, torch and the conversion) is checked against the bound the conversion issue sets,
2 x the largest shard (source or result) + 1 GiB.

    python benchmarks/bench_convert.py [--work /tmp/bench-convert] [--json benchmarks/results/bench_convert.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

GiB = 2**30
# DeepSeek-V3's layout at a reduced size: ~4.3 GB in bf16 (MoE layers of 64 experts dominate).
CONFIG = dict(hidden_size=2048, intermediate_size=4096, moe_intermediate_size=512, num_hidden_layers=10,
              n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, n_shared_experts=1,
              num_attention_heads=16, num_key_value_heads=16, q_lora_rank=512, kv_lora_rank=256,
              qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, vocab_size=32000,
              num_nextn_predict_layers=1, first_k_dense_replace=1, torch_dtype="bfloat16")
SHARDS = 8
LORA_RANK = 8


def build_source(directory: str) -> None:
    """Write the bf16 checkpoint shard by shard (never the whole model in memory) and a LoRA adapter."""
    import torch
    from modeling_deepseek_moe.layout import official_tensor_shapes
    from modeling_deepseek_moe.safetensors_io import write_safetensors
    from modeling_deepseek_moe.synthetic import tiny_official_config

    config = tiny_official_config("v3", **CONFIG)
    shapes = official_tensor_shapes(config)
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    per_shard, shards, current, size = total / SHARDS, [], [], 0
    for key, shape in shapes.items():
        current.append(key)
        size += torch.Size(shape).numel() * 2
        if size >= per_shard * (len(shards) + 1) and len(shards) < SHARDS - 1:
            shards.append(current)
            current = []
    shards.append(current)
    os.makedirs(directory)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for index, keys in enumerate(shards):
        name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key in keys:
            tensor = torch.randn(shapes[key], generator=generator, dtype=torch.bfloat16) / shapes[key][-1] ** 0.5
            tensors[key] = tensor.float() if key.endswith("e_score_correction_bias") else tensor
        write_safetensors(os.path.join(directory, name), tensors)
        weight_map.update(dict.fromkeys(keys, name))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle)
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)

    adapter = directory + "-adapter"  # LoRA on every q_b_proj and on the routed experts of every MoE layer
    os.makedirs(adapter)
    factors = {}
    experts, hidden, inter = CONFIG["n_routed_experts"], CONFIG["hidden_size"], CONFIG["moe_intermediate_size"]
    for layer in range(CONFIG["num_hidden_layers"]):
        prefix = f"base_model.model.model.layers.{layer}."
        q_b = shapes[f"model.layers.{layer}.self_attn.q_b_proj.weight"]
        factors[prefix + "self_attn.q_b_proj.lora_A.weight"] = torch.randn(LORA_RANK, q_b[1]) * 0.01
        factors[prefix + "self_attn.q_b_proj.lora_B.weight"] = torch.randn(q_b[0], LORA_RANK) * 0.01
        if layer >= CONFIG["first_k_dense_replace"]:
            chunk = prefix + "mlp.experts.chunks.0."
            factors[chunk + "lora_gate_up_A"] = torch.randn(experts, LORA_RANK, hidden) * 0.01
            factors[chunk + "lora_gate_up_B"] = torch.randn(experts, 2 * inter, LORA_RANK) * 0.01
            factors[chunk + "lora_down_A"] = torch.randn(experts, LORA_RANK, inter) * 0.01
            factors[chunk + "lora_down_B"] = torch.randn(experts, hidden, LORA_RANK) * 0.01
    write_safetensors(os.path.join(adapter, "adapter_model.safetensors"), factors)
    with open(os.path.join(adapter, "adapter_config.json"), "w") as handle:
        json.dump({"peft_type": "LORA", "r": LORA_RANK, "lora_alpha": 16}, handle)


RUNNER = """
import json, resource, sys, time
start = time.time()
from deepseek_moe_convert import main
status = main(sys.argv[1:])
print(json.dumps({"status": status, "seconds": time.time() - start,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def largest_shard(directory: str) -> int:
    return max(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))


def run(arguments: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", RUNNER, *arguments, "--quiet"], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's command line
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/bench-convert")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_convert.json"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    path = lambda name: os.path.join(args.work, name)  # noqa: E731
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                    f"import bench_convert; bench_convert.build_source({path('bf16')!r})"], check=True)
    steps = [  # (subcommand, arguments, source, result)
        ("quantize", ["quantize", path("bf16"), path("fp8")], "bf16", "fp8"),
        ("dequantize", ["dequantize", path("fp8"), path("bf16-again")], "fp8", "bf16-again"),
        ("from-official", ["from-official", path("fp8"), path("ours")], "fp8", "ours"),
        ("from-official --dtype bf16", ["from-official", path("fp8"), path("ours-bf16"), "--dtype", "bf16"], "fp8", "ours-bf16"),
        ("to-official", ["to-official", path("ours"), path("official")], "ours", "official"),
        ("to-mp --model-parallel 2", ["to-mp", path("bf16"), path("mp"), "--model-parallel", "2", "--drop-mtp"], "bf16", "mp"),
        ("from-mp", ["from-mp", path("mp"), path("from-mp"), "--config", path("bf16/config.json")], "mp", "from-mp"),
        ("merge-lora (fp8 base)", ["merge-lora", path("fp8"), path("bf16-adapter"), path("merged")], "fp8", "merged"),
        ("verify (fp8 vs bf16)", ["verify", path("fp8"), path("bf16-again")], "fp8", "bf16-again"),
    ]
    rows = []
    print(f"{'subcommand':30s} {'source GB':>9s} {'largest shard MB (src/dst)':>26s} {'peak RSS GB':>11s} {'bound GB':>8s} {'s':>6s}")
    for name, arguments, source, result in steps:
        measured = run(arguments)
        shards = largest_shard(path(source)), largest_shard(path(result))
        shard = max(shards)
        size = sum(os.path.getsize(os.path.join(path(source), f)) for f in os.listdir(path(source)))
        row = dict(subcommand=name, source_bytes=size, largest_source_shard_bytes=shards[0],
                   largest_result_shard_bytes=shards[1], peak_rss_bytes=measured["peak_rss"],
                   bound_bytes=2 * shard + GiB, within_bound=measured["peak_rss"] <= 2 * shard + GiB,
                   seconds=round(measured["seconds"], 1))
        rows.append(row)
        print(f"{name:30s} {size / 1e9:9.2f} {f'{shards[0] / 1e6:.0f} / {shards[1] / 1e6:.0f}':>26s} {row['peak_rss_bytes'] / 1e9:11.2f} "
              f"{row['bound_bytes'] / 1e9:8.2f} {row['seconds']:6.1f}" + ("" if row["within_bound"] else "  OVER"))
        for stale in ("official", "ours-bf16"):  # keep the disk use down
            shutil.rmtree(path(stale), ignore_errors=True)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"config": CONFIG, "shards": SHARDS, "rows": rows, "date": time.strftime("%Y-%m-%d")}, handle, indent=2)
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
