"""DeepSeekMoE (V1) against a float64 reference written from the released semantics: Llama MHA with
rotate_half RoPE, softmax gate in the model dtype, greedy top-k, shared experts, dense first layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from modeling_deepseek_moe import DeepseekMoEV1ForCausalLM

from conftest import relative_error


def rms(x, weight, eps=1e-6):
    """DeepSeek's RMSNorm normalises in float32 whatever the model dtype."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def swiglu(x, prefix, state):
    return F.silu(x @ state[prefix + "gate_proj.weight"].T) * (x @ state[prefix + "up_proj.weight"].T) @ state[prefix + "down_proj.weight"].T


def reference_logits(state, config, ids):
    state = {key: value.double() for key, value in state.items()}
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = hidden // heads
    batch, seq = ids.shape
    # DeepSeek's rotary tables are float32 (inv_freq, positions, cos/sin), cast to the model dtype after.
    inv_freq = 1.0 / (config["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat((freqs, freqs), -1).cos().double(), torch.cat((freqs, freqs), -1).sin().double()
    causal = torch.full((seq, seq), float("-inf"), dtype=torch.float64).triu(1)
    x = state["model.embed_tokens.weight"][ids]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms(x, state[p + "input_layernorm.weight"])
        q, k, v = (
            (h @ state[p + f"self_attn.{n}_proj.weight"].T).view(batch, seq, heads, head_dim).transpose(1, 2)
            for n in "qkv"
        )
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # Attention probabilities in float32, as DeepSeek's (and transformers' eager) attention computes them.
        attn = ((q @ k.transpose(-1, -2)) / head_dim**0.5 + causal).softmax(-1, dtype=torch.float32).double() @ v
        x = x + attn.transpose(1, 2).reshape(batch, seq, hidden) @ state[p + "self_attn.o_proj.weight"].T
        h = rms(x, state[p + "post_attention_layernorm.weight"])
        if layer < config["first_k_dense_replace"]:
            x = x + swiglu(h, p + "mlp.", state)
            continue
        scores = (h @ state[p + "mlp.gate.weight"].T).softmax(-1)
        weights, experts = scores.topk(config["num_experts_per_tok"], dim=-1)
        if config["num_experts_per_tok"] > 1 and config["norm_topk_prob"]:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        routed = torch.zeros_like(h)
        for b in range(batch):
            for t in range(seq):
                for w, e in zip(weights[b, t], experts[b, t]):
                    routed[b, t] += w * swiglu(h[b, t], p + f"mlp.experts.{e}.", state)
        x = x + routed + swiglu(h, p + "mlp.shared_experts.", state)
    return rms(x, state["model.norm.weight"]) @ state["lm_head.weight"].T


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_logits_equal_float64_reference(official_checkpoint, norm_topk_prob):
    directory, config, state = official_checkpoint("v1", norm_topk_prob=norm_topk_prob)
    model = DeepseekMoEV1ForCausalLM.from_pretrained(directory, dtype=torch.float64, attn_implementation="eager")
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(model(ids).logits, reference_logits(state, config, ids)) < 1e-10


def test_float32_sdpa_close_to_reference(official_checkpoint):
    directory, config, state = official_checkpoint("v1")
    model = DeepseekMoEV1ForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(model(ids).logits, reference_logits(state, config, ids)) < 1e-5


def test_official_deepseek_model_type_loads_through_auto_class(official_checkpoint):
    directory, config, _ = official_checkpoint("v1")
    assert config["model_type"] == "deepseek"  # unknown to transformers without this package
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert type(model) is DeepseekMoEV1ForCausalLM


def test_kv_cache_decoding_equals_full_forward(official_checkpoint):
    directory, _, _ = official_checkpoint("v1")
    model = DeepseekMoEV1ForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.no_grad():
        logits = model(generated).logits
    assert torch.equal(logits[:, 4:-1].argmax(-1), generated[:, 5:])
