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

from transformers import PreTrainedModel, set_seed
from transformers.utils import logging as transformers_logging

from modeling_deepseek_moe import (
    CheckpointError,
    DeepseekMoEV1ForCausalLM,
    DeepseekMoEV2ForCausalLM,
    DeepseekMoEV3Config,
    DeepseekMoEV3ForCausalLM,
    DeepseekMoEV3ForSequenceClassification,
    DeepseekMoEV3Model,
    fp8_cpu,
    saving,
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
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]  # DeepSeek's name: serving engines dispatch on it
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
def test_trust_remote_code_in_a_process_without_the_package(official_checkpoint, tmp_path, fp8, monkeypatch):
    if fp8:  # DeepSeek-V3 as released: the copied code must carry the FP8 layers too
        directory = tmp_path / "fp8"
        write_fp8_official_checkpoint(directory, "v3")
        # the copied code carries no C++ source, so its FP8 products dequantize: the reference does the same
        monkeypatch.setattr(fp8_cpu, "MAX_ROWS", 0)
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


# ---------------------------------------------------------------------- transformers' loading contract
class LoadReport:
    """Collects transformers' load report (the logger its own loading writes to)."""

    def __enter__(self):
        self.messages = []
        self.logger = transformers_logging.get_logger("transformers.modeling_utils")
        self.handler = type("Handler", (__import__("logging").Handler,), {"emit": lambda h, r: self.messages.append(r.getMessage())})()
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)

    @property
    def text(self) -> str:
        return "\n".join(self.messages)


def test_loading_info_of_a_complete_checkpoint_is_empty(official_checkpoint):
    directory, _, _ = official_checkpoint("v3")
    model, info = DeepseekMoEV3ForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert isinstance(model, DeepseekMoEV3ForCausalLM)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}


def test_classifier_from_a_causal_lm_checkpoint_initialises_only_its_head(official_checkpoint):
    directory, _, _ = official_checkpoint("v3")
    causal_lm = DeepseekMoEV3ForCausalLM.from_pretrained(directory)
    with LoadReport() as report:
        classifier, info = DeepseekMoEV3ForSequenceClassification.from_pretrained(
            directory, num_labels=3, pad_token_id=0, output_loading_info=True)
    assert info["missing_keys"] == {"score.weight"} and info["unexpected_keys"] == {"lm_head.weight"}
    assert "score.weight" in report.text and "MISSING" in report.text  # transformers' usual report
    assert 0 < classifier.score.weight.std() < 0.1  # initialised by _init_weights (initializer_range 0.02)
    ids = torch.randint(3, 256, (2, 6))
    with torch.no_grad():
        assert torch.equal(classifier.model(ids).last_hidden_state, causal_lm.model(ids).last_hidden_state)
        assert classifier(ids).logits.shape == (2, 3)


def test_base_model_and_causal_lm_load_each_others_checkpoints(official_checkpoint, tmp_path):
    directory, _, _ = official_checkpoint("v1")
    base = DeepseekMoEV3Model.from_pretrained(official_checkpoint("v3")[0])
    base.save_pretrained(tmp_path / "base")
    causal_lm, info = DeepseekMoEV3ForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight"}  # a head: initialised, reported
    ids = torch.randint(3, 256, (1, 6))
    with torch.no_grad():
        assert torch.equal(causal_lm.model(ids).last_hidden_state, base(ids).last_hidden_state)
    v1 = DeepseekMoEV1ForCausalLM.from_pretrained(directory)
    assert torch.equal(type(v1.model).from_pretrained(directory).layers[1].mlp.gate.weight, v1.model.layers[1].mlp.gate.weight)


@pytest.mark.parametrize("bare_base_model", [False, True])
def test_from_state_dict_without_a_folder(official_checkpoint, bare_base_model):
    directory, _, official = official_checkpoint("v3")
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, 256, (1, 6))
    if bare_base_model:  # this package's parameter names, without the `model.` prefix
        loaded = DeepseekMoEV3Model.from_pretrained(None, config=model.config, state_dict=model.model.state_dict())
        with torch.no_grad():
            assert torch.equal(loaded(ids).last_hidden_state, model.model(ids).last_hidden_state)
        return
    for state in (model.state_dict(), official):  # this package's names, and DeepSeek's
        loaded = DeepseekMoEV3ForCausalLM.from_pretrained(None, config=model.config, state_dict=state)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)
    partial = {k: v for k, v in official.items() if "layers.2.self_attn.o_proj" not in k}
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.o_proj\.weight"):
        DeepseekMoEV3ForCausalLM.from_pretrained(None, config=model.config, state_dict=partial)


