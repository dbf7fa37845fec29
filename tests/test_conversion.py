"""deepseek-moe-convert: every subcommand on tiny official-layout fixtures (V1, V2-Lite, V2, V3 FP8 with
MTP, sharded), round trips bit-exact, dequantization against a reference, the inference format, LoRA
merges against PEFT's, resumption, and corrupt sources rejected with nothing written."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import get_peft_model
from safetensors import safe_open

from modeling_deepseek_moe import DeepseekMoEV3ForCausalLM, conversion
from modeling_deepseek_moe.safetensors_io import CheckpointError
from modeling_deepseek_moe.conversion import engine, model_parallel, mp_file, verify
from deepseek_moe_convert import main
from modeling_deepseek_moe.fp8 import FP8_DTYPE, FP8_QUANTIZATION_CONFIG, QUANTIZED_KEY, SCALE_SUFFIX
from modeling_deepseek_moe.lora import lora_config
from modeling_deepseek_moe.synthetic import write_fp8_official_checkpoint, write_official_checkpoint
from transformers import AutoModelForCausalLM


FAMILIES = {
    "v1": ("v1", {}),
    "v2-lite": ("v2", {"q_lora_rank": None}),
    "v2": ("v2", {}),
}


def read_all(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a folder (sharded with an index, or one model.safetensors)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    files = set(json.load(open(index))["weight_map"].values()) if os.path.isfile(index) else {"model.safetensors"}
    tensors = {}
    for file in files:
        with safe_open(os.path.join(directory, file), "pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    if os.path.isfile(index):
        assert set(tensors) == set(json.load(open(index))["weight_map"])
    return tensors


def config_of(directory) -> dict:
    with open(os.path.join(directory, "config.json")) as handle:
        return json.load(handle)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def reference_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Block by block, as DeepSeek's weight_dequant kernel does."""
    out = torch.empty(weight.shape, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            block = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
            out[block] = weight[block].float() * scale_inv[i, j]
    return out.bfloat16()


def write_fp8_official(directory, num_shards=3, seed=0, **overrides):
    """DeepSeek-V3 as released (FP8 weights + scales, bf16 rest, fp32 router bias, MTP) with tokenizer files
    (the tiny tokenizer's tokenizer.json and tokenizer_config.json) and a generation config."""
    write_fp8_official_checkpoint(directory, "v3", num_shards=num_shards, seed=seed, **overrides)
    for name, text in (("generation_config.json", '{"bos_token_id": 0}'),):
        with open(os.path.join(directory, name), "w") as handle:
            handle.write(text)
    return str(directory)


@pytest.fixture
def fp8_v3(tmp_path):
    return write_fp8_official(tmp_path / "official-v3-fp8")


@pytest.mark.parametrize("name", [*FAMILIES, "v3-fp8"])
def test_official_to_package_to_official_is_bit_exact(tmp_path, official_checkpoint, fp8_v3, name):
    if name == "v3-fp8":
        source = fp8_v3
    else:
        family, overrides = FAMILIES[name]
        source = str(official_checkpoint(family, num_shards=3, **overrides)[0])
    assert main(["from-official", source, str(tmp_path / "ours"), "--quiet"]) == 0
    assert main(["to-official", str(tmp_path / "ours"), str(tmp_path / "back"), "--quiet"]) == 0
    original, back = read_all(source), read_all(tmp_path / "back")
    assert original.keys() == back.keys()
    assert all(bit_equal(original[k], back[k]) for k in original)
    assert config_of(tmp_path / "back") == config_of(source)

    ours = config_of(tmp_path / "ours")
    assert ours["model_type"].startswith("deepseek_moe_v") and "AutoModelForCausalLM" in ours["auto_map"]
    assert os.path.isfile(tmp_path / "ours" / "modeling.py")
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]
    if name == "v3-fp8":
        assert os.path.isfile(tmp_path / "ours" / "tokenizer.json") and os.path.isfile(tmp_path / "back" / "generation_config.json")
    else:  # the converted folder loads through the Auto classes
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
        reference = type(model).from_pretrained(source, dtype=torch.float32)  # our class, on the official folder
        ids = torch.randint(0, 256, (1, 9))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference(ids).logits)


