"""A training step (forward + backward + AdamW step) of a small DeepSeek-V3 model on this CPU, with
DeepSeek's load balancing (sequence-wise aux loss, bias update after every step, router statistics)
and without (aux_loss_alpha = 0, bias_update_speed = 0). Interleaved rounds, medians of per-round ratios.

    python benchmarks/bench_train.py [--rounds 15] [--json benchmarks/results/bench_train.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved, print_table, summarise, write_json  # noqa: E402

from modeling_deepseek_moe import DeepseekMoEV3ForCausalLM  # noqa: E402
from modeling_deepseek_moe.synthetic import tiny_official_config, write_official_checkpoint  # noqa: E402

MODEL = dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=4,
             n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, num_attention_heads=8,
             q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
             num_nextn_predict_layers=0, vocab_size=2048)


def make_step(directory: str, balanced: bool):
    overrides = {} if balanced else {"aux_loss_alpha": 0.0, "bias_update_speed": 0.0}
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32, **overrides).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, MODEL["vocab_size"], (4, 256), generator=torch.Generator().manual_seed(0))

    def step():
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", default="benchmarks/results/bench_train.json")
    args = parser.parse_args()
    directory = tempfile.mkdtemp()
    write_official_checkpoint(directory, tiny_official_config("v3", **MODEL), num_shards=1)
    times = interleaved(
        {"without load balancing": make_step(directory, False), "with load balancing": make_step(directory, True)},
        args.rounds,
    )
    summary = summarise(times, "without load balancing")
    print(f"model: {MODEL}, batch 4 x 256 tokens, fp32, AdamW")
    print_table("training step", summary)
    overhead = summary["with load balancing"]["ratio_to_without load balancing"] - 1
    print(f"load-balancing overhead: {100 * overhead:.1f}% of step time")
    write_json(args.json, {"benchmark": "bench_train", "model": MODEL, "results": summary, "overhead": overhead})


if __name__ == "__main__":
    main()
