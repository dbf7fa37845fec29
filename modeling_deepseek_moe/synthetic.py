"""Tiny random checkpoints in DeepSeek's official on-disk layout, for examples, tests and benchmarks.

The layout is written from DeepSeek's schema alone (config.json as released, per-expert tensor names,
sharded safetensors with an index), independently of this package's modules, so loading one is a real
test of the loader. Each folder also carries a small tokenizer (a byte-level BPE trained on the package's
corpus, sized to the tiny vocabulary, with DeepSeek's special tokens), so that ``AutoTokenizer``,
``pipeline("text-generation")`` and fine-tuning work on text.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerFast

from .layout import official_tensor_shapes
from .fp8 import FP8_QUANTIZATION_CONFIG, quantize_tensors

# A small English text about these models (what the tiny tokenizer is trained on and examples train on).
CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "moe_notes.txt")
# DeepSeek's special tokens (its releases' tokenizer_config.json), and a padding token for batches.
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"

# Small configs in DeepSeek's own schema, one per released family.
TINY_OFFICIAL_CONFIGS: dict[str, dict[str, Any]] = {
    "v1": {
        "model_type": "deepseek",
        "architectures": ["DeepseekForCausalLM"],
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 160,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_shared_experts": 2,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "rope_scaling": None,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    },
    "v2": {
        "model_type": "deepseek_v2",
        "architectures": ["DeepseekV2ForCausalLM"],
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 160,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_shared_experts": 2,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "group_limited_greedy",
        "routed_scaling_factor": 16.0,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "kv_lora_rank": 32,
        "q_lora_rank": 48,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "hidden_act": "silu",
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096,
        },
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    },
    "v3": {
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 160,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_shared_experts": 1,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "kv_lora_rank": 32,
        "q_lora_rank": 48,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "ep_size": 1,
        "num_nextn_predict_layers": 1,
        "hidden_act": "silu",
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
        },
        "attention_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    },
}


# Overrides of TINY_OFFICIAL_CONFIGS that make every projection's input width whole 64-value blocks, as in
# DeepSeek's released models: bitsandbytes 0.50's 4-bit CPU kernel misplaces block scales otherwise.
WHOLE_BLOCK_WIDTHS: dict[str, dict[str, int]] = {
    "v1": {"intermediate_size": 128, "moe_intermediate_size": 64},
    "v2": {"intermediate_size": 128, "moe_intermediate_size": 64, "kv_lora_rank": 64, "q_lora_rank": 64},
    "v3": {"intermediate_size": 128, "moe_intermediate_size": 64, "kv_lora_rank": 64, "q_lora_rank": 64},
}


def tiny_official_config(family: str, **overrides: Any) -> dict[str, Any]:
    """A copy of ``TINY_OFFICIAL_CONFIGS[family]`` ("v1", "v2", "v3") with ``overrides`` applied."""
    config = json.loads(json.dumps(TINY_OFFICIAL_CONFIGS[family]))
    config.update(overrides)
    return config


def tiny_tokenizer(config: dict[str, Any]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on :data:`CORPUS` with ``config["vocab_size"]`` tokens (at least
    256 bytes + 3 special tokens), DeepSeek's beginning/end-of-sentence tokens at the config's
    ``bos_token_id`` / ``eos_token_id`` and a padding token after them; it adds the BOS token, as
    DeepSeek's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bos, eos = config["bos_token_id"], config["eos_token_id"]
    names = {bos: BOS_TOKEN, eos: EOS_TOKEN}  # special tokens first, at their ids; then padding
    specials = [names.get(i, f"<｜▁unused{i}▁｜>") for i in range(max(bos, eos) + 1)] + [PAD_TOKEN]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config["vocab_size"], special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(CORPUS, encoding="utf-8") as handle:
        tokenizer.train_from_iterator(handle.read().splitlines(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN)


def random_official_state(config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights for every official tensor. Norms near 1, router weights large enough to route
    tokens diversely, V3 correction biases of both signs (float32, as DeepSeek stores them)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_tensor_shapes(config).items():
        if key.endswith("norm.weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif key.endswith("e_score_correction_bias"):
            state[key] = 0.2 * torch.randn(shape, generator=generator)
            continue
        elif key.endswith("mlp.gate.weight"):
            tensor = 0.5 * torch.randn(shape, generator=generator)
        else:
            tensor = torch.randn(shape, generator=generator) / shape[-1] ** 0.5
        state[key] = tensor.to(dtype)
    layers = config["num_hidden_layers"]
    for depth in range(config.get("num_nextn_predict_layers", 0)):  # DeepSeek stores copies of these
        state[f"model.layers.{layers + depth}.embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
        state[f"model.layers.{layers + depth}.shared_head.head.weight"] = state["lm_head.weight"].clone()
    return state


def write_official_checkpoint(
    directory: str | os.PathLike,
    config: dict[str, Any],
    state: dict[str, torch.Tensor] | None = None,
    num_shards: int = 2,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Write ``config.json``, ``state`` (random if None) as ``num_shards`` safetensors files with
    ``model.safetensors.index.json``, as DeepSeek's releases are laid out, and the tiny tokenizer. Returns
    the state."""
    os.makedirs(directory, exist_ok=True)
    if state is None:
        state = random_official_state(config, seed=seed)
    keys = list(state)
    per_shard = -(-len(keys) // num_shards)
    weight_map = {}
    for shard in range(num_shards):
        name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {key: state[key].contiguous() for key in keys[shard * per_shard : (shard + 1) * per_shard]}
        save_file(part, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    tiny_tokenizer(config).save_pretrained(directory)
    return state


def write_fp8_official_checkpoint(
    directory: str | os.PathLike, family: str = "v3", num_shards: int = 3, seed: int = 0, scale_fmt: str = "float",
    **overrides: Any,
) -> dict[str, Any]:
    """A tiny checkpoint laid out as DeepSeek releases V3: block-wise FP8 weights with ``weight_scale_inv``
    (``scale_fmt`` "ue8m0" as V3.1), bf16 elsewhere, float32 router bias, ``quantization_config`` in
    config.json. Any family (the format is generic). Returns the config."""
    quantization = dict(FP8_QUANTIZATION_CONFIG, **({"scale_fmt": "ue8m0"} if scale_fmt == "ue8m0" else {}))
    config = tiny_official_config(family, quantization_config=quantization, torch_dtype="bfloat16", **overrides)
    state = random_official_state(config, seed=seed, dtype=torch.bfloat16)
    state = {k: v.float() if k.endswith("e_score_correction_bias") else v for k, v in state.items()}
    write_official_checkpoint(directory, config, state=quantize_tensors(state, scale_fmt), num_shards=num_shards)
    return config
