"""Peak memory of one LoRA training step (forward + backward + AdamW step) on a DeepSeek-V3-style model
with 64 routed experts: LoRA on attention only, vs LoRA also on the routed experts through PEFT's
``target_parameters`` (``ParamWrapper``) or through this package's ``ExpertChunkLora``, the last also on the
same model's FP8 checkpoint (frozen block-wise FP8 weights). Each candidate runs in a fresh process; the
figure is the growth of peak RSS over the process's RSS before the step.

    python benchmarks/bench_lora_memory.py [--json benchmarks/results/bench_lora_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

CANDIDATES = {
    "attention only": dict(target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]),
    "attention + routed experts (PEFT target_parameters)": dict(
        target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
        target_parameters=["gate_up_proj", "down_proj"],
    ),
    "attention + routed experts (ExpertChunkLora)": "lora_config",
    # The same model with DeepSeek-V3's block-wise FP8 weights (frozen; float32 compute and adapters).
    "FP8 base: attention + routed experts (ExpertChunkLora)": "lora_config",
}
FP8_BASE = {"FP8 base: attention + routed experts (ExpertChunkLora)"}
MODEL = dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=3,
             n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, num_attention_heads=8,
             q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
             num_nextn_predict_layers=0)


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_step(candidate: str, directory: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from modeling_deepseek_moe import DeepseekMoEV3ForCausalLM

    from modeling_deepseek_moe.lora import lora_config

    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32).train()
    if CANDIDATES[candidate] == "lora_config":
        config = lora_config(targets=("attention", "experts"), r=8, lora_alpha=16)
    else:
        config = LoraConfig(r=8, lora_alpha=16, **CANDIDATES[candidate])
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(0))
    before = rss_peak_mb()
    import gc

    gc.collect()
    baseline = _current_rss_mb()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    return {"step_peak_growth_mb": rss_peak_mb() - baseline, "rss_before_mb": baseline, "peak_before_mb": before}


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="benchmarks/results/bench_lora_memory.json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(*args.child)))
        return
    from modeling_deepseek_moe.synthetic import tiny_official_config, write_fp8_official_checkpoint, write_official_checkpoint

    directory, fp8_directory = tempfile.mkdtemp(), tempfile.mkdtemp()
    write_official_checkpoint(directory, tiny_official_config("v3", **MODEL), num_shards=1)
    write_fp8_official_checkpoint(fp8_directory, "v3", **MODEL)
    results = {}
    for candidate in CANDIDATES:
        source = fp8_directory if candidate in FP8_BASE else directory
        output = subprocess.run([sys.executable, __file__, "--child", candidate, source], capture_output=True, text=True, check=True)
        results[candidate] = json.loads(output.stdout.strip().splitlines()[-1])
    reference = results["attention only"]["step_peak_growth_mb"]
    print(f"model: {MODEL}, batch 4 x 256 tokens, LoRA r=8, fp32")
    print(f"{'candidate':<60}{'step peak growth (MB)':>24}{'ratio':>10}")
    for name, row in results.items():
        row["ratio_to_attention_only"] = row["step_peak_growth_mb"] / reference
        print(f"{name:<60}{row['step_peak_growth_mb']:>24.1f}{row['ratio_to_attention_only']:>10.2f}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from timing import write_json

    write_json(args.json, {"benchmark": "bench_lora_memory", "model": MODEL, "results": results})


if __name__ == "__main__":
    main()
