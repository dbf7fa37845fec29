"""Config classes: released defaults, DeepSeek's config.json fields, and validation errors."""

from __future__ import annotations

import pytest

from modeling_deepseek_moe import DeepseekMoEV1Config, DeepseekMoEV2Config, DeepseekMoEV3Config
from modeling_deepseek_moe.synthetic import tiny_official_config


def test_defaults_are_the_released_models():
    v1, v2, v3 = DeepseekMoEV1Config(), DeepseekMoEV2Config(), DeepseekMoEV3Config()
    assert (v1.hidden_size, v1.num_hidden_layers, v1.n_routed_experts, v1.n_shared_experts) == (2048, 28, 64, 2)
    assert (v1.moe_intermediate_size, v1.num_experts_per_tok, v1.topk_method, v1.vocab_size) == (1408, 6, "greedy", 102400)
    assert v1.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}
    assert (v2.hidden_size, v2.num_hidden_layers, v2.n_routed_experts, v2.routed_scaling_factor) == (5120, 60, 160, 16.0)
    assert (v2.n_group, v2.topk_group, v2.topk_method, v2.q_lora_rank) == (8, 3, "group_limited_greedy", 1536)
    assert v2.rope_parameters["rope_type"] == "yarn" and v2.rope_parameters["mscale_all_dim"] == 0.707
    assert (v3.hidden_size, v3.num_hidden_layers, v3.n_routed_experts, v3.num_experts_per_tok) == (7168, 61, 256, 8)
    assert (v3.topk_method, v3.scoring_func, v3.routed_scaling_factor, v3.norm_topk_prob) == ("noaux_tc", "sigmoid", 2.5, True)
    assert (v3.n_group, v3.topk_group, v3.first_k_dense_replace, v3.num_nextn_predict_layers) == (8, 4, 3, 1)
    assert (v3.vocab_size, v3.bos_token_id, v3.eos_token_id) == (129280, 0, 1)
    assert v3.rope_parameters["factor"] == 40 and v3.rope_parameters["mscale"] == 1.0


@pytest.mark.parametrize("family, config_class", [("v1", DeepseekMoEV1Config), ("v2", DeepseekMoEV2Config), ("v3", DeepseekMoEV3Config)])
def test_every_released_field_is_accepted(family, config_class):
    fields = tiny_official_config(family)
    fields.pop("model_type")
    config = config_class(**fields)
    for name in ("n_routed_experts", "num_experts_per_tok", "first_k_dense_replace", "aux_loss_alpha", "seq_aux"):
        assert getattr(config, name) == fields[name]
    if fields["rope_scaling"]:
        for name, value in fields["rope_scaling"].items():
            if name != "type":
                assert config.rope_parameters[name] == value
        assert config.rope_parameters["rope_type"] == "yarn"


def test_misspelt_gready_is_greedy():
    assert DeepseekMoEV2Config(topk_method="gready").topk_method == "greedy"


def test_moe_layer_rule():
    config = DeepseekMoEV2Config(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    assert [config.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]


@pytest.mark.parametrize(
    "config_class, fields, message",
    [
        (DeepseekMoEV3Config, {"n_group": 7}, "`n_routed_experts` (256) must be divisible by `n_group` (7)"),
        (DeepseekMoEV3Config, {"topk_group": 9}, "`topk_group` must be in [1, n_group=8], got 9"),
        (DeepseekMoEV2Config, {"n_group": 8, "topk_group": 1, "num_experts_per_tok": 21}, "`num_experts_per_tok` (21) exceeds the experts in `topk_group` groups"),
        (DeepseekMoEV2Config, {"topk_method": "best"}, "`topk_method` must be one of ['greedy', 'group_limited_greedy'], got 'best'"),
        (DeepseekMoEV3Config, {"topk_method": "greedy"}, "`topk_method` must be one of ['noaux_tc'], got 'greedy'"),
        (DeepseekMoEV2Config, {"scoring_func": "sigmoid"}, "`scoring_func` must be one of ['softmax'], got 'sigmoid'"),
        (DeepseekMoEV3Config, {"scoring_func": "relu"}, "`scoring_func` must be one of ['softmax', 'sigmoid'], got 'relu'"),
        (DeepseekMoEV1Config, {"num_experts_per_tok": 65}, "`num_experts_per_tok` must be in [1, n_routed_experts=64], got 65"),
        (DeepseekMoEV1Config, {"num_attention_heads": 15}, "`hidden_size` (2048) must be divisible by `num_attention_heads` (15)"),
        (DeepseekMoEV3Config, {"num_expert_chunks": 3}, "`num_expert_chunks` (3) must divide `n_routed_experts` (256)"),
        (DeepseekMoEV3Config, {"qk_rope_head_dim": 63}, "`qk_rope_head_dim` must be even"),
        (DeepseekMoEV2Config, {"topk_method": "group_limited_greedy", "n_group": None}, "needs a positive `n_group`, got None"),
        (DeepseekMoEV3Config, {"n_group": 256, "topk_group": 8}, "needs at least 2 experts per group"),
    ],
)
def test_contradictions_raise_naming_field_and_values(config_class, fields, message):
    with pytest.raises(ValueError) as error:
        config_class(**fields)
    assert message in str(error.value)
