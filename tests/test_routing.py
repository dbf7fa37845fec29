"""The router against direct per-token transcriptions of DeepSeek's released gates."""

from __future__ import annotations

import math

import pytest
import torch

from modeling_deepseek_moe import DeepseekMoEV1Config, DeepseekMoEV2Config, DeepseekMoEV3Config
from modeling_deepseek_moe.routing import TopKRouter

SMALL = dict(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=8)


def reference_route(scores, bias, config):
    """One token at a time, in float64: (sorted expert ids, weights by id)."""
    decisions = []
    experts = config.n_routed_experts
    for token_scores in scores.double():
        choice = token_scores + (bias.double() if bias is not None else 0)
        allowed = list(range(experts))
        if config.topk_method != "greedy":
            size = experts // config.n_group
            groups = [choice[g * size : (g + 1) * size] for g in range(config.n_group)]
            if config.topk_method == "noaux_tc":
                group_scores = [sorted(g.tolist())[-1] + sorted(g.tolist())[-2] for g in groups]
            else:
                group_scores = [max(g.tolist()) for g in groups]
            kept = sorted(range(config.n_group), key=lambda g: -group_scores[g])[: config.topk_group]
            allowed = [e for e in allowed if e // size in kept]
        chosen = sorted(sorted(allowed, key=lambda e: -choice[e].item())[: config.num_experts_per_tok])
        weights = {e: token_scores[e].item() for e in chosen}
        total = sum(weights.values())
        normalise = config.num_experts_per_tok > 1 and config.norm_topk_prob
        for e in chosen:
            if normalise:
                weights[e] /= total + 1e-20
            if config.topk_method == "noaux_tc" or (not normalise and type(config) is DeepseekMoEV2Config):
                weights[e] *= config.routed_scaling_factor
        decisions.append((chosen, weights))
    return decisions


def check_against_reference(router, config, tokens):
    output = router(tokens)
    expected_scores = output.logits.double().softmax(-1) if config.scoring_func == "softmax" else output.logits.double().sigmoid()
    torch.testing.assert_close(output.scores.double(), expected_scores, rtol=1e-6, atol=1e-7)
    reference = reference_route(output.scores, router.e_score_correction_bias, config)
    for row, (chosen, weights) in enumerate(reference):
        ids = output.topk_indices[row].tolist()
        assert sorted(ids) == chosen
        for slot, expert in enumerate(ids):
            assert math.isclose(output.topk_weights[row, slot].item(), weights[expert], rel_tol=1e-5)


def make_router(config, seed=0):
    torch.manual_seed(seed)
    router = TopKRouter(config)
    router.weight.data.normal_(0, 1.0)
    return router


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_v1_softmax_greedy(norm_topk_prob):
    config = DeepseekMoEV1Config(**SMALL, norm_topk_prob=norm_topk_prob)
    check_against_reference(make_router(config), config, torch.randn(64, 32))


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_v2_softmax(topk_method, norm_topk_prob):
    # norm_topk_prob=True: the official V2 gate normalises and skips routed_scaling_factor
    # (transformers' native V2 ignores the flag, so this case is checked against the formula only).
    config = DeepseekMoEV2Config(**SMALL, topk_method=topk_method, n_group=4, topk_group=2, norm_topk_prob=norm_topk_prob)
    check_against_reference(make_router(config), config, torch.randn(64, 32))


@pytest.mark.parametrize("bias_sign", [-1.0, 1.0])
def test_v3_noaux_tc_with_biases(bias_sign):
    config = DeepseekMoEV3Config(**SMALL, n_group=4, topk_group=2)
    router = make_router(config)
    router.e_score_correction_bias.copy_(bias_sign * torch.rand(16) * 0.5)
    check_against_reference(router, config, torch.randn(64, 32))


def test_v3_negative_biases_never_pick_dropped_groups():
    # All biases -2 make every kept choice score negative: a 0-filled mask would prefer dropped groups.
    config = DeepseekMoEV3Config(**SMALL, n_group=4, topk_group=1)
    router = make_router(config)
    router.e_score_correction_bias.fill_(-2.0)
    output = router(torch.randn(128, 32))
    groups = output.topk_indices // 4
    assert (groups == groups[:, :1]).all()


def test_v1_logits_stay_in_model_dtype_v3_scores_in_float32():
    v1 = make_router(DeepseekMoEV1Config(**SMALL)).to(torch.bfloat16)
    assert v1(torch.randn(4, 32, dtype=torch.bfloat16)).logits.dtype == torch.bfloat16
    v3 = make_router(DeepseekMoEV3Config(**SMALL, n_group=4, topk_group=2))
    v3.e_score_correction_bias.fill_(1e-4)
    v3 = v3.to(torch.bfloat16).half().to(torch.bfloat16)
    assert v3.weight.dtype == torch.bfloat16
    assert v3.e_score_correction_bias.dtype == torch.float32 and (v3.e_score_correction_bias == 1e-4).all()
    assert v3(torch.randn(4, 32, dtype=torch.bfloat16)).scores.dtype == torch.float32
