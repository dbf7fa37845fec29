"""Block-wise FP8 (DeepSeek-V3's format): the quantize/dequantize functions (shapes, edge blocks, both scale
formats) and the FP8 layers: checkpoints load and save as FP8, forwards equal the dequantized-float32
model, the FP8-activation path, LoRA on FP8 bases."""

from __future__ import annotations

import pytest
import torch

import json
import os

from peft import get_peft_model
from transformers import CompileConfig
from safetensors.torch import load_file

from modeling_deepseek_moe import DeepseekMoEV1ForCausalLM, DeepseekMoEV2ForCausalLM, DeepseekMoEV3ForCausalLM, dispatch, fp8, fp8_cpu
from modeling_deepseek_moe.configuration import DeepseekMoEV3Config
from modeling_deepseek_moe.experts import ExpertChunk
from modeling_deepseek_moe.fp8 import (
    FP8_DTYPE,
    SCALE_SUFFIX,
    FP8Linear,
    dequantize_fp8_blockwise,
    dequantize_stacked,
    fp8_linear,
    quantize_fp8_blockwise,
    quantize_stacked,
    scale_shape,
)
from modeling_deepseek_moe.lora import lora_config
from modeling_deepseek_moe.synthetic import write_fp8_official_checkpoint, write_official_checkpoint

from conftest import relative_error

TINY_V3 = dict(vocab_size=256, hidden_size=64, intermediate_size=160, moe_intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
               q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
               first_k_dense_replace=1, n_shared_experts=1, num_nextn_predict_layers=0)
CLASSES = {"v1": DeepseekMoEV1ForCausalLM, "v2": DeepseekMoEV2ForCausalLM, "v3": DeepseekMoEV3ForCausalLM}


def reference_dequantize(weight, scale_inv):
    """Block by block, as DeepSeek's weight_dequant kernel computes it."""
    out = torch.empty(weight.shape, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rows, cols = slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128)
            out[rows, cols] = weight[rows, cols].float() * scale_inv[i, j]
    return out


