"""DeepSeek-V3 multi-token prediction: the module against its formula, the loss, speculative decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_deepseek_moe import DeepseekMoEV3ForCausalLM
from modeling_deepseek_moe.decoder import DeepseekMoEDecoderLayer
from modeling_deepseek_moe.mtp import run_mtp_module

from conftest import relative_error


def load(official_checkpoint, dtype=torch.float64, **overrides):
    directory, _, _ = official_checkpoint("v3")
    return DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="eager", **overrides)


def test_mtp_module_equals_its_formula(official_checkpoint):
    model = load(official_checkpoint)
    base, layer = model.model, model.model.mtp[0]
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = base(ids).last_hidden_state
        actual = run_mtp_module(base, 0, hidden[:, :-1], ids[:, 1:], torch.arange(8).unsqueeze(0))
        # cat(enorm(embedding of t+1), hnorm(h_t)) -> eh_proj -> decoder block -> shared_head.norm
        merged = layer.eh_proj(torch.cat((layer.enorm(base.embed_tokens(ids[:, 1:])), layer.hnorm(hidden[:, :-1])), -1))
        causal = torch.full((8, 8), float("-inf"), dtype=torch.float64).triu(1)[None, None]
        block, _ = DeepseekMoEDecoderLayer.forward(layer, merged, base.rotary_emb(merged, torch.arange(8)[None]), causal)
        expected = layer.shared_head.norm(block)
    assert relative_error(actual, expected) < 1e-12


def test_mtp_loss_is_weighted_cross_entropy_two_tokens_ahead(official_checkpoint):
    model = load(official_checkpoint, mtp_loss_weight=0.3)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, labels=ids)
        hidden = model.model(ids).last_hidden_state
        states = run_mtp_module(model.model, 0, hidden[:, :-1], ids[:, 1:], torch.arange(9).unsqueeze(0))
        logits = model.lm_head(states)[:, :-1]  # position i predicts token i + 2
        expected = 0.3 * F.cross_entropy(logits.reshape(-1, model.config.vocab_size), ids[:, 2:].reshape(-1))
    # transformers' loss function computes in float32 whatever the model dtype
    assert out.mtp_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    main = F.cross_entropy(model.lm_head(hidden)[:, :-1].reshape(-1, model.config.vocab_size), ids[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx(main.item() + expected.item(), rel=1e-6)


def test_mtp_loss_gradient_reaches_the_mtp_weights(official_checkpoint):
    model = load(official_checkpoint, dtype=torch.float32, mtp_loss_weight=0.1).train()
    ids = torch.randint(0, 256, (2, 12))
    out = model(ids, labels=ids)
    out.loss.backward()
    mtp = model.model.mtp[0]
    for param in (mtp.eh_proj.weight, mtp.enorm.weight, mtp.hnorm.weight, mtp.shared_head.norm.weight,
                  mtp.self_attn.kv_b_proj.weight, mtp.mlp.gate.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert out.mtp_loss > 0


def test_no_mtp_loss_unless_weighted(official_checkpoint):
    model = load(official_checkpoint, dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 8))
    assert model(ids, labels=ids).mtp_loss is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_speculative_greedy_equals_plain_greedy(official_checkpoint, seed):
    model = load(official_checkpoint)  # float64: no near-tie flips between 1- and 2-token forwards
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(seed))
    sequence, stats = model.generate_with_mtp(ids, max_new_tokens=24)
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    assert torch.equal(sequence, plain)
    assert stats["drafted"] >= 1 and 0.0 <= stats["acceptance_rate"] <= 1.0
    assert stats["main_forwards"] == 1 + stats["drafted"]


def test_speculative_decoding_accepts_a_perfect_drafter(official_checkpoint):
    """With the drafter replaced by an oracle that knows the greedy continuation, every draft is accepted
    and the main model runs about half as many forwards (the verification logic, not the MTP weights)."""
    model = load(official_checkpoint)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    import modeling_deepseek_moe.mtp as mtp

    oracle = {"sequence": plain[0].tolist()}

    def perfect_draft(causal_lm, hidden, next_tokens, start, cache):
        position = start + hidden.shape[1] + 1  # index of the token to guess
        return torch.tensor([[oracle["sequence"][position]]]) if position < len(oracle["sequence"]) else next_tokens[:, -1:]

    original = mtp._draft
    mtp._draft = perfect_draft
    try:
        sequence, stats = model.generate_with_mtp(ids, max_new_tokens=20)
    finally:
        mtp._draft = original
    assert torch.equal(sequence, plain)
    assert stats["acceptance_rate"] == 1.0 and stats["main_forwards"] <= 11
