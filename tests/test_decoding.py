"""Absorbed MLA attention (kv_b_proj folded into queries and outputs) against the expanded form."""

from __future__ import annotations

import pytest
import torch

from modeling_deepseek_moe import attention
from modeling_deepseek_moe.compat import output_cache
from modeling_deepseek_moe import DeepseekMoEV2ForCausalLM, DeepseekMoEV3ForCausalLM

from conftest import relative_error, rss_growth_mb

CLASSES = {"v2": DeepseekMoEV2ForCausalLM, "v3": DeepseekMoEV3ForCausalLM}


def pair(official_checkpoint, family, attn, **overrides):
    directory, _, _ = official_checkpoint(family, **overrides)
    load = lambda mode: CLASSES[family].from_pretrained(directory, dtype=torch.float32, attn_implementation=attn, mla_absorb=mode)  # noqa: E731
    return load("decode"), load("never")


@pytest.mark.parametrize("family, attn", [("v3", "sdpa"), ("v3", "eager"), ("v2", "sdpa")])
def test_absorbed_decoding_equals_expanded_over_33_steps_with_padding(official_checkpoint, family, attn):
    absorbed, expanded = pair(official_checkpoint, family, attn)
    ids = torch.randint(2, 256, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    kwargs = dict(max_new_tokens=33, do_sample=False, attention_mask=mask, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    fast, slow = absorbed.generate(ids, **kwargs), expanded.generate(ids, **kwargs)
    assert torch.equal(fast.sequences, slow.sequences)
    assert relative_error(torch.stack(fast.logits), torch.stack(slow.logits)) < 1e-5


def test_absorbed_prefill_and_multi_token_steps_equal_expanded(official_checkpoint):
    directory, _, _ = official_checkpoint("v2", q_lora_rank=None)
    always = DeepseekMoEV2ForCausalLM.from_pretrained(directory, dtype=torch.float32, mla_absorb="always")
    never = DeepseekMoEV2ForCausalLM.from_pretrained(directory, dtype=torch.float32, mla_absorb="never")
    ids = torch.randint(0, 256, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(always(ids).logits, never(ids).logits) < 1e-5
        cache_a = output_cache(always(ids[:, :10], use_cache=True))
        cache_n = output_cache(never(ids[:, :10], use_cache=True))
        step_a = always(ids[:, 10:], cache=cache_a).logits  # 4 new tokens over a cache
        step_n = never(ids[:, 10:], cache=cache_n).logits
    assert relative_error(step_a, step_n) < 1e-5


def test_decode_mode_leaves_training_and_prefill_expanded(official_checkpoint):
    model = DeepseekMoEV3ForCausalLM.from_pretrained(official_checkpoint("v3")[0], dtype=torch.float32)
    attention = model.model.layers[0].self_attn
    assert attention.absorbs(new_tokens=1, total_tokens=100)
    assert not attention.absorbs(new_tokens=50, total_tokens=50)  # prefill
    model.train()
    assert not attention.absorbs(new_tokens=1, total_tokens=100)


def test_half_precision_absorbed_decoding_pads_the_cache_without_changing_results(official_checkpoint, monkeypatch):
    """bf16 decoding on the CPU through torch's products (no decode kernel) attends over the cached latent padded to
    a bucketed length: the same tokens and logits (within bf16 rounding) as over the cache as it is, across several
    bucket boundaries."""
    for product in ("shared_rows_product", "absorbed_scores"):  # the kernel needs no room
        monkeypatch.setattr(attention, product, lambda *args, **kwargs: None)
    directory, _, _ = official_checkpoint("v3")
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, mla_absorb="decode")
    ids = torch.randint(2, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=40, do_sample=False, return_dict_in_generate=True, output_logits=True)
    padded = model.generate(ids, **kwargs)
    lengths = []
    monkeypatch.setattr(attention, "cache_with_room", lambda cached: lengths.append(cached.shape[2]) or cached)
    plain = model.generate(ids, **kwargs)
    assert sorted(set(lengths)) == list(range(10, 49))  # 39 lengths without room (the prefill is expanded)
    assert len(lengths) == 2 * 39 * model.config.num_hidden_layers  # each step pads the latent once, the RoPE keys once
    assert torch.equal(padded.sequences, plain.sequences)
    assert relative_error(torch.stack(padded.logits).float(), torch.stack(plain.logits).float()) < 1e-2


def test_half_precision_absorbed_decoding_over_new_lengths_keeps_memory_flat():
    """oneDNN compiles a primitive per operand shape and keeps it (up to 1024): the absorbed products over
    the cache's length made new ones at every decoding step (RSS +160 MB over these 96 lengths, measured). torch's
    products, as without the decode kernel (which compiles nothing per length)."""
    script = """
import os
os.environ["DEEPSEEK_MOE_FP8_KERNEL"] = "0"
import torch
from modeling_deepseek_moe import DeepseekMoEV3Config, DeepseekMoEV3ForCausalLM
from modeling_deepseek_moe.synthetic import tiny_official_config
config = DeepseekMoEV3Config(**tiny_official_config("v3", num_hidden_layers=1, first_k_dense_replace=1))
attention = DeepseekMoEV3ForCausalLM(config).model.layers[0].self_attn.to(torch.bfloat16)
def step(total):
    heads, latent_dim, rope, nope = attention.num_heads, attention.kv_lora_rank, attention.qk_rope_head_dim, attention.qk_nope_head_dim
    with torch.no_grad():
        attention.absorbed_attention(torch.randn(1, heads, 1, nope).bfloat16(), torch.randn(1, heads, 1, rope).bfloat16(),
                                     torch.randn(1, 1, total, latent_dim).bfloat16(), torch.randn(1, 1, total, rope).bfloat16(), None, None)
"""
    assert rss_growth_mb(script, warm=range(256, 264), measured=range(264, 360)) < 40
