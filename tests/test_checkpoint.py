"""Official-layout checkpoints: bit-exact round trips, Auto classes, trust_remote_code, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from modeling_deepseek_moe import (
    CheckpointError,
    DeepseekMoEV2ForCausalLM,
    DeepseekMoEV3ForCausalLM,
    DeepseekMoEV3Model,
)

from modeling_deepseek_moe.synthetic import write_fp8_official_checkpoint

from conftest import relative_error

CLASSES = {"v2": DeepseekMoEV2ForCausalLM, "v3": DeepseekMoEV3ForCausalLM}


def read_all(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="pt") as handle:
                tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def assert_bit_exact(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key].view(torch.uint8), tensor.view(torch.uint8)), key


def bf16_with_fp32_bias(state):
    for key in state:
        if not key.endswith("e_score_correction_bias"):
            state[key] = state[key].to(torch.bfloat16)


@pytest.mark.parametrize("family", ["v1", "v2", "v3"])
def test_load_save_is_bit_exact(official_checkpoint, tmp_path, family):
    from modeling_deepseek_moe import DeepseekMoEV1ForCausalLM

    directory, _, state = official_checkpoint(family)
    model_class = {"v1": DeepseekMoEV1ForCausalLM, **CLASSES}[family]
    model_class.from_pretrained(directory).save_pretrained(tmp_path / "saved", max_shard_size="100KB")
    assert_bit_exact(read_all(tmp_path / "saved"), state)


def test_bf16_v3_with_mtp_round_trips_keeping_the_float32_bias(official_checkpoint, tmp_path):
    directory, _, state = official_checkpoint("v3", edit_state=bf16_with_fp32_bias, torch_dtype="bfloat16")
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory)
    assert model.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert len(model.model.mtp) == 1
    model.save_pretrained(tmp_path / "saved")
    saved = read_all(tmp_path / "saved")
    assert saved["model.layers.3.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert_bit_exact(saved, state)


def test_saved_folder_names_our_model_type_and_ships_the_code(official_checkpoint, tmp_path):
    directory, _, _ = official_checkpoint("v3")
    DeepseekMoEV3ForCausalLM.from_pretrained(directory).save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "deepseek_moe_v3"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling.DeepseekMoEV3ForCausalLM"
    assert config["architectures"] == ["DeepseekMoEV3ForCausalLM"]
    for file in ("modeling.py", "configuration.py", "attention.py", "routing.py", "experts.py", "loading.py", "layout.py"):
        assert (tmp_path / "saved" / file).is_file(), file
    assert not [name for name in os.listdir(tmp_path / "saved") if name.startswith(".saving-")]


def test_auto_classes_load_saved_folder(official_checkpoint, tmp_path):
    directory, _, _ = official_checkpoint("v2")
    original = DeepseekMoEV2ForCausalLM.from_pretrained(directory)
    original.save_pretrained(tmp_path / "saved")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "saved"), type(original.config))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert type(reloaded) is DeepseekMoEV2ForCausalLM
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, original(ids).logits)


@pytest.mark.parametrize("fp8", [False, True])
def test_trust_remote_code_in_a_process_without_the_package(official_checkpoint, tmp_path, fp8):
    if fp8:  # DeepSeek-V3 as released: the copied code must carry the FP8 layers too
        directory = tmp_path / "fp8"
        write_fp8_official_checkpoint(directory, "v3")
    else:
        directory, _, _ = official_checkpoint("v3")
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory)
    model.save_pretrained(tmp_path / "saved")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["modeling_deepseek_moe"] = None  # importing the package now fails
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "saved")!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            assert torch.equal(model(io["ids"]).logits, io["expected"])
        print("REMOTE-OK")
    """)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]


def test_expert_chunks_change_nothing_on_disk_or_in_logits(official_checkpoint, tmp_path):
    directory, _, state = official_checkpoint("v3")
    whole = DeepseekMoEV3ForCausalLM.from_pretrained(directory)
    chunked = DeepseekMoEV3ForCausalLM.from_pretrained(directory, num_expert_chunks=4)
    assert len(chunked.model.layers[1].mlp.experts.chunks) == 4
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert relative_error(chunked(ids).logits, whole(ids).logits) < 1e-6
    chunked.save_pretrained(tmp_path / "saved")
    assert_bit_exact(read_all(tmp_path / "saved"), state)


def test_base_model_loads_from_causal_lm_checkpoint(official_checkpoint):
    directory, _, _ = official_checkpoint("v3")
    base = DeepseekMoEV3Model.from_pretrained(directory)
    full = DeepseekMoEV3ForCausalLM.from_pretrained(directory)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, full.model(ids).last_hidden_state)


def test_mtp_can_be_dropped(official_checkpoint):
    directory, _, _ = official_checkpoint("v3")
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory, num_nextn_predict_layers=0)
    assert len(model.model.mtp) == 0


# ---------------------------------------------------------------------- bad checkpoints
def rewrite_shard(directory, mutate):
    """Apply ``mutate(tensors)`` to the shard holding expert 5 of layer 1."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    file = index["weight_map"]["model.layers.1.mlp.experts.5.up_proj.weight"]
    tensors = read_all_file(directory / file)
    mutate(tensors, index["weight_map"], file)
    save_file(tensors, directory / file)
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def read_all_file(path):
    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def test_missing_expert_tensor_is_named(official_checkpoint):
    directory, _, _ = official_checkpoint("v3")

    def drop(tensors, weight_map, file):
        del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
        del weight_map["model.layers.1.mlp.experts.5.up_proj.weight"]

    rewrite_shard(directory, drop)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight"):
        DeepseekMoEV3ForCausalLM.from_pretrained(directory)


def test_wrong_shape_is_named(official_checkpoint):
    directory, _, _ = official_checkpoint("v3")

    def widen(tensors, weight_map, file):
        tensors["model.layers.1.mlp.experts.5.up_proj.weight"] = torch.zeros(33, 64)

    rewrite_shard(directory, widen)
    with pytest.raises(CheckpointError, match=r"experts\.5\.up_proj\.weight' has shape \[33, 64\], expected \[32, 64\]"):
        DeepseekMoEV3ForCausalLM.from_pretrained(directory)


def test_unexpected_tensor_is_named(official_checkpoint):
    directory, _, _ = official_checkpoint("v3")

    def add(tensors, weight_map, file):
        tensors["model.layers.1.mlp.experts.16.up_proj.weight"] = torch.zeros(32, 64)
        weight_map["model.layers.1.mlp.experts.16.up_proj.weight"] = file

    rewrite_shard(directory, add)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.1\.mlp\.experts\.16\.up_proj\.weight'"):
        DeepseekMoEV3ForCausalLM.from_pretrained(directory)


def test_truncated_shard_is_named(official_checkpoint):
    directory, _, _ = official_checkpoint("v3")
    shard = directory / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        DeepseekMoEV3ForCausalLM.from_pretrained(directory)


def test_index_naming_a_missing_file_is_named(official_checkpoint):
    directory, _, _ = official_checkpoint("v3")
    os.remove(directory / "model-00001-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="names model-00001-of-00002.safetensors, which does not exist"):
        DeepseekMoEV3ForCausalLM.from_pretrained(directory)


def test_other_family_config_is_refused(official_checkpoint):
    directory, _, _ = official_checkpoint("v2")
    with pytest.raises(CheckpointError, match="model_type 'deepseek_v2' cannot be loaded by DeepseekMoEV3ForCausalLM"):
        DeepseekMoEV3ForCausalLM.from_pretrained(directory)