def test_dequantize_matches_the_reference_and_drops_scales(tmp_path, fp8_v3):
    assert main(["dequantize", fp8_v3, str(tmp_path / "bf16"), "--quiet"]) == 0
    source, out = read_all(fp8_v3), read_all(tmp_path / "bf16")
    assert not any(k.endswith(SCALE_SUFFIX) for k in out)
    assert out.keys() == {k for k in source if not k.endswith(SCALE_SUFFIX)}
    for key, tensor in out.items():
        if source[key].dtype == FP8_DTYPE:
            scale = source[key.removesuffix(".weight") + SCALE_SUFFIX]
            assert bit_equal(tensor, reference_dequantize(source[key], scale)), key
        else:
            assert bit_equal(tensor, source[key]), key  # bf16 rest and the fp32 bias untouched
    config = config_of(tmp_path / "bf16")
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    with open(tmp_path / "bf16" / "model.safetensors.index.json") as handle:
        index = json.load(handle)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    # and the dequantized folder loads and runs
    model = DeepseekMoEV3ForCausalLM.from_pretrained(tmp_path / "bf16")
    assert model.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.dtype == torch.bfloat16


def test_scales_stored_in_another_shard_are_found(tmp_path, fp8_v3):
    """DeepSeek's index may place a weight and its weight_scale_inv in different files."""
    state = read_all(fp8_v3)
    config = config_of(fp8_v3)
    moved = tmp_path / "scales-apart"
    weights = {k: v for k, v in state.items() if not k.endswith(SCALE_SUFFIX)}
    scales = {k: v for k, v in state.items() if k.endswith(SCALE_SUFFIX)}
    write_official_checkpoint(moved, config, state={**weights, **scales}, num_shards=2)
    index = json.loads((moved / "model.safetensors.index.json").read_text())
    assert any(index["weight_map"][k] != index["weight_map"][k.removesuffix(SCALE_SUFFIX) + ".weight"] for k in scales)
    conversion.dequantize(str(moved), str(tmp_path / "a"), quiet=True)
    conversion.dequantize(fp8_v3, str(tmp_path / "b"), quiet=True)
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    assert a.keys() == b.keys() and all(bit_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_quantize_quantizes_exactly_what_deepseek_quantizes(tmp_path, fp8_v3, scale_fmt):
    conversion.dequantize(fp8_v3, str(tmp_path / "bf16"), quiet=True)
    assert main(["quantize", str(tmp_path / "bf16"), str(tmp_path / "fp8"), "--scale-fmt", scale_fmt, "--quiet"]) == 0
    released, ours = read_all(fp8_v3), read_all(tmp_path / "fp8")
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in released.items()}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in released.items()}
    assert not any(QUANTIZED_KEY.search(k) for k in ("model.layers.3.eh_proj.weight", "model.layers.1.mlp.gate.weight"))
    config = config_of(tmp_path / "fp8")["quantization_config"]
    assert config == dict(FP8_QUANTIZATION_CONFIG, **({"scale_fmt": "ue8m0"} if scale_fmt == "ue8m0" else {}))
    scales = torch.cat([v.flatten() for k, v in ours.items() if k.endswith(SCALE_SUFFIX)])
    if scale_fmt == "ue8m0":
        assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)
    # re-quantizing the bf16 copy gives back the released FP8 bytes (float scales)
    result = verify(fp8_v3, str(tmp_path / "fp8"), quiet=True)
    assert result["tensors"] == sum(1 for k in released if not k.endswith(SCALE_SUFFIX))
    assert result["max_rel_diff"] == 0.0 if scale_fmt == "float" else result["max_rel_diff"] < 0.07


def test_from_official_dtypes_and_drop_mtp(tmp_path, fp8_v3, official_checkpoint):
    main(["from-official", fp8_v3, str(tmp_path / "bf16"), "--dtype", "bf16", "--drop-mtp", "--quiet"])
    tensors, config = read_all(tmp_path / "bf16"), config_of(tmp_path / "bf16")
    assert not any(k.startswith("model.layers.3.") or k.endswith(SCALE_SUFFIX) for k in tensors)
    assert config["num_nextn_predict_layers"] == 0 and "quantization_config" not in config
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").config.num_nextn_predict_layers == 0

    source = str(official_checkpoint("v2")[0])
    main(["from-official", source, str(tmp_path / "v2-fp8"), "--dtype", "fp8", "--quiet"])
    tensors, config = read_all(tmp_path / "v2-fp8"), config_of(tmp_path / "v2-fp8")
    assert config["quantization_config"] == FP8_QUANTIZATION_CONFIG
    quantized = {k for k, v in tensors.items() if v.dtype == FP8_DTYPE}
    assert quantized == {k for k in tensors if QUANTIZED_KEY.search(k)} and quantized
    assert {k.removesuffix(SCALE_SUFFIX) + ".weight" for k in tensors if k.endswith(SCALE_SUFFIX)} == quantized


