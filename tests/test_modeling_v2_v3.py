"""V2 and V3 against transformers' native DeepseekV2ForCausalLM / DeepseekV3ForCausalLM on the same
official-layout checkpoint: logits (fp32 relative error < 1e-5), greedy generation, padding, cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

from modeling_deepseek_moe.compat import output_cache
from modeling_deepseek_moe import DeepseekMoEV2ForCausalLM, DeepseekMoEV3ForCausalLM

from conftest import relative_error

FAMILIES = {"v2": (DeepseekMoEV2ForCausalLM, DeepseekV2ForCausalLM), "v3": (DeepseekMoEV3ForCausalLM, DeepseekV3ForCausalLM)}


def shift_biases(amount):
    def edit(state):
        for key in state:
            if key.endswith("e_score_correction_bias"):
                state[key] += amount
    return edit


CASES = {
    "v2-group-limited-q-lora": ("v2", {}, None),
    "v2-lite-greedy-no-q-lora": ("v2", {"q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0}, None),
    "v2-released-gready-spelling": ("v2", {"topk_method": "gready", "n_group": 1, "topk_group": 1}, None),
    "v3-negative-biases": ("v3", {}, shift_biases(-1.0)),
    "v3-positive-biases": ("v3", {}, shift_biases(+1.0)),
    "v3-mixed-biases-one-group": ("v3", {"topk_group": 1}, None),
    "v3-no-yarn": ("v3", {"rope_scaling": None, "max_position_embeddings": 4096}, None),
}


def load_pair(official_checkpoint, family, overrides, edit, attn="sdpa"):
    directory, _, _ = official_checkpoint(family, edit_state=edit, **overrides)
    ours_class, native_class = FAMILIES[family]
    ours = ours_class.from_pretrained(directory, dtype=torch.float32, attn_implementation=attn)
    # transformers' native V2 does not know the released "gready" spelling (it crashes on it).
    native_fixes = {"topk_method": "greedy"} if overrides.get("topk_method") == "gready" else {}
    native = native_class.from_pretrained(directory, dtype=torch.float32, attn_implementation=attn, **native_fixes)
    return ours, native


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_native(official_checkpoint, case):
    family, overrides, edit = CASES[case]
    ours, native = load_pair(official_checkpoint, family, overrides, edit)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(ours(ids).logits, native(ids).logits) < 1e-5


@pytest.mark.parametrize("family", ["v2", "v3"])
def test_greedy_generation_equals_native(official_checkpoint, family):
    ours, native = load_pair(official_checkpoint, family, {}, None)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    kwargs = dict(max_new_tokens=12, do_sample=False, attention_mask=mask, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), native.generate(ids, **kwargs))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batch_equals_native(official_checkpoint, attn):
    ours, native = load_pair(official_checkpoint, "v3", {}, None, attn=attn)
    ids = torch.randint(2, 256, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    with torch.no_grad():
        ours_logits = ours(ids, attention_mask=mask).logits
        native_logits = native(ids, attention_mask=mask).logits
    real = mask.bool()
    assert relative_error(ours_logits[real], native_logits[real]) < 1e-5
    kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=mask, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), native.generate(ids, **kwargs))


def test_eager_equals_sdpa(official_checkpoint):
    directory, _, _ = official_checkpoint("v2")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = DeepseekMoEV2ForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")(ids).logits
        sdpa = DeepseekMoEV2ForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")(ids).logits
    assert relative_error(eager, sdpa) < 1e-5


def test_mla_cache_holds_the_compressed_latent(official_checkpoint):
    directory, config, _ = official_checkpoint("v3")
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 9))
    cache = output_cache(model(ids, use_cache=True))
    for layer in range(config["num_hidden_layers"]):
        latent, rope = cache.layers[layer].keys, cache.layers[layer].values
        assert latent.shape == (2, 1, 9, config["kv_lora_rank"])
        assert rope.shape == (2, 1, 9, config["qk_rope_head_dim"])


def test_incremental_decoding_equals_full_forward(official_checkpoint):
    directory, _, _ = official_checkpoint("v2")
    model = DeepseekMoEV2ForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids).logits
        prefix = model(ids[:, :8], use_cache=True)
        cache, steps = output_cache(prefix), [prefix.logits]
        for position in range(8, 12):
            out = model(ids[:, position : position + 1], cache=cache, use_cache=True)
            cache = output_cache(out)
            steps.append(out.logits)
    assert relative_error(torch.cat(steps, dim=1), full) < 1e-5
