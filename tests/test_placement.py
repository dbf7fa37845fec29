"""Expert placement maps: coverage, balance, alignment with routing groups, memory limits, and models
loaded through them computing what the unsplit model computes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from modeling_deepseek_moe import (
    DeepseekMoEV1Config,
    DeepseekMoEV1ForCausalLM,
    DeepseekMoEV2Config,
    DeepseekMoEV2ForCausalLM,
    DeepseekMoEV3Config,
    DeepseekMoEV3ForCausalLM,
)
from modeling_deepseek_moe.placement import expert_device_map, placement_summary, placement_units
from modeling_deepseek_moe.synthetic import tiny_official_config

from conftest import relative_error

GPUS = ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
FAMILIES = {
    "v1": (DeepseekMoEV1Config, DeepseekMoEV1ForCausalLM),
    "v2": (DeepseekMoEV2Config, DeepseekMoEV2ForCausalLM),
    "v3": (DeepseekMoEV3Config, DeepseekMoEV3ForCausalLM),
}


def tiny_config(family, **overrides):
    fields = tiny_official_config(family, **overrides)
    fields.pop("model_type")
    return FAMILIES[family][0](**fields)


def prefix_of(name, device_map):
    return max((p for p in device_map if name == p or name.startswith(p + ".")), key=len, default=None)


@pytest.mark.parametrize("family", ["v1", "v2", "v3"])
def test_map_covers_every_parameter_and_names_real_modules(family):
    config = tiny_config(family)
    device_map = expert_device_map(config, GPUS)
    chunks = 1 + max(int(k.rsplit(".", 1)[1]) for k in device_map if ".chunks." in k)
    config.num_expert_chunks = chunks
    with torch.device("meta"):
        model = FAMILIES[family][1](config)
    modules = dict(model.named_modules())
    assert all(key in modules for key in device_map)
    uncovered = [name for name, _ in model.named_parameters() if prefix_of(name, device_map) is None]
    assert uncovered == []
    sizes = {u.name: u.parameters for u in placement_units(config, chunks)}
    for key, count in sizes.items():  # the analytic sizes are the module's real parameter counts
        assert count == sum(p.numel() for p in modules[key].parameters()) + sum(
            b.numel() for n, b in modules[key].named_buffers() if n.endswith("e_score_correction_bias")
        ), key


def test_experts_split_evenly_in_whole_routing_groups():
    config = DeepseekMoEV3Config(num_hidden_layers=6, n_routed_experts=64, n_group=8, topk_group=4)
    device_map = expert_device_map(config, GPUS)
    for layer in range(3, 6):
        chunks = {k: v for k, v in device_map.items() if k.startswith(f"model.layers.{layer}.mlp.experts.chunks.")}
        assert len(chunks) == 8  # one chunk per routing group
        devices = [chunks[f"model.layers.{layer}.mlp.experts.chunks.{c}"] for c in range(8)]
        assert devices == [d for d in GPUS for _ in range(2)]  # contiguous, 2 groups (16 experts) each
    # so a token routed to topk_group groups touches at most topk_group devices


def test_other_modules_are_balanced_over_the_same_devices():
    config = DeepseekMoEV2Config(num_hidden_layers=12)
    device_map = expert_device_map(config, GPUS)
    bytes_per_device = Counter()
    for unit in placement_units(config, 8):
        if not unit.experts:
            bytes_per_device[device_map[unit.name]] += unit.bytes
    largest_unit = max(u.bytes for u in placement_units(config, 8) if not u.experts)
    assert set(bytes_per_device) == set(GPUS)
    assert max(bytes_per_device.values()) - min(bytes_per_device.values()) <= 2 * largest_unit


def test_offload_experts_to_cpu():
    config = DeepseekMoEV3Config(num_hidden_layers=5)
    device_map = expert_device_map(config, ["cuda:0"], offload_experts="cpu")
    for key, device in device_map.items():
        assert device == ("cpu" if ".experts.chunks." in key else "cuda:0")
    assert "cpu" in placement_summary(device_map, config)


def test_max_memory_moves_experts_to_cpu_or_fails_naming_the_device():
    config = DeepseekMoEV3Config(num_hidden_layers=8, quantization_config={"quant_method": "fp8"})
    full = expert_device_map(config, GPUS[:2])
    per_device = Counter()
    for unit in placement_units(config, 8):
        per_device[full[unit.name]] += unit.bytes
    limit = int(per_device["cuda:0"] * 0.7)
    limited = expert_device_map(config, GPUS[:2], max_memory={"cuda:0": limit, "cuda:1": limit, "cpu": "2000GiB"})
    used = Counter()
    for unit in placement_units(config, 8):
        used[limited[unit.name]] += unit.bytes
    assert used["cuda:0"] <= limit and used["cuda:1"] <= limit and used["cpu"] > 0
    with pytest.raises(ValueError, match=r"device cuda:0 needs .* GiB, max_memory allows"):
        expert_device_map(config, GPUS[:2], max_memory={"cuda:0": limit, "cuda:1": limit})


def test_fp8_counts_one_byte_per_weight_plus_scales():
    bf16 = sum(u.bytes for u in placement_units(DeepseekMoEV3Config(num_hidden_layers=4), 1))
    fp8 = sum(u.bytes for u in placement_units(DeepseekMoEV3Config(num_hidden_layers=4, quantization_config={"quant_method": "fp8"}), 1))
    assert 0.5 < fp8 / bf16 < 0.6


@pytest.mark.parametrize("family", ["v1", "v2", "v3"])
def test_model_loaded_through_a_split_map_equals_the_unsplit_model(official_checkpoint, family):
    directory, _, _ = official_checkpoint(family)
    model_class = FAMILIES[family][1]
    whole = model_class.from_pretrained(directory, dtype=torch.float32)
    device_map = expert_device_map(tiny_config(family), ["cpu", "cpu"])  # two "devices", all on this CPU
    split = model_class.from_pretrained(directory, dtype=torch.float32, device_map=device_map)
    assert len(split.model.layers[1].mlp.experts.chunks) > 1
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert relative_error(split(ids).logits, whole(ids).logits) < 1e-6


@pytest.mark.parametrize("strategy", ["auto", "balanced", "sequential"])
def test_accelerate_strategies_load(official_checkpoint, strategy):
    directory, _, _ = official_checkpoint("v2")
    model = DeepseekMoEV2ForCausalLM.from_pretrained(directory, dtype=torch.float32, device_map=strategy)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_devices_that_do_not_divide_the_groups_differ_by_at_most_one_group():
    config = DeepseekMoEV3Config(num_hidden_layers=4)  # 256 experts in 8 groups of 32
    device_map = expert_device_map(config, ["cuda:0", "cuda:1", "cuda:2"])
    experts = Counter(device_map[k] for k in device_map if k.startswith("model.layers.3.mlp.experts.chunks."))
    assert sum(experts.values()) == 8 and max(experts.values()) - min(experts.values()) <= 1