MP_FRIENDLY = dict(  # every split dim of a quantized weight is a multiple of 128 x 2 ranks
    hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_attention_heads=8, num_key_value_heads=8,
    q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
    n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, num_hidden_layers=2,
)


def test_inference_format_round_trip(tmp_path):
    source = write_fp8_official(tmp_path / "v3", num_shards=4, **MP_FRIENDLY)
    assert main(["to-mp", source, str(tmp_path / "mp"), "--model-parallel", "2", "--drop-mtp", "--quiet"]) == 0
    assert sorted(os.listdir(tmp_path / "mp")) == sorted([mp_file(0, 2), mp_file(1, 2), "generation_config.json", "tokenizer.json",
                                                           "tokenizer_config.json"])
    official = read_all(source)
    ranks = []
    for rank in range(2):
        with safe_open(tmp_path / "mp" / mp_file(rank, 2), "pt") as handle:
            ranks.append({key: handle.get_tensor(key) for key in handle.keys()})
    # DeepSeek's names; routed experts whole on their rank, split weights (and their scales) halved, MTP gone
    assert bit_equal(ranks[1]["layers.1.ffn.experts.3.w1.weight"], official["model.layers.1.mlp.experts.3.gate_proj.weight"])
    assert "layers.1.ffn.experts.3.w1.weight" not in ranks[0] and "layers.1.ffn.experts.0.w2.scale" in ranks[0]
    assert bit_equal(ranks[1]["layers.0.attn.wq_b.weight"], official["model.layers.0.self_attn.q_b_proj.weight"][256:])
    assert bit_equal(ranks[1]["layers.0.attn.wo.scale"], official["model.layers.0.self_attn.o_proj.weight_scale_inv"][:, 1:])
    assert bit_equal(ranks[0]["layers.1.ffn.gate.bias"], official["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert bit_equal(ranks[1]["embed.weight"], official["model.embed_tokens.weight"][256:])  # vocabulary 512 in 2
    assert ranks[0]["head.weight"].shape == (256, 256) and "layers.0.attn_norm.weight" in ranks[1]
    assert not any(key.startswith("layers.2.") for rank in ranks for key in rank)

    assert main(["from-mp", str(tmp_path / "mp"), str(tmp_path / "back"), "--config", f"{source}/config.json", "--quiet"]) == 0
    back = read_all(tmp_path / "back")
    assert back.keys() == {k for k in official if not k.startswith("model.layers.2.")}
    assert all(bit_equal(back[k], official[k]) for k in back)
    assert config_of(tmp_path / "back")["num_nextn_predict_layers"] == 0
    with pytest.raises(CheckpointError, match="does not split over 3 ranks"):
        conversion.to_mp(source, str(tmp_path / "mp3"), 3, quiet=True)
    assert not os.path.exists(tmp_path / "mp3")


def test_mtp_left_out_by_to_mp_is_said_and_explained_by_verify(tmp_path, official_checkpoint, capsys):
    """to-mp --drop-mtp says what it leaves out; verify against the source names the MTP layer as the only
    difference, and --ignore-mtp compares the rest (equal)."""
    source = str(official_checkpoint("v3")[0])
    assert main(["to-mp", source, str(tmp_path / "mp"), "--model-parallel", "2", "--drop-mtp", "--quiet"]) == 0
    assert "leaving out V3's multi-token-prediction layer, model.layers.3 (68 tensors)" in capsys.readouterr().err
    assert main(["from-mp", str(tmp_path / "mp"), str(tmp_path / "back"), "--config", f"{source}/config.json", "--quiet"]) == 0
    assert main(["verify", source, str(tmp_path / "back"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"differ only in V3's multi-token-prediction layer: model.layers.3 (68 tensors) in {source} only" in err
    assert "--ignore-mtp" in err
    assert main(["verify", source, str(tmp_path / "back"), "--ignore-mtp", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_abs_diff"] == 0.0 and result["left_out"] == f"model.layers.3 (68 tensors) in {source} only"


def lora_adapter(directory, tmp_path):
    """A PEFT adapter (attention, dense, shared and expert LoRA, non-zero B) saved from a V3 model."""
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32)
    peft_model = get_peft_model(model, lora_config(r=4, lora_alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "_B" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model, str(tmp_path / "adapter")


def test_merge_lora_equals_peft_merge(tmp_path, official_checkpoint):
    directory = str(official_checkpoint("v3", num_shards=3)[0])
    peft_model, adapter = lora_adapter(directory, tmp_path)
    peft_model.merge_and_unload().save_pretrained(tmp_path / "peft-merged")
    assert main(["merge-lora", directory, adapter, str(tmp_path / "merged"), "--quiet"]) == 0
    ours, theirs, base = read_all(tmp_path / "merged"), read_all(tmp_path / "peft-merged"), read_all(directory)
    assert ours.keys() == theirs.keys() == base.keys()
    changed = [k for k in ours if not torch.equal(ours[k], base[k])]
    assert any("experts.7.up_proj" in k for k in changed) and any("self_attn.kv_b_proj" in k for k in changed)
    assert any("layers.3.mlp.experts" in k for k in changed)  # the MTP layer's expert LoRA lands there too
    assert verify(str(tmp_path / "merged"), str(tmp_path / "peft-merged"), quiet=True)["max_rel_diff"] < 1e-6


def test_merge_lora_into_an_fp8_base_requantizes(tmp_path, official_checkpoint):
    fp32_base = str(official_checkpoint("v3")[0])
    _, adapter = lora_adapter(fp32_base, tmp_path)
    fp8_base = write_fp8_official(tmp_path / "fp8", seed=1)
    conversion.merge_lora(fp8_base, adapter, str(tmp_path / "merged"), quiet=True)
    base, merged = read_all(fp8_base), read_all(tmp_path / "merged")
    assert {k: v.dtype for k, v in merged.items()} == {k: v.dtype for k, v in base.items()}
    assert config_of(tmp_path / "merged")["quantization_config"] == FP8_QUANTIZATION_CONFIG
    factors = conversion.read_lora_adapter(adapter, config_of(fp8_base))
    for key in ("model.layers.0.self_attn.q_b_proj.weight", "model.layers.2.mlp.experts.5.down_proj.weight"):
        scale = key.removesuffix(".weight") + SCALE_SUFFIX
        expected = reference_dequantize(base[key], base[scale]).float() + factors[key].delta()
        got = reference_dequantize(merged[key], merged[scale]).float()
        assert not torch.equal(merged[key].view(torch.uint8), base[key].view(torch.uint8))
        assert ((got - expected).abs() <= merged[scale].max() * 16 + 1e-2 * expected.abs()).all()  # within e4m3's step
    untouched = "model.layers.1.mlp.gate.weight"
    assert bit_equal(merged[untouched], base[untouched])


def test_interrupted_conversion_resumes_without_redoing_shards(tmp_path, fp8_v3, monkeypatch):
    real_writer = engine.SafetensorsWriter
    opened = []

    class WriterInterruptedInThirdShard(real_writer):
        def add(self, key, tensor):
            super().add(key, tensor)
            if len(opened) == 3:
                raise KeyboardInterrupt  # as if the machine went down halfway through a shard

        def __enter__(self):
            opened.append(self.path)
            return self

    monkeypatch.setattr(engine, "SafetensorsWriter", WriterInterruptedInThirdShard)
    with pytest.raises(KeyboardInterrupt):
        conversion.dequantize(fp8_v3, str(tmp_path / "out"), quiet=True)
    assert not os.path.exists(tmp_path / "out") and os.path.isdir(tmp_path / "out.partial")
    with pytest.raises(CheckpointError, match="different conversion"):
        conversion.quantize(fp8_v3, str(tmp_path / "out"), resume=True, quiet=True)
    monkeypatch.setattr(engine, "SafetensorsWriter", real_writer)
    summary = conversion.dequantize(fp8_v3, str(tmp_path / "out"), resume=True, quiet=True)
    assert summary.shards_skipped == 2
    conversion.dequantize(fp8_v3, str(tmp_path / "straight"), quiet=True)
    resumed, straight = read_all(tmp_path / "out"), read_all(tmp_path / "straight")
    assert resumed.keys() == straight.keys() and all(bit_equal(resumed[k], straight[k]) for k in resumed)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "straight"))
    assert not os.path.exists(tmp_path / "out.partial")


def corrupt(kind, directory):
    index_path = os.path.join(directory, "model.safetensors.index.json")
    index = json.load(open(index_path))
    shard = os.path.join(directory, "model-00002-of-00003.safetensors")
    if kind == "truncated":
        with open(shard, "r+b") as handle:
            handle.truncate(os.path.getsize(shard) - 100)
        return "model-00002-of-00003.safetensors: truncated"
    removed = {"missing key": "model.layers.2.mlp.experts.3.up_proj.weight",
               "missing scale": "model.layers.0.self_attn.o_proj.weight_scale_inv"}
    if kind in removed:  # the index no longer lists a tensor the config implies
        del index["weight_map"][removed[kind]]
    else:  # the index names a file that is not there
        index["weight_map"]["model.norm.weight"] = "model-00009-of-00003.safetensors"
    json.dump(index, open(index_path, "w"))
    return {"missing key": f"tensor '{removed['missing key']}' is missing",
            "missing scale": f"FP8 scale '{removed['missing scale']}' is missing",
            "missing file": "names model-00009-of-00003.safetensors, which does not exist"}[kind]


@pytest.mark.parametrize("kind", ["truncated", "missing key", "missing file", "missing scale"])
def test_corrupt_sources_are_rejected_before_writing(tmp_path, fp8_v3, capsys, kind):
    message = corrupt(kind, fp8_v3)
    for command in (["dequantize", fp8_v3, str(tmp_path / "out")], ["to-mp", fp8_v3, str(tmp_path / "out"), "--model-parallel", "1"]):
        assert main(command) == 2
        assert message in capsys.readouterr().err
        assert os.listdir(tmp_path) == ["official-v3-fp8"]  # nothing written, not even DST.partial


def test_destination_must_be_empty_unless_overwrite(tmp_path, fp8_v3, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["dequantize", fp8_v3, str(tmp_path / "out"), "--quiet"]) == 2
    assert "is not empty" in capsys.readouterr().err and os.listdir(tmp_path / "out") == ["keep.txt"]
    assert main(["dequantize", fp8_v3, str(tmp_path / "out"), "--quiet", "--overwrite"]) == 0
    assert "keep.txt" not in os.listdir(tmp_path / "out")
    out = capsys.readouterr()
    assert "dequantize: 383 tensors" in out.out and "tensors" in out.out and out.err == ""


def test_progress_bar_shows_bytes_unless_quiet(tmp_path, fp8_v3, capsys):
    main(["verify", fp8_v3, fp8_v3])
    assert "verify" in capsys.readouterr().err
    main(["to-official", fp8_v3, str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "to-official" in err and "100%" in err and "B/s" in err
    main(["to-official", fp8_v3, str(tmp_path / "p"), "--quiet"])
    assert capsys.readouterr().err == ""


def test_inference_format_conversions_resume_after_an_interruption(tmp_path, monkeypatch):
    source = write_fp8_official(tmp_path / "v3", num_shards=4, **MP_FRIENDLY)
    real_write = model_parallel.write_tensor
    calls = []
    monkeypatch.setattr(model_parallel, "write_tensor", lambda *args: calls.append(1) or real_write(*args))
    conversion.to_mp(source, str(tmp_path / "mp-straight"), 2, drop_mtp=True, quiet=True)
    conversion.from_mp(str(tmp_path / "mp-straight"), str(tmp_path / "back-straight"), f"{source}/config.json", quiet=True)
    total, calls = len(calls), []

    def write_then_fail(handle, offset, tensor):  # dies a few writes before the end, inside the last shard
        calls.append(offset)
        if len(calls) == total - 3:
            raise KeyboardInterrupt
        real_write(handle, offset, tensor)

    monkeypatch.setattr(model_parallel, "write_tensor", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        conversion.to_mp(source, str(tmp_path / "mp"), 2, drop_mtp=True, quiet=True)
    monkeypatch.setattr(model_parallel, "write_tensor", real_write)
    assert conversion.to_mp(source, str(tmp_path / "mp"), 2, drop_mtp=True, resume=True, quiet=True).shards_skipped >= 1
    for rank in range(2):
        assert (tmp_path / "mp" / mp_file(rank, 2)).read_bytes() == (tmp_path / "mp-straight" / mp_file(rank, 2)).read_bytes()

    real_writer = model_parallel.SafetensorsWriter

    class InterruptedInSecondShard(real_writer):
        opened = 0

        def __enter__(self):
            InterruptedInSecondShard.opened += 1
            if InterruptedInSecondShard.opened == 2:
                raise KeyboardInterrupt
            return self

    monkeypatch.setattr(model_parallel, "SafetensorsWriter", InterruptedInSecondShard)
    with pytest.raises(KeyboardInterrupt):
        conversion.from_mp(str(tmp_path / "mp"), str(tmp_path / "back"), f"{source}/config.json", quiet=True, max_shard_size=2**20)
    monkeypatch.setattr(model_parallel, "SafetensorsWriter", real_writer)
    summary = conversion.from_mp(str(tmp_path / "mp"), str(tmp_path / "back"), f"{source}/config.json", resume=True,
                                 quiet=True, max_shard_size=2**20)
    assert summary.shards_skipped == 1
    resumed, straight = read_all(tmp_path / "back"), read_all(tmp_path / "back-straight")
    assert resumed.keys() == straight.keys() and all(bit_equal(resumed[k], straight[k]) for k in resumed)
