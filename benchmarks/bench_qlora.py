"""QLoRA against LoRA on a DeepSeek-V2-Lite-width model built locally (hidden 2048, 64 routed experts of 1408,
top-6, 2 shared experts, MLA with kv_lora_rank 512 and no q_lora_rank; 2 layers: dense first, then MoE):
resident weight bytes, peak memory and time of one LoRA training step (forward, backward, AdamW step) for

- a bf16 base (this package's classes),
- this package's bitsandbytes nf4 base (double quantization, bf16 compute; routed experts in 4 bits),
- transformers' native ``DeepseekV2ForCausalLM`` with the same ``BitsAndBytesConfig`` (experts stay bf16).

LoRA r=8 on attention, shared experts and routed experts (``ExpertChunkLora`` here, PEFT's
``target_parameters`` on the native class, whose experts are not modules). Each case runs in a fresh
process. Peak memory is the process's RSS high-water mark (``VmHWM``), reset after loading, so it holds the
resident weights plus what the steps add; it is given in full and over the process's RSS once torch,
transformers, PEFT, bitsandbytes and this package are imported (the same for every case). After loading,
glibc is asked to return the pages it kept from the shards' read buffers (``malloc_trim``), in every case,
so that the figure is the model's and not the allocator's leftovers. Every case runs twice: with glibc's
default allocator settings, and with ``MALLOC_MMAP_THRESHOLD_=65536`` (buffers over 64 KiB mapped and
unmapped, as jemalloc and tcmalloc return them): glibc's default keeps the transient dequantized weights
(bitsandbytes' Linear4bit dequantizes each whole weight, 4-45 MB here, in forward and backward) as heap
between the activations. The vocabulary is 4096: embeddings and head stay bf16 under
bitsandbytes, and with V2-Lite's 102400 tokens on 2 layers instead of 27 they would be most of the model.

    python benchmarks/bench_qlora.py [--tokens 128] [--steps 3] [--json benchmarks/results/bench_qlora.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CASES = ("LoRA, bf16 base", "QLoRA, nf4 base (ours)", "QLoRA, transformers DeepseekV2 nf4")
ALLOCATORS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
MODEL = dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=2,
             first_k_dense_replace=1, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
             topk_method="greedy", n_group=1, topk_group=1, num_attention_heads=16, num_key_value_heads=16,
             q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
             vocab_size=4096)
ATTENTION_AND_SHARED = r".*\.(self_attn\.(q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)|shared_experts\.(gate_proj|up_proj|down_proj))$"


def memory_mb(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` of this process, in MB."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> None:
    """Start ``VmHWM`` again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def resident_weight_bytes(model) -> int:
    """Bytes of every parameter and buffer, with bitsandbytes' quantization state of Linear4bit weights."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            tensors[id(state.absmax)] = state.absmax
            if state.nested:
                tensors[id(state.state2.absmax)] = state.state2.absmax
    return sum(t.nbytes for t in tensors.values())


def import_everything() -> None:
    """What any case imports, before the baseline RSS is read."""
    import bitsandbytes.functional  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.deepseek_v2.modeling_deepseek_v2  # noqa: F401

    import modeling_deepseek_moe.lora  # noqa: F401


def return_freed_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back to the OS."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def load(case: str, directory: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from modeling_deepseek_moe import DeepseekMoEV2ForCausalLM

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    if case == "LoRA, bf16 base":
        return DeepseekMoEV2ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    if case == "QLoRA, nf4 base (ours)":
        return DeepseekMoEV2ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, quantization_config=nf4)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, quantization_config=nf4)


def with_adapters(case: str, model):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from modeling_deepseek_moe.lora import lora_config

    if case != "LoRA, bf16 base":  # no gradient checkpointing: every case keeps its activations
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if case == "QLoRA, transformers DeepseekV2 nf4":
        config = LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION_AND_SHARED, target_parameters=["gate_up_proj", "down_proj"])
    else:
        config = lora_config(targets=("attention", "shared", "experts"), r=8, lora_alpha=16)
    return get_peft_model(model, config)


def run_case(case: str, directory: str, tokens: int, steps: int) -> dict:
    import torch

    from timing import time_once

    import_everything()
    before_load = memory_mb("VmRSS")
    model = load(case, directory)
    weights = resident_weight_bytes(model)
    load_peak = memory_mb("VmHWM")
    return_freed_memory()
    model = with_adapters(case, model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, MODEL["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak()
    times = [time_once(step) for _ in range(steps)]  # the first step also allocates AdamW's state
    peak = memory_mb("VmHWM")
    return {"resident_weight_mb": weights / 2**20, "step_peak_rss_mb": peak, "step_peak_over_imports_mb": peak - before_load,
            "load_peak_rss_mb": load_peak, "rss_after_imports_mb": before_load,
            "step_seconds_median": statistics.median(times[1:] or times), "step_seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/bench_qlora.json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.child:
        print(json.dumps(run_case(*args.child, args.tokens, args.steps)))
        return
    import torch

    from modeling_deepseek_moe.synthetic import random_official_state, tiny_official_config, write_official_checkpoint
    from timing import write_json

    results = {}
    with tempfile.TemporaryDirectory() as directory:
        config = tiny_official_config("v2", torch_dtype="bfloat16", **MODEL)
        write_official_checkpoint(directory, config, state=random_official_state(config, dtype=torch.bfloat16), num_shards=8)
        for allocator, environment in ALLOCATORS.items():
            results[allocator] = {}
            for case in CASES:
                done = subprocess.run([sys.executable, __file__, "--child", case, directory, "--tokens", str(args.tokens),
                                       "--steps", str(args.steps)], capture_output=True, text=True,
                                      env={**os.environ, **environment})
                if done.returncode != 0:
                    raise RuntimeError(f"{case}:\n{done.stderr[-3000:]}")
                results[allocator][case] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"V2-Lite width, 2 layers (dense + MoE), vocabulary {MODEL['vocab_size']}; 1 x {args.tokens} tokens, LoRA r=8")
    for allocator, rows in results.items():
        reference = rows["LoRA, bf16 base"]
        print(f"\n{allocator}")
        print(f"{'case':<36}{'weights MB':>12}{'x bf16':>8}{'step peak MB':>14}{'over imports':>14}{'x bf16':>8}{'step s':>9}")
        for case, row in rows.items():
            row["weights_ratio_to_bf16"] = row["resident_weight_mb"] / reference["resident_weight_mb"]
            row["step_peak_ratio_to_bf16"] = row["step_peak_over_imports_mb"] / reference["step_peak_over_imports_mb"]
            print(f"{case:<36}{row['resident_weight_mb']:>12.0f}{row['weights_ratio_to_bf16']:>8.2f}{row['step_peak_rss_mb']:>14.0f}"
                  f"{row['step_peak_over_imports_mb']:>14.0f}{row['step_peak_ratio_to_bf16']:>8.2f}{row['step_seconds_median']:>9.2f}")
    write_json(args.json, {"benchmark": "bench_qlora", "model": MODEL, "tokens": args.tokens, "results": results})


if __name__ == "__main__":
    main()
