"""Balance losses and token dropping against direct computations of the papers' formulas and of
DeepSeek's released gate code."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modeling_deepseek_moe import DeepseekMoEV1Config, DeepseekMoEV1ForCausalLM, DeepseekMoEV2Config, DeepseekMoEV3Config
from modeling_deepseek_moe import load_balancing as lb
from modeling_deepseek_moe.moe import MoEBlock

BATCH, SEQ, EXPERTS, TOP_K = 3, 7, 16, 4


def random_routing(seed=0, groups=None, kept_groups=None):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(BATCH, SEQ, EXPERTS, generator=generator).softmax(-1)
    indices = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(BATCH * SEQ)])
    return scores, indices.view(BATCH, SEQ, TOP_K)


def official_seq_aux(scores, indices, alpha):
    """DeepSeek-V2's MoEGate, seq_aux branch, as released."""
    bsz, seq_len, n = scores.shape
    ce = torch.zeros(bsz, n)
    ce.scatter_add_(1, indices.view(bsz, -1), torch.ones(bsz, seq_len * TOP_K)).div_(seq_len * TOP_K / n)
    return (ce * scores.mean(dim=1)).sum(dim=1).mean() * alpha


def official_batch_aux(scores, indices, alpha):
    """DeepSeek-V2's MoEGate, batch branch, as released."""
    n = scores.shape[-1]
    ce = F.one_hot(indices.reshape(-1), num_classes=n).float().mean(0)
    return (scores.reshape(-1, n).mean(0) * ce * n).sum() * alpha


def test_expert_loss_per_sequence_equals_official_code():
    scores, indices = random_routing()
    assert lb.expert_balance_loss(scores, indices, 0.001).item() == pytest.approx(official_seq_aux(scores, indices, 0.001).item(), rel=1e-6)


def test_expert_loss_batch_level_equals_official_code():
    scores, indices = random_routing(1)
    flat_scores, flat_indices = scores.view(1, -1, EXPERTS), indices.view(1, -1, TOP_K)
    assert lb.expert_balance_loss(flat_scores, flat_indices, 0.003).item() == pytest.approx(official_batch_aux(scores, indices, 0.003).item(), rel=1e-6)


def direct_device_terms(scores, indices, devices, b):
    per_device = EXPERTS // devices
    counts = torch.bincount(indices[b].reshape(-1), minlength=EXPERTS).float()
    f = EXPERTS / (TOP_K * SEQ) * counts
    p = scores[b].mean(0)
    return f, p, per_device


def test_device_loss_equals_paper_formula():
    scores, indices = random_routing(2)
    devices, alpha = 4, 0.05
    expected = 0.0
    for b in range(BATCH):
        f, p, per_device = direct_device_terms(scores, indices, devices, b)
        expected += sum(f[d * per_device : (d + 1) * per_device].mean() * p[d * per_device : (d + 1) * per_device].sum() for d in range(devices))
    expected = alpha * expected / BATCH
    assert lb.device_balance_loss(scores, indices, devices, alpha).item() == pytest.approx(float(expected), rel=1e-6)


def test_communication_loss_equals_paper_formula():
    scores, indices = random_routing(3)
    devices, per_token, alpha = 4, 2, 0.02
    expected = 0.0
    for b in range(BATCH):
        _, p, per_device = direct_device_terms(scores, indices, devices, b)
        for d in range(devices):
            sent = sum(any(int(e) // per_device == d for e in indices[b, t]) for t in range(SEQ))
            f2 = devices / (per_token * SEQ) * sent
            expected += f2 * p[d * per_device : (d + 1) * per_device].sum()
    expected = alpha * expected / BATCH
    assert lb.communication_balance_loss(scores, indices, devices, per_token, alpha).item() == pytest.approx(float(expected), rel=1e-6)


SMALL = dict(hidden_size=32, moe_intermediate_size=8, n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K, n_shared_experts=1)


def block(config):
    torch.manual_seed(0)
    moe = MoEBlock(config)
    for param in moe.parameters():
        param.data.normal_(0, 0.3)
    return moe.train()


def test_v3_sequence_loss_uses_normalised_sigmoid_scores():
    config = DeepseekMoEV3Config(**SMALL, n_group=4, topk_group=2)
    moe = block(config)
    moe.gate.e_score_correction_bias.normal_(0, 0.1)
    hidden = torch.randn(BATCH, SEQ, 32)
    _, routing = moe(hidden)
    normalised = routing.scores / routing.scores.sum(-1, keepdim=True)
    expected = official_seq_aux(normalised.view(BATCH, SEQ, -1), routing.topk_indices.view(BATCH, SEQ, -1), 1e-4)
    assert config.aux_loss_alpha == 1e-4  # the V3 paper's alpha
    assert lb.balance_loss(routing, config, BATCH).item() == pytest.approx(expected.item(), rel=1e-5)


def test_v2_block_sums_the_enabled_losses():
    config = DeepseekMoEV2Config(**SMALL, n_group=4, topk_group=2, device_aux_loss_alpha=0.05, comm_aux_loss_alpha=0.02, seq_aux=False)
    moe = block(config)
    hidden = torch.randn(BATCH, SEQ, 32)
    _, routing = moe(hidden)
    scores, indices = routing.scores.view(1, -1, EXPERTS), routing.topk_indices.view(1, -1, TOP_K)
    expected = (
        official_batch_aux(routing.scores, routing.topk_indices, 0.001)
        + lb.device_balance_loss(scores, indices, 4, 0.05)
        + lb.communication_balance_loss(scores, indices, 4, 2, 0.02)
    )
    loss = lb.balance_loss(routing, config, BATCH)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.requires_grad


def test_no_loss_in_eval():
    config = DeepseekMoEV1Config(**SMALL, vocab_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, intermediate_size=48)
    model = DeepseekMoEV1ForCausalLM(config)
    ids = torch.randint(0, 64, (2, 5))
    assert model(ids, labels=ids).aux_loss > 0  # built in training mode
    model.eval()
    assert model.model(ids).routings is None and model(ids, labels=ids).aux_loss is None


def test_capacity_keeps_the_highest_affinity_assignments():
    generator = torch.Generator().manual_seed(0)
    tokens, factor = 40, 0.5
    indices = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(tokens)])
    indices[:20, 0] = 3  # overload expert 3
    weights = torch.rand(tokens, TOP_K, generator=generator)
    keep = lb.capacity_keep_mask(indices, weights, EXPERTS, factor)
    capacity = math.ceil(factor * tokens * TOP_K / EXPERTS)
    for expert in range(EXPERTS):
        mine = indices == expert
        kept, dropped = weights[mine & keep], weights[mine & ~keep]
        assert len(kept) == min(capacity, int(mine.sum()))
        if len(dropped):
            assert kept.min() >= dropped.max()


def test_token_dropping_only_in_training():
    config = DeepseekMoEV2Config(**SMALL, topk_method="greedy", capacity_factor=0.25)
    moe = block(config)
    hidden = torch.randn(2, 16, 32)
    moe.eval()
    with torch.no_grad():
        full, _ = moe(hidden)
        reference = DeepseekMoEV2Config(**SMALL, topk_method="greedy")
        undropped = block(reference).eval()
        undropped.load_state_dict(moe.state_dict())
        assert torch.allclose(full, undropped(hidden)[0])
        moe.train()
        assert not torch.allclose(moe(hidden)[0], full)
