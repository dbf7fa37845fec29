"""What users do next with a model: the quickstart (our classes, no warning), tokenizers that travel with
the tiny models and with what the package saves, text-generation pipelines, and the engines users serve
with (llama.cpp's own converter and runtime, where llama-cpp-python is installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from modeling_deepseek_moe import DeepseekMoEV3ForCausalLM
from modeling_deepseek_moe.synthetic import BOS_TOKEN, EOS_TOKEN, tiny_official_config, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILY_CLASSES = {"v1": "DeepseekMoEV1ForCausalLM", "v2": "DeepseekMoEV2ForCausalLM", "v3": "DeepseekMoEV3ForCausalLM"}


@pytest.mark.parametrize("family", ["v1", "v3"])  # V1: a model_type transformers does not know; V3: the default
def test_quickstart_shows_our_classes_and_no_warning(family, tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py"), "--family", family,
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    ours = FAMILY_CLASSES[family]
    assert f"loaded {ours}: 3 layers (2 MoE), 16 routed experts" in run.stdout
    assert f"reloaded through AutoModelForCausalLM as {ours}; identical logits: True" in run.stdout
    assert "pipeline('text-generation')" in run.stdout
    # no LOAD REPORT, no warning of any kind (nor bitsandbytes' CPU note: importing the package imports neither
    # transformers' trainer utilities nor, through them, PEFT and bitsandbytes)
    assert not run.stderr.strip(), run.stderr


@pytest.mark.parametrize("family", FAMILY_CLASSES)
def test_tiny_tokenizer_has_deepseeks_special_tokens_at_the_configs_ids(family):
    config = tiny_official_config(family)
    tokenizer = tiny_tokenizer(config)
    assert len(tokenizer) == config["vocab_size"]
    assert tokenizer.convert_ids_to_tokens([config["bos_token_id"], config["eos_token_id"]]) == [BOS_TOKEN, EOS_TOKEN]
    ids = tokenizer("Shared experts see every token.").input_ids
    assert ids[0] == config["bos_token_id"] and max(ids) < config["vocab_size"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Shared experts see every token."


def test_tokenizer_travels_with_the_checkpoint_and_what_is_saved(official_checkpoint, tmp_path):
    directory, _, _ = official_checkpoint("v3")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory)
    model.save_pretrained(tmp_path / "saved")  # copies the tokenizer of the folder it was loaded from
    saved_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert saved_tokenizer("Experts").input_ids == tokenizer("Experts").input_ids
    generator = pipeline("text-generation", model=str(tmp_path / "saved"))
    assert type(generator.model).__name__ == "DeepseekMoEV3ForCausalLM"
    text = generator("Routing", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    inputs = tokenizer("Routing", return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True)
    # A tokenizer the user saved into the destination first is left as it is.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "tokenizer_config.json").write_text("{}")
    model.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "tokenizer_config.json").read_text() == "{}"
    assert not (tmp_path / "mine" / "tokenizer.json").exists()


def test_saved_config_names_deepseeks_architecture_and_keeps_ours(official_checkpoint, tmp_path):
    directory, _, _ = official_checkpoint("v1")
    AutoModelForCausalLM.from_pretrained(directory).save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architectures"] == ["DeepseekForCausalLM"]
    assert config["model_type"] == "deepseek_moe_v1"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling.DeepseekMoEV1ForCausalLM"
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")).__name__ == "DeepseekMoEV1ForCausalLM"


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("sentencepiece") is None,
                    reason='needs the llama-cpp extra: pip install -e ".[llama-cpp]" (builds llama.cpp)')
def test_llama_cpp_converts_and_runs_what_we_save(tmp_path):
    """llama.cpp's own converter reads a folder saved by save_pretrained as DeepSeek's model (config.json
    names DeepSeek's architecture), and llama.cpp's runtime gives our logits and greedy tokens, for each
    family and for FP8 weights."""
    figures = tmp_path / "interop.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "serve_with_llama_cpp.py"),
                          "--cases", "v1", "v2", "v3", "v3 fp8", "--json", str(figures)],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    for row in json.loads(figures.read_text())["results"]:
        assert row["logits_relative_error"] < 1e-5, row
        assert row["same_greedy_tokens"], row