def test_ignore_mismatched_sizes_reinitialises_what_differs(official_checkpoint, tmp_path):
    directory, _, _ = official_checkpoint("v3")
    DeepseekMoEV3ForSequenceClassification.from_pretrained(directory, num_labels=3).save_pretrained(tmp_path / "cls")
    with pytest.raises(RuntimeError, match="score.weight"):  # a CheckpointError, as transformers' RuntimeError
        DeepseekMoEV3ForSequenceClassification.from_pretrained(tmp_path / "cls", num_labels=5)
    with LoadReport() as report:
        model, info = DeepseekMoEV3ForSequenceClassification.from_pretrained(
            tmp_path / "cls", num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True)
    assert info["mismatched_keys"] == {("score.weight", (3, 64), (5, 64))}
    assert "Reinit due to size mismatch" in report.text
    assert model.score.weight.shape == (5, 64) and model.score.weight.abs().max() > 0


def test_init_weights_covers_every_tensor(monkeypatch):
    """What transformers' test_can_init_all_missing_weights checks, without loading: a model built on the
    meta device, given storage and initialised by transformers' initialize_weights equals the model built
    directly, every parameter and buffer (RoPE frequencies and router counters included)."""
    original = PreTrainedModel._initialize_weights

    def seeded(*args, **kwargs):
        set_seed(42)
        original(*args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", seeded)
    config = DeepseekMoEV3Config(vocab_size=99, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                 num_hidden_layers=2, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                                 n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                                 qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    for model_class in (DeepseekMoEV3ForCausalLM, DeepseekMoEV3ForSequenceClassification):
        built = model_class(config)
        with torch.device("meta"):
            empty = model_class(config)
        empty.to_empty(device="cpu")
        for tensor in [*empty.parameters(), *empty.buffers()]:
            tensor.data.fill_(7.0) if tensor.dtype != torch.float8_e4m3fn else None  # garbage, visibly
        empty.initialize_weights()
        expected = {**dict(built.named_parameters()), **dict(built.named_buffers())}
        actual = {**dict(empty.named_parameters()), **dict(empty.named_buffers())}
        assert sorted(actual) == sorted(expected)
        different = [name for name in expected if not torch.equal(actual[name], expected[name])]
        assert not different, different


def test_loading_under_a_meta_device_is_refused_as_transformers_does(official_checkpoint):
    directory, _, _ = official_checkpoint("v3")
    with torch.device("meta"), pytest.raises(RuntimeError, match="meta device context manager"):
        DeepseekMoEV3ForCausalLM.from_pretrained(directory)


def test_a_path_that_is_neither_folder_nor_hub_id_is_said_so(tmp_path):
    with pytest.raises(OSError, match="is not a folder, and not a Hub repository id"):
        DeepseekMoEV3ForCausalLM.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_cuda_device_map_without_cuda_is_said_so(official_checkpoint):
    directory, _, _ = official_checkpoint("v3")
    with pytest.raises(ValueError, match="no CUDA device"):
        DeepseekMoEV3ForCausalLM.from_pretrained(directory, device_map="cuda:0")


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


def test_the_remote_code_requires_no_optional_package():
    """transformers refuses remote code that imports a package it cannot find (outside a ``try``): the code
    a checkpoint carries imports torch, transformers and what transformers itself requires, nothing else
    (bitsandbytes, accelerate and PEFT are imported on use)."""
    from transformers.dynamic_module_utils import get_imports

    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "safetensors", "huggingface_hub", "tqdm", "numpy"}
    required = {os.path.basename(path): set(get_imports(path)) - allowed for path in saving.remote_code_files()}
    assert not {name: imports for name, imports in required.items() if imports}