@pytest.mark.parametrize("shape", [(576, 7168 // 8), (192, 300), (128, 128), (5, 7)])
def test_edge_blocks_and_scale_shapes(shape):
    weight = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    quantized, scale_inv = quantize_fp8_blockwise(weight)
    assert quantized.dtype == FP8_DTYPE and quantized.shape == weight.shape
    assert scale_inv.dtype == torch.float32 and tuple(scale_inv.shape) == scale_shape(shape)
    dequantized = dequantize_fp8_blockwise(quantized, scale_inv)
    assert torch.equal(dequantized, reference_dequantize(quantized, scale_inv))
    assert relative_error(dequantized, weight) < 0.04  # e4m3 has 3 mantissa bits


def test_kv_a_proj_shape_from_deepseek_v3():
    # [576, 7168] -> scale [5, 56]: transformers 5.23 infers block = 576 // 5 and fails on it.
    assert scale_shape((576, 7168)) == (5, 56)


def test_ue8m0_scales_are_powers_of_two():
    weight = torch.randn(300, 260)
    quantized, scale_inv = quantize_fp8_blockwise(weight, scale_fmt="ue8m0")
    assert torch.equal(scale_inv, torch.exp2(torch.log2(scale_inv).round()))
    assert relative_error(dequantize_fp8_blockwise(quantized, scale_inv), weight) < 0.06


def test_requantizing_a_dequantized_weight_is_exact():
    quantized, scale_inv = quantize_fp8_blockwise(torch.randn(256, 384))
    again, again_scale = quantize_fp8_blockwise(dequantize_fp8_blockwise(quantized, scale_inv))
    assert torch.equal(again.view(torch.uint8), quantized.view(torch.uint8))
    assert torch.equal(again_scale, scale_inv)


def test_stacked_experts_quantize_per_expert():
    weights = torch.randn(4, 64, 200)
    quantized, scale_inv = quantize_fp8_blockwise(weights)
    assert scale_inv.shape == (4, 1, 2)
    for expert in range(4):
        single, single_scale = quantize_fp8_blockwise(weights[expert])
        assert torch.equal(quantized[expert].view(torch.uint8), single.view(torch.uint8))
        assert torch.equal(scale_inv[expert], single_scale)


def test_cpu_conversion_is_exact_for_every_fp8_code():
    codes = torch.arange(256, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # the two NaN codes
    weight = codes.repeat(128, 2).view(torch.float8_e4m3fn)  # [128, 512]: every code, subnormals included
    scale_inv = torch.tensor([[0.75, 2.0**-10, 3.0, 1e-3]])
    assert torch.equal(dequantize_fp8_blockwise(weight, scale_inv), reference_dequantize(weight, scale_inv))


def test_wrong_scale_shape_is_an_error_not_a_guess():
    quantized, scale_inv = quantize_fp8_blockwise(torch.randn(192, 256))
    with pytest.raises(ValueError, match=r"weight_scale_inv has shape \[1, 2\], expected \[2, 2\]"):
        dequantize_fp8_blockwise(quantized, scale_inv[:1])


# ---------------------------------------------------------------------- FP8 layers and models
def read_folder(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


def dequantized_reference(directory, target) -> str:
    """The same checkpoint with every FP8 weight dequantized to float32 and no quantization_config."""
    tensors = read_folder(directory)
    state = {k: dequantize_fp8_blockwise(v, tensors[k.removesuffix(".weight") + SCALE_SUFFIX]) if v.dtype == FP8_DTYPE
             else v.float() for k, v in tensors.items() if not k.endswith(SCALE_SUFFIX)}
    config = json.loads((directory / "config.json").read_text())
    config.pop("quantization_config")
    write_official_checkpoint(target, dict(config, torch_dtype="float32"), state=state)
    return target


@pytest.fixture
def fp8_checkpoint(tmp_path):
    def make(family="v3", scale_fmt="float", **overrides):
        directory = tmp_path / f"fp8-{family}-{scale_fmt}"
        write_fp8_official_checkpoint(directory, family, scale_fmt=scale_fmt, **overrides)
        return directory
    return make


@pytest.mark.parametrize("family, scale_fmt", [("v1", "float"), ("v2", "float"), ("v3", "float"), ("v3", "ue8m0")])
def test_dequantize_path_equals_the_dequantized_float32_model(tmp_path, fp8_checkpoint, family, scale_fmt):
    directory = fp8_checkpoint(family, scale_fmt)
    model = CLASSES[family].from_pretrained(directory, dtype=torch.float32, fp8_compute="dequantize")
    reference = CLASSES[family].from_pretrained(dequantized_reference(directory, tmp_path / "reference"))
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(model(ids).logits, reference(ids).logits) < 1e-5


def test_gradients_through_fp8_weights_dequantize_again_instead_of_keeping_a_copy(tmp_path, fp8_checkpoint):
    directory = fp8_checkpoint("v3")
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32, fp8_compute="dequantize")
    reference = DeepseekMoEV3ForCausalLM.from_pretrained(dequantized_reference(directory, tmp_path / "reference"))
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    dequantized_shapes = {tuple(p.shape[-2:]) for p in model.parameters() if p.dtype == FP8_DTYPE}
    saved = []

    def input_gradient(net, record=False):
        embeddings = net.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t if record else t, lambda t: t):
            net(inputs_embeds=embeddings, labels=ids).loss.backward()
        return embeddings.grad

    assert relative_error(input_gradient(model, record=True), input_gradient(reference)) < 1e-5
    float_copies = [t for t in saved if t.is_floating_point() and t.dtype != FP8_DTYPE and tuple(t.shape[-2:]) in dequantized_shapes]
    assert saved and not float_copies  # autograd kept FP8 weights (or nothing), no dequantized weight


@pytest.mark.parametrize("family", ["v1", "v3"])
def test_fp8_weights_stay_fp8_in_memory_and_save_back_bit_exact(tmp_path, fp8_checkpoint, family):
    directory = fp8_checkpoint(family)
    model = CLASSES[family].from_pretrained(directory)  # dtype "auto": bf16 from config.json
    fp8_modules = [m for m in model.modules() if isinstance(m, FP8Linear)]
    chunks = [m for m in model.modules() if isinstance(m, ExpertChunk)]
    assert fp8_modules and chunks
    for module in fp8_modules:
        assert module.weight.dtype == FP8_DTYPE and not module.weight.requires_grad
        assert module.weight_scale_inv.dtype == torch.float32
    for chunk in chunks:
        assert chunk.gate_up_proj.dtype == chunk.down_proj.dtype == FP8_DTYPE
    assert model.model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16
    model.float()  # casts everything else, never FP8 weights or float32 scales
    assert fp8_modules[0].weight.dtype == FP8_DTYPE and fp8_modules[0].weight_scale_inv.dtype == torch.float32
    assert chunks[0].gate_up_proj_scale_inv.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    model.half()
    assert fp8_modules[0].weight.dtype == chunks[0].down_proj.dtype == FP8_DTYPE and model.lm_head.weight.dtype == torch.float16
    model = CLASSES[family].from_pretrained(directory).float().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "saved")
    original, saved = read_folder(directory), read_folder(tmp_path / "saved")
    assert original.keys() == saved.keys()
    for key, tensor in original.items():
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key].view(torch.uint8), tensor.view(torch.uint8)), key
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((directory / "config.json").read_text())["quantization_config"]


