"""deepseek-moe-convert refuses bad input before writing a byte: one case per bad input, each checked for
exit status 2, a one-line message naming the config field, tensor key or file at fault, no traceback,
and nothing written (neither DST nor DST.partial)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from deepseek_moe_convert import main
from modeling_deepseek_moe.fp8 import FP8_QUANTIZATION_CONFIG
from modeling_deepseek_moe.synthetic import (
    random_official_state,
    tiny_official_config,
    write_fp8_official_checkpoint,
    write_official_checkpoint,
)

CASES = {}


def case(function):
    """Register ``function(tmp_path) -> (argv, what the message must name)`` as a bad-input case."""
    CASES[function.__name__] = function
    return function


def official(directory, family: str = "v3", config_changes: dict | None = None, **overrides) -> str:
    """A tiny official folder; ``config_changes`` are written into its config.json after the tensors."""
    write_official_checkpoint(directory, tiny_official_config(family, **overrides))
    if config_changes:
        edit_config(directory, **config_changes)
    return str(directory)


def fp8_official(directory, **overrides) -> str:
    write_fp8_official_checkpoint(directory, "v3", **overrides)
    return str(directory)


def edit_config(directory, **changes) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    with open(path, "w") as handle:
        json.dump({**config, **changes}, handle)


def mp_folder(tmp_path) -> str:
    """DeepSeek's inference format (2 ranks) of a tiny V3 without MTP, made from ``tmp_path/for-mp``."""
    source = official(tmp_path / "for-mp", num_nextn_predict_layers=0)
    assert main(["to-mp", source, str(tmp_path / "mp"), "--model-parallel", "2", "--quiet"]) == 0
    return str(tmp_path / "mp")


# num_experts_per_tok above n_routed_experts (16): DeepseekMoEV3Config refuses it, naming the field.
TOO_MANY_PER_TOKEN = {"num_experts_per_tok": 32}
FIELD = "`num_experts_per_tok`"


@case
def contradictory_config_from_official(tmp_path):
    return ["from-official", official(tmp_path / "src", config_changes=TOO_MANY_PER_TOKEN), str(tmp_path / "dst")], FIELD


@case
def contradictory_config_to_official(tmp_path):
    return ["to-official", official(tmp_path / "src", config_changes=TOO_MANY_PER_TOKEN), str(tmp_path / "dst")], FIELD


@case
def contradictory_config_quantize(tmp_path):
    return ["quantize", official(tmp_path / "src", config_changes=TOO_MANY_PER_TOKEN), str(tmp_path / "dst")], FIELD


@case
def contradictory_config_dequantize(tmp_path):
    source = fp8_official(tmp_path / "src")
    edit_config(source, **TOO_MANY_PER_TOKEN)
    return ["dequantize", source, str(tmp_path / "dst")], FIELD


@case
def contradictory_config_to_mp(tmp_path):
    source = official(tmp_path / "src", config_changes=TOO_MANY_PER_TOKEN)
    return ["to-mp", source, str(tmp_path / "dst"), "--model-parallel", "2"], FIELD


@case
def contradictory_config_from_mp(tmp_path):
    config = official(tmp_path / "other", config_changes=TOO_MANY_PER_TOKEN) + "/config.json"
    return ["from-mp", mp_folder(tmp_path), str(tmp_path / "dst"), "--config", config], FIELD


@case
def not_a_deepseek_moe_model_type(tmp_path):
    source = official(tmp_path / "src", config_changes={"model_type": "llama"})
    return ["from-official", source, str(tmp_path / "dst")], "model_type 'llama'"


@case
def config_that_is_not_json(tmp_path):
    source = official(tmp_path / "src")
    (tmp_path / "src" / "config.json").write_text("{not json")
    return ["to-official", source, str(tmp_path / "dst")], "config.json: not a JSON config"


@case
def source_that_does_not_exist(tmp_path):
    return ["dequantize", str(tmp_path / "nowhere"), str(tmp_path / "dst")], "nowhere does not exist"


@case
def source_that_is_a_file(tmp_path):
    (tmp_path / "weights.bin").write_text("x")
    return ["quantize", str(tmp_path / "weights.bin"), str(tmp_path / "dst")], "weights.bin is a file"


@case
def source_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    return ["to-official", str(tmp_path / "empty"), str(tmp_path / "dst")], "empty: no config.json"


@case
def tensor_with_the_wrong_shape(tmp_path):
    config = tiny_official_config("v3")
    state = random_official_state(config)
    state["model.layers.1.mlp.experts.3.up_proj.weight"] = torch.zeros(5, 64)
    write_official_checkpoint(tmp_path / "src", config, state=state)
    return (["from-official", str(tmp_path / "src"), str(tmp_path / "dst")],
            "'model.layers.1.mlp.experts.3.up_proj.weight' has shape [5, 64], expected [32, 64]")


@case
def fp8_config_over_float_weights(tmp_path):
    source = official(tmp_path / "src", config_changes={"quantization_config": FP8_QUANTIZATION_CONFIG})
    return ["dequantize", source, str(tmp_path / "dst")], "'model.layers.0.self_attn.q_a_proj.weight' has dtype F32, expected F8_E4M3"


@case
def dequantize_without_fp8(tmp_path):
    return ["dequantize", official(tmp_path / "src"), str(tmp_path / "dst")], "config.json: no FP8 quantization_config"


@case
def quantize_an_fp8_source(tmp_path):
    return ["quantize", fp8_official(tmp_path / "src"), str(tmp_path / "dst")], "quantization_config says the weights are FP8 already"


