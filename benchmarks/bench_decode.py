"""Decoding on this CPU.

1. Absorbed MLA decoding: tokens/s of greedy decode steps over a context of 512, 2048 and 8192 tokens for
   a small DeepSeek-V3 model (V3's attention dims, 16 heads), this package (``mla_absorb="decode"``) vs
   transformers' native ``DeepseekV3ForCausalLM`` on the same weights, interleaved; cache bytes per token.
2. Multi-token prediction: a tiny V3 model trained for a few hundred steps (main + MTP loss) on
   the package's corpus (``modeling_deepseek_moe/data/moe_notes.txt``), then greedy decoding with and without the MTP drafter: acceptance
   rate and speed-up.

    python benchmarks/bench_decode.py [--contexts 512 2048 8192] [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import DeepseekV3ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import write_json  # noqa: E402

from modeling_deepseek_moe.compat import output_cache, with_cache
from modeling_deepseek_moe import DeepseekMoEV3ForCausalLM  # noqa: E402
from modeling_deepseek_moe.synthetic import CORPUS, tiny_official_config, write_official_checkpoint  # noqa: E402

ATTENTION_MODEL = dict(hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=512,
                       qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=16,
                       num_experts_per_tok=4, n_group=4, topk_group=2, vocab_size=4096,
                       num_nextn_predict_layers=0, max_position_embeddings=163840)
TEXT = CORPUS


def decode_steps(model, prompt, steps: int) -> tuple[float, int]:
    """Prefill ``prompt`` once, then time ``steps`` single-token greedy steps; returns (seconds, cache bytes/token)."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, use_cache=True, **with_cache(cache))  # native classes too: the release's name
            token = out.logits[:, -1:].argmax(-1)
        elapsed = time.perf_counter() - start
    tokens = prompt.shape[1] + steps
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return elapsed, cache_bytes // tokens


def absorbed_decoding(contexts: list[int], steps: int, rounds: int) -> list[dict]:
    directory = tempfile.mkdtemp()
    write_official_checkpoint(directory, tiny_official_config("v3", **ATTENTION_MODEL), num_shards=1)
    ours = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32)
    native = DeepseekV3ForCausalLM.from_pretrained(directory, dtype=torch.float32)
    expected_bytes = (ATTENTION_MODEL["kv_lora_rank"] + ATTENTION_MODEL["qk_rope_head_dim"]) * ATTENTION_MODEL["num_hidden_layers"] * 4
    results = []
    print(f"model: {ATTENTION_MODEL}, fp32, {steps} decode steps per measurement, {rounds} interleaved rounds")
    print(f"{'context':>8}{'ours tok/s':>12}{'native tok/s':>14}{'speed-up':>10}{'cache B/token ours':>20}{'native':>8}")
    for context in contexts:
        prompt = torch.randint(0, ATTENTION_MODEL["vocab_size"], (1, context), generator=torch.Generator().manual_seed(context))
        times = {"ours": [], "native": []}
        cache_bytes = {}
        for round_index in range(rounds):
            order = [("ours", ours), ("native", native)][:: 1 if round_index % 2 == 0 else -1]
            for name, model in order:
                seconds, cache_bytes[name] = decode_steps(model, prompt, steps)
                times[name].append(seconds)
        speedup = statistics.median(n / o for n, o in zip(times["native"], times["ours"]))
        row = {
            "context": context,
            "ours_tokens_per_s": steps / statistics.median(times["ours"]),
            "native_tokens_per_s": steps / statistics.median(times["native"]),
            "speedup": speedup,
            "cache_bytes_per_token": cache_bytes,
            "expected_cache_bytes_per_token": expected_bytes,
        }
        results.append(row)
        print(f"{context:>8}{row['ours_tokens_per_s']:>12.2f}{row['native_tokens_per_s']:>14.2f}{speedup:>9.2f}x"
              f"{cache_bytes['ours']:>20}{cache_bytes['native']:>8}")
    print(f"expected cache bytes per token: (kv_lora_rank + qk_rope_head_dim) x layers x 4 = {expected_bytes}")
    return results


def multi_token_prediction(train_steps: int, new_tokens: int) -> dict:
    """Train a tiny V3 (main + MTP loss) on the example text, then compare greedy with and without drafts."""
    data = torch.tensor(list(open(TEXT, "rb").read()), dtype=torch.long)
    directory = tempfile.mkdtemp()
    write_official_checkpoint(directory, tiny_official_config("v3"), num_shards=1)
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32, mtp_loss_weight=0.3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(train_steps):
        starts = torch.randint(0, len(data) - 65, (8,), generator=generator)
        batch = torch.stack([data[s : s + 64] for s in starts])
        out = model(batch, labels=batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    prompts = [data[s : s + 16].unsqueeze(0) for s in (0, 700, 1500, 2600)]
    plain_times, spec_times, accepted, drafted, same = [], [], 0, 0, True
    for prompt in prompts:
        start = time.perf_counter()
        plain = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False)
        plain_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        sequence, stats = model.generate_with_mtp(prompt, max_new_tokens=new_tokens)
        spec_times.append(time.perf_counter() - start)
        same &= torch.equal(sequence, plain)
        accepted += stats["accepted"]
        drafted += stats["drafted"]
    result = {
        "train_steps": train_steps, "final_loss": float(out.loss.detach()), "final_mtp_loss": float(out.mtp_loss.detach()),
        "acceptance_rate": accepted / drafted, "speedup": sum(plain_times) / sum(spec_times),
        "identical_to_greedy": same, "new_tokens_per_prompt": new_tokens, "prompts": len(prompts),
    }
    print(f"\nMTP: trained {train_steps} steps (loss {result['final_loss']:.3f}, MTP loss {result['final_mtp_loss']:.3f}); "
          f"acceptance {result['acceptance_rate']:.2f}, speed-up over plain greedy generate {result['speedup']:.2f}x, "
          f"identical output: {same}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mtp-train-steps", type=int, default=300)
    parser.add_argument("--json", default="benchmarks/results/bench_decode.json")
    args = parser.parse_args()
    absorbed = absorbed_decoding(args.contexts, args.steps, args.rounds)
    mtp = multi_token_prediction(args.mtp_train_steps, 48)
    write_json(args.json, {"benchmark": "bench_decode", "model": ATTENTION_MODEL, "absorbed": absorbed, "mtp": mtp})


if __name__ == "__main__":
    main()