def test_expert_gate_and_up_keep_their_own_block_grids(tmp_path, fp8_checkpoint):
    """moe_intermediate_size 200: the up projection starts inside the gate's last row block."""
    directory = fp8_checkpoint("v3", moe_intermediate_size=200)
    chunk = DeepseekMoEV3ForCausalLM.from_pretrained(directory).model.layers[1].mlp.experts.chunks[0]
    assert chunk.gate_up_proj_scale_inv.shape == (16, 4, 1)  # [experts, 2 x ceil(200/128), ceil(64/128)]
    tensors = read_folder(directory)
    dense = chunk.dequantized("gate_up_proj")
    for expert in (0, 11):
        for part, rows in (("gate", slice(0, 200)), ("up", slice(200, 400))):
            key = f"model.layers.1.mlp.experts.{expert}.{part}_proj"
            expected = reference_dequantize(tensors[key + ".weight"], tensors[key + SCALE_SUFFIX])
            assert torch.equal(dense[expert, rows], expected)


def test_products_dequantize_a_bounded_batch_of_experts_at_a_time(fp8_checkpoint, monkeypatch):
    model = DeepseekMoEV3ForCausalLM.from_pretrained(fp8_checkpoint("v3"), dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    calls = []
    real = fp8.dequantize_stacked
    monkeypatch.setattr(fp8_cpu, "MAX_ROWS", 0)  # the dequantize path (decode-sized products take the kernel)
    monkeypatch.setattr(fp8, "dequantize_stacked", lambda weight, *a: calls.append(weight.shape[0]) or real(weight, *a))
    with torch.no_grad():
        whole = model(ids).logits
        used = sum(calls)
        monkeypatch.setattr(fp8, "DEQUANTIZE_BUDGET_BYTES", 1)  # one expert per product
        calls.clear()
        batched = model(ids).logits
        monkeypatch.setattr(dispatch, "SLICE_BYTES", 10 * 64 * 4)  # slices of ~10 (token, expert) slots
        sliced = model(ids).logits
    assert used <= 3 * 2 * 16  # at most the 16 experts of each MoE layer (2 + MTP), per projection pair
    assert max(calls) == 1 and torch.allclose(batched, whole, rtol=1e-6, atol=1e-6)
    assert torch.allclose(sliced, whole, rtol=1e-6, atol=1e-6)


def test_experts_over_the_budget_go_by_row_tiles_forward_and_backward(monkeypatch):
    block, rows, cols = (16, 16), 2 * 32, 48  # gate and up of 32 rows each: one block grid
    weight, scale_inv = quantize_stacked(torch.randn(4, rows, cols), 2, block)
    offsets = torch.tensor([5, 5, 12, 20], dtype=torch.int32)  # expert 1 receives nothing
    columns = torch.randn(cols, 20, requires_grad=True)
    upstream = torch.randn(rows, 20)
    dense = dequantize_stacked(weight, scale_inv, 2, torch.float32, block)
    starts = [0, *offsets.tolist()[:-1]]
    expected = torch.cat([dense[e] @ columns[:, s:t] for e, (s, t) in enumerate(zip(starts, offsets.tolist()))], dim=1)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), columns)

    tiles = []
    real = fp8.dequantize_fp8_blockwise
    monkeypatch.setattr(fp8, "dequantize_fp8_blockwise", lambda w, *a: tiles.append(tuple(w.shape)) or real(w, *a))
    monkeypatch.setattr(fp8, "DEQUANTIZE_BUDGET_BYTES", 16 * cols * 4)  # one block row of one expert
    output = fp8.fp8_grouped_linear(weight, scale_inv, columns.t(), offsets, 2, "dequantize", block).t()  # rows API
    (grad,) = torch.autograd.grad((output * upstream).sum(), columns)
    assert set(tiles) == {(16, cols)} and len(tiles) == 2 * 3 * rows // 16  # forward + backward, 3 active experts
    assert relative_error(output, expected) < 1e-6 and relative_error(grad, expected_grad) < 1e-6


