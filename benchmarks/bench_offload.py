"""Routed experts in CPU memory (as llama.cpp's ``--cpu-moe``) against the whole model on one GPU: prefill
and decode throughput of a DeepSeek-V3-layout model loaded twice from the same checkpoint, with
``expert_device_map(config, ["cuda:0"], offload_experts="cpu")`` and with ``device_map={"": "cuda:0"}``,
timed interleaved round by round. Needs a CUDA GPU; ``--device cpu`` runs the same code with both
placements on the CPU (a check of the script, not a measurement).

    python benchmarks/bench_offload.py [--prompt 512] [--new-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved, print_table, summarise, write_json  # noqa: E402

from modeling_deepseek_moe import DeepseekMoEV3Config, DeepseekMoEV3ForCausalLM  # noqa: E402
from modeling_deepseek_moe.placement import expert_device_map, placement_summary  # noqa: E402
from modeling_deepseek_moe.synthetic import random_official_state, tiny_official_config, write_official_checkpoint  # noqa: E402

# DeepSeek-V2-Lite's widths (hidden 2048, 64 experts of 1408, 2 shared), 4 layers, bf16: ~2.4 GB.
CONFIG = dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=4,
              n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, n_shared_experts=2,
              num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
              qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=32000,
              first_k_dense_replace=1, num_nextn_predict_layers=0, torch_dtype="bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--prompt", type=int, default=512, help="prefill length")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens after a 16-token prompt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_offload.json"))
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_offload needs a CUDA GPU (or --device cpu to check the script)")
    with tempfile.TemporaryDirectory() as directory:
        official = tiny_official_config("v3", **CONFIG)
        write_official_checkpoint(directory, official, state=random_official_state(official, dtype=torch.bfloat16), num_shards=4)
        config = DeepseekMoEV3Config.from_pretrained(directory)
        offloaded_map = expert_device_map(config, [args.device], offload_experts="cpu")
        print(placement_summary(offloaded_map, config))
        models = {
            "all on the GPU": DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map={"": args.device}),
            "routed experts in CPU memory": DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map=offloaded_map),
        }
    generator = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(0, CONFIG["vocab_size"], (1, args.prompt), generator=generator).to(args.device)
    prompt = torch.randint(0, CONFIG["vocab_size"], (1, 16), generator=generator).to(args.device)

    def prefill(model):
        return lambda: model(prefill_ids, use_cache=False)

    def decode(model):
        return lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=False)

    results = {"config": CONFIG, "device": args.device, "placement": {k: str(v) for k, v in offloaded_map.items()}}
    with torch.no_grad():
        for phase, make, tokens in (("prefill", prefill, args.prompt), ("decode", decode, args.new_tokens)):
            times = interleaved({name: make(model) for name, model in models.items()}, args.rounds, warmup=1)
            summary = summarise(times, "all on the GPU")
            for name, row in summary.items():
                row["tokens_per_s"] = tokens / (row["median_ms"] / 1000)
            print_table(f"{phase}: {tokens} tokens", summary)
            results[phase] = summary
    write_json(args.json, results)


if __name__ == "__main__":
    main()