@case
def to_mp_of_a_v1_model(tmp_path):
    return ["to-mp", official(tmp_path / "src", "v1"), str(tmp_path / "dst"), "--model-parallel", "2"], "model_type 'deepseek'"


@case
def to_mp_over_ranks_that_do_not_divide_the_experts(tmp_path):
    source = official(tmp_path / "src", num_nextn_predict_layers=0)
    return ["to-mp", source, str(tmp_path / "dst"), "--model-parallel", "3"], "n_routed_experts (16) does not split over 3 ranks"


@case
def to_mp_of_a_tensor_that_does_not_split(tmp_path):
    source = official(tmp_path / "src", num_nextn_predict_layers=0, vocab_size=255)
    return (["to-mp", source, str(tmp_path / "dst"), "--model-parallel", "2"],
            "'model.embed_tokens.weight': dim 0 of [255, 64] does not split over 2 ranks")


@case
def to_mp_cutting_fp8_scale_blocks(tmp_path):
    source = fp8_official(tmp_path / "src", num_nextn_predict_layers=0)
    return (["to-mp", source, str(tmp_path / "dst"), "--model-parallel", "2"],
            "'model.layers.0.self_attn.q_b_proj.weight' [96, 48] split over 2 ranks would cut its 128x128 scale blocks")


@case
def to_mp_of_a_model_with_mtp_without_drop_mtp(tmp_path):
    """DeepSeek's inference format has no MTP layer: leaving V3's out must be asked for."""
    return (["to-mp", official(tmp_path / "src"), str(tmp_path / "dst"), "--model-parallel", "2"],
            "holds V3's multi-token-prediction layer, model.layers.3 (68 tensors), which DeepSeek's inference format "
            "has no place for; pass --drop-mtp to leave it out")


@case
def from_mp_with_a_config_that_does_not_exist(tmp_path):
    return (["from-mp", mp_folder(tmp_path), str(tmp_path / "dst"), "--config", str(tmp_path / "missing.json")],
            "missing.json does not exist")


@case
def from_mp_of_rank_files_another_config_made(tmp_path):
    tiny = tiny_official_config("v3")
    vocab, hidden = tiny["vocab_size"], tiny["hidden_size"]
    config = official(tmp_path / "other", num_nextn_predict_layers=0, vocab_size=2 * vocab) + "/config.json"
    return (["from-mp", mp_folder(tmp_path), str(tmp_path / "dst"), "--config", config],
            f"model0-mp2.safetensors: tensor 'embed.weight' has shape [{vocab // 2}, {hidden}], expected [{vocab}, {hidden}]")


@case
def from_mp_with_a_rank_file_missing(tmp_path):
    mp = mp_folder(tmp_path)
    os.remove(os.path.join(mp, "model1-mp2.safetensors"))
    return (["from-mp", mp, str(tmp_path / "dst"), "--config", str(tmp_path / "for-mp" / "config.json")],
            "expected ['model0-mp2.safetensors', 'model1-mp2.safetensors'], found ['model0-mp2.safetensors']")


@case
def merge_lora_with_an_adapter_that_does_not_exist(tmp_path):
    return ["merge-lora", official(tmp_path / "src"), str(tmp_path / "no-adapter"), str(tmp_path / "dst")], "no-adapter does not exist"


@case
def destination_that_is_a_file(tmp_path):
    (tmp_path / "dst").write_text("mine")
    return ["to-official", official(tmp_path / "src"), str(tmp_path / "dst")], "dst is a file"


def listing(root) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files}


def assert_refused(tmp_path, capsys, argv: list[str], expected: str) -> None:
    """Exit status 2, one line on stderr naming ``expected``, no traceback, nothing written."""
    capsys.readouterr()
    before = listing(tmp_path)
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert listing(tmp_path) == before
    assert not os.path.exists(tmp_path / "dst.partial")
    assert not os.path.isdir(tmp_path / "dst")


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_refused_before_writing(tmp_path, capsys, name):
    argv, expected = CASES[name](tmp_path)
    assert_refused(tmp_path, capsys, argv, expected)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> str:
    """A PEFT LoRA adapter (attention, dense, shared and expert LoRA) of a tiny V3."""
    from peft import get_peft_model

    from modeling_deepseek_moe import DeepseekMoEV3ForCausalLM
    from modeling_deepseek_moe.lora import lora_config

    root = tmp_path_factory.mktemp("adapter")
    model = DeepseekMoEV3ForCausalLM.from_pretrained(official(root / "base"), dtype=torch.float32)
    get_peft_model(model, lora_config(r=4, lora_alpha=8)).save_pretrained(root / "adapter")
    return str(root / "adapter")


def test_merge_lora_refuses_a_contradictory_base(tmp_path, capsys, adapter):
    base = official(tmp_path / "src", config_changes=TOO_MANY_PER_TOKEN)
    assert_refused(tmp_path, capsys, ["merge-lora", base, adapter, str(tmp_path / "dst")], FIELD)


def test_merge_lora_refuses_an_adapter_of_another_model(tmp_path, capsys, adapter):
    base = official(tmp_path / "src", moe_intermediate_size=48)
    assert_refused(tmp_path, capsys, ["merge-lora", base, adapter, str(tmp_path / "dst")],
                   "the update of 'model.layers.1.mlp.experts.0.down_proj.weight' is [64, 32], the weight [64, 48]")