def test_fp8_linear_over_the_budget_goes_by_row_tiles(monkeypatch):
    block = (16, 16)
    weight, scale_inv = quantize_fp8_blockwise(torch.randn(72, 40), block)  # last block row partial
    x = torch.randn(3, 5, 40, requires_grad=True)
    upstream = torch.randn(3, 5, 72)
    dense = dequantize_fp8_blockwise(weight, scale_inv, block=block)
    expected = x @ dense.t()
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), x)
    tiles = []
    real = fp8.dequantize_fp8_blockwise
    monkeypatch.setattr(fp8, "dequantize_fp8_blockwise", lambda w, *a: tiles.append(w.shape[0]) or real(w, *a))
    monkeypatch.setattr(fp8, "DEQUANTIZE_BUDGET_BYTES", 2 * 16 * 40 * 4)  # two block rows
    output = fp8_linear(x, weight, scale_inv, mode="dequantize", block=block)
    (grad,) = torch.autograd.grad((output * upstream).sum(), x)
    assert tiles == [32, 32, 8] * 2  # forward, backward
    assert relative_error(output, expected) < 1e-6 and relative_error(grad, expected_grad) < 1e-6


def test_scaled_path_quantizes_activations_per_token_in_1x128_groups():
    torch.manual_seed(0)
    x, weight = torch.randn(37, 300), torch.randn(200, 300) / 300**0.5
    quantized, scale_inv = quantize_fp8_blockwise(weight)
    exact = fp8_linear(x, quantized, scale_inv, mode="dequantize")
    assert torch.equal(exact, x @ dequantize_fp8_blockwise(quantized, scale_inv).T)
    scaled = fp8_linear(x, quantized, scale_inv, mode="scaled")
    groups = x.view(37, 1, 300)  # reference: scale = amax / 448 of each token's 128-wide group, e4m3 rounding
    activations = torch.cat([
        (g / (g.abs().amax(-1, keepdim=True) / 448)).to(FP8_DTYPE).float() * (g.abs().amax(-1, keepdim=True) / 448)
        for g in groups.split(128, dim=-1)], dim=-1).view(37, 300)
    assert torch.allclose(scaled, activations @ dequantize_fp8_blockwise(quantized, scale_inv).T, rtol=1e-5, atol=1e-5)
    # e4m3's own rounding of the activations: 2.6% for Gaussian inputs, whatever the width
    assert 0.015 < relative_error(scaled, exact) < 3e-2


def test_scaled_path_model_stays_close_to_the_dequantize_path(fp8_checkpoint):
    directory = fp8_checkpoint("v3")
    chunk_exact = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32, fp8_compute="dequantize")
    chunk_scaled = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32, fp8_compute="scaled")
    hidden = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # one MoE block, same routing: the activations' FP8 rounding is the only difference
        exact = chunk_exact.model.layers[1].mlp.experts(hidden, *routing_of(chunk_exact, hidden))
        scaled = chunk_scaled.model.layers[1].mlp.experts(hidden, *routing_of(chunk_exact, hidden))
    assert 0.01 < relative_error(scaled, exact) < 5e-2  # two products (gate_up, down), each rounding its inputs


def routing_of(model, hidden):
    decision = model.model.layers[1].mlp.gate(hidden)
    return decision.topk_indices, decision.topk_weights


def test_random_init_from_an_fp8_config():
    config = DeepseekMoEV3Config(**{k: v for k, v in json.loads(json.dumps(TINY_V3)).items()},
                                 quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})
    model = DeepseekMoEV3ForCausalLM(config)
    q_b = model.model.layers[0].self_attn.q_b_proj
    assert q_b.weight.dtype == FP8_DTYPE and 0.005 < q_b.dequantized_weight().std() < 0.05
    assert torch.isfinite(model(torch.randint(0, 256, (1, 5))).logits).all()


def test_bad_quantization_config_names_the_field():
    with pytest.raises(ValueError, match="quantization_config.fmt"):
        DeepseekMoEV3Config(quantization_config={"quant_method": "fp8", "fmt": "e5m2"})
    with pytest.raises(ValueError, match="weight_block_size"):
        DeepseekMoEV3Config(quantization_config={"quant_method": "fp8", "weight_block_size": [128]})
    with pytest.raises(ValueError, match="fp8_compute"):
        DeepseekMoEV3Config(fp8_compute="fast")


def test_lora_trains_on_a_frozen_fp8_base_and_merges_by_requantizing(fp8_checkpoint):
    model = DeepseekMoEV3ForCausalLM.from_pretrained(fp8_checkpoint("v3"))  # bf16 compute, FP8 weights
    base_q_b = model.model.layers[0].self_attn.q_b_proj.weight.clone()
    peft_model = get_peft_model(model, lora_config(r=4, lora_alpha=8))
    adapters = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert adapters and all("lora" in n and p.dtype == torch.float32 for n, p in adapters.items())
    with torch.no_grad():
        for name, param in adapters.items():
            if "_B" in name:
                param.normal_(0, 0.05)
    peft_model.train()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    embeddings = peft_model.get_input_embeddings()(ids).detach().requires_grad_(True)
    peft_model(inputs_embeds=embeddings, labels=ids).loss.backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    for family in ("q_b_proj.lora_A", "kv_b_proj.lora_B", "lora_gate_up_A", "lora_down_B", "shared_experts.down_proj.lora_A"):
        assert any(family in n and p.grad is not None and p.grad.abs().sum() > 0 for n, p in adapters.items()), family
    torch.optim.AdamW(adapters.values(), lr=1e-2).step()
    assert torch.equal(model.model.layers[0].self_attn.q_b_proj.weight.view(torch.uint8), base_q_b.view(torch.uint8))

    wrapped = peft_model.base_model.model.model
    q_b, chunk = wrapped.layers[0].self_attn.q_b_proj, wrapped.layers[1].mlp.experts.chunks[0]
    expected_q_b = quantize_fp8_blockwise(q_b.get_base_layer().dequantized_weight() + q_b.get_delta_weight("default"))
    delta = chunk.get_delta_weight("default")["down_proj"]
    expected_down = quantize_fp8_blockwise(chunk.get_base_layer().dequantized("down_proj") + delta)
    merged = peft_model.merge_and_unload()
    merged_q_b, merged_chunk = merged.model.layers[0].self_attn.q_b_proj, merged.model.layers[1].mlp.experts.chunks[0]
    assert isinstance(merged_q_b, FP8Linear) and merged_q_b.weight.dtype == FP8_DTYPE
    assert torch.equal(merged_q_b.weight.view(torch.uint8), expected_q_b[0].view(torch.uint8))
    assert torch.equal(merged_q_b.weight_scale_inv, expected_q_b[1])
    assert torch.equal(merged_chunk.down_proj.view(torch.uint8), expected_down[0].view(torch.uint8))
    assert torch.equal(merged_chunk.down_proj_scale_inv, expected_down[1])


def test_absorbed_decoding_with_an_fp8_kv_b_proj(fp8_checkpoint, monkeypatch):
    directory = fp8_checkpoint("v3")
    monkeypatch.setattr(fp8_cpu, "MAX_ROWS", 0)  # the dequantize path (test_fp8_cpu.py: the kernel's)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for mode in ("decode", "never"):
        model = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32, mla_absorb=mode)
        outputs[mode] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                       output_scores=True, return_dict_in_generate=True)
        if mode == "decode":  # kv_b_proj dequantized once, at the first absorbed step, then reused
            kept = [layer.self_attn.kv_b_proj.__dict__.get("_dequantized") for layer in model.model.layers]
            assert all(k is not None and k.dtype == torch.float32 for k in kept)
    assert torch.equal(outputs["decode"].sequences, outputs["never"].sequences)
    for a, b in zip(outputs["decode"].scores, outputs["never"].scores):
        assert relative_error(a, b) < 1e-5


def test_compiled_decoding_of_an_fp8_model_gives_the_eager_tokens(fp8_checkpoint):
    model = DeepseekMoEV3ForCausalLM.from_pretrained(fp8_checkpoint("v3"), dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, cache_implementation="static",
                  output_scores=True, return_dict_in_generate=True)
    eager = model.generate(ids, disable_compile=True, **kwargs)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only by default
    torch._dynamo.reset()
    compiled = model.generate(ids, compile_config=compile_config, **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.scores, eager.scores):
        assert relative_error(a, b) < 1e-5


def test_compiled_dequantization_of_partial_edge_blocks():
    # Inductor's own code for this scale expansion is wrong in torch 2.13 (CPU); ours runs as one opaque operator
    weight, scale_inv = quantize_fp8_blockwise(torch.randn(64, 160))
    compiled = torch.compile(dequantize_fp8_blockwise, fullgraph=True)
    assert torch.equal(compiled(weight, scale_inv), dequantize_fp8_blockwise(weight, scale_inv))
