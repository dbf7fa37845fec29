"""QLoRA: a bitsandbytes 4-bit base (routed experts included) loaded from a float checkpoint, and LoRA on it.

The reference is bitsandbytes itself: the same float weights quantized and dequantized by
``bitsandbytes.functional``, loaded as a float32 model.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402
from peft import get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import BitsAndBytesConfig  # noqa: E402

from modeling_deepseek_moe import DeepseekMoEV1ForCausalLM, DeepseekMoEV2ForCausalLM, DeepseekMoEV3ForCausalLM  # noqa: E402
from modeling_deepseek_moe import bnb4bit, frozen  # noqa: E402
from modeling_deepseek_moe.experts import ExpertChunk  # noqa: E402
from modeling_deepseek_moe.fp8 import QUANTIZED_KEY  # noqa: E402
from modeling_deepseek_moe.layout import OfficialLayout  # noqa: E402
from modeling_deepseek_moe.lora import ExpertChunkLora, load_adapter, lora_config  # noqa: E402
from modeling_deepseek_moe.safetensors_io import CheckpointError  # noqa: E402
from modeling_deepseek_moe.synthetic import WHOLE_BLOCK_WIDTHS  # noqa: E402

from conftest import relative_error  # noqa: E402

CLASSES = {"v1": DeepseekMoEV1ForCausalLM, "v2": DeepseekMoEV2ForCausalLM, "v3": DeepseekMoEV3ForCausalLM}


def bnb_config(quant_type: str = "nf4", double_quant: bool = True, compute_dtype=torch.float32) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_4bit(directory, family: str, **config):
    return CLASSES[family].from_pretrained(directory, dtype=torch.float32, quantization_config=bnb_config(**config))


def quantized_official_keys(model) -> set[str]:
    """DeepSeek's keys of every tensor the 4-bit model holds in 4 bits (Linear4bit weights, expert parts)."""
    names = [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    names += [f"{name}.{projection}" for name, module in model.named_modules() if isinstance(module, ExpertChunk)
              for projection in module.PARTS]
    layout = OfficialLayout(model.config)
    return {key for name in names for key, _ in layout.official_items(name, model.get_parameter(name))}


def bitsandbytes_round_trip(tensor: torch.Tensor, quant_type: str, double_quant: bool) -> torch.Tensor:
    """``tensor`` through bitsandbytes' quantize_4bit and dequantize_4bit, seen as rows of one block each (the
    same codes as in its own shape; bitsandbytes 0.50's CPU kernel misplaces block scales of narrower rows)."""
    rows = tensor.reshape(-1, bnb4bit.BLOCKSIZE)
    packed, state = F.quantize_4bit(rows, blocksize=bnb4bit.BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type)
    return F.dequantize_4bit(packed, state).view(tensor.shape)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_every_expert_is_stored_in_4_bits(official_checkpoint, quant_type, double_quant):
    directory, config, state = official_checkpoint("v3", **WHOLE_BLOCK_WIDTHS["v3"])
    model = load_4bit(directory, "v3", quant_type=quant_type, double_quant=double_quant)
    chunks = [module for module in model.modules() if isinstance(module, ExpertChunk)]
    assert len(chunks) == 3  # two MoE layers and the MTP layer
    hidden, intermediate = config["hidden_size"], config["moe_intermediate_size"]
    experts = config["n_routed_experts"]
    blocks = hidden * intermediate // bnb4bit.BLOCKSIZE  # per expert part
    for chunk in chunks:
        for projection, parts in chunk.PARTS.items():
            codes = getattr(chunk, projection)
            assert codes.dtype == torch.uint8 and not codes.requires_grad
            assert codes.nbytes == experts * parts * hidden * intermediate // 2  # two 4-bit codes per byte
            absmax = getattr(chunk, projection + "_absmax")
            if double_quant:  # one uint8 per block, padded to whole nested blocks of 256
                assert absmax.dtype == torch.uint8 and absmax.nbytes == experts * parts * 256 * -(-blocks // 256)
                assert getattr(chunk, projection + "_nested_absmax").dtype == torch.float32
            else:
                assert absmax.dtype == torch.float32 and absmax.nbytes == experts * parts * blocks * 4
    linear_4bit = {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert any("self_attn.kv_b_proj" in name for name in linear_4bit)
    assert any("shared_experts.down_proj" in name for name in linear_4bit)
    assert "model.layers.0.mlp.gate_proj" in linear_4bit  # a dense layer
    assert all(module.weight.quant_state.quant_type == quant_type for name, module in model.named_modules()
               if name in linear_4bit)
    # transformers' defaults: the output head stays float; the router and V3's bias are never quantized
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    router = model.model.layers[1].mlp.gate
    assert router.weight.dtype == torch.float32 and router.e_score_correction_bias.dtype == torch.float32
    # every attention and MLP projection of DeepSeek's layout is held in 4 bits
    assert {key for key in state if QUANTIZED_KEY.search(key)} <= quantized_official_keys(model)
    assert model.is_loaded_in_4bit and model.hf_quantizer is not None


def test_stacked_dequantize_equals_bitsandbytes_per_tensor(official_checkpoint):
    """The experts of a slice dequantize in one bitsandbytes call to what bitsandbytes gives each of
    DeepSeek's per-expert tensors quantized alone (double quantization included), for widths that are not
    whole blocks too."""
    directory, _, state = official_checkpoint("v2")  # moe_intermediate_size 32: down_proj [64, 32]
    model = load_4bit(directory, "v2")
    chunk = model.model.layers[1].mlp.experts.chunks[0]
    experts = [1, 2, 3, 7, 12]  # a consecutive run and gaps
    dense = bnb4bit.dequantize_experts(chunk.stack_4bit("gate_up_proj"), experts, chunk.shapes["gate_up_proj"][1:],
                                       chunk.bnb4bit, torch.float32)
    for row, expert in enumerate(experts):
        for part, name in enumerate(("gate", "up")):
            expected = bitsandbytes_round_trip(state[f"model.layers.1.mlp.experts.{expert}.{name}_proj.weight"], "nf4", True)
            assert torch.equal(dense[row].chunk(2)[part], expected)
    down = chunk.dequantized("down_proj", experts=slice(4, 6))
    assert torch.equal(down[1], bitsandbytes_round_trip(state["model.layers.1.mlp.experts.5.down_proj.weight"], "nf4", True))


@pytest.mark.parametrize("family", ["v1", "v2", "v3"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_logits_equal_the_bitsandbytes_dequantized_model(official_checkpoint, family, quant_type):
    directory, _, _ = official_checkpoint(family, **WHOLE_BLOCK_WIDTHS[family])
    model = load_4bit(directory, family, quant_type=quant_type)
    keys = quantized_official_keys(model)

    def round_trip(state):
        for key in keys:
            state[key] = bitsandbytes_round_trip(state[key], quant_type, True)

    reference_directory, _, _ = official_checkpoint(family, edit_state=round_trip, **WHOLE_BLOCK_WIDTHS[family])
    reference = CLASSES[family].from_pretrained(reference_directory, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(model(ids).logits, reference(ids).logits) < 1e-5
        # and the 4-bit model is not the float one
        original = CLASSES[family].from_pretrained(directory, dtype=torch.float32)
        assert relative_error(model(ids).logits, original(ids).logits) > 1e-3


def test_row_tiles_of_one_expert_give_the_same_product_and_gradients(official_checkpoint, monkeypatch):
    """An expert over the dequantization budget goes by row tiles (here one row at a time), forward and
    backward; so do the Linear4bit layers with gradients on the CPU."""
    directory, _, _ = official_checkpoint("v2", **WHOLE_BLOCK_WIDTHS["v2"])
    model = load_4bit(directory, "v2").train()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))

    def logits_and_input_gradient():
        hidden = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=hidden).logits
        logits.square().mean().backward()
        return logits.detach(), hidden.grad

    whole = logits_and_input_gradient()
    monkeypatch.setattr(bnb4bit, "DEQUANTIZE_BUDGET_BYTES", 1)
    tiled = logits_and_input_gradient()
    # fp32 sums over one-row tiles of every 4-bit product
    assert relative_error(tiled[0], whole[0]) < 1e-5 and relative_error(tiled[1], whole[1]) < 3e-5


def qlora_model(directory, family: str = "v3", **targets):
    model = prepare_model_for_kbit_training(load_4bit(directory, family), use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, lora_config(r=4, lora_alpha=8, **targets))
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B so that the adapters change the output
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_gate_up_B" in name or "lora_down_B" in name:
                param.normal_(0, 0.05)
    return peft_model


def test_gradients_reach_adapters_and_inputs_and_no_float_copy_of_frozen_experts_is_kept(official_checkpoint):
    directory, config, _ = official_checkpoint("v3", **WHOLE_BLOCK_WIDTHS["v3"])
    model = qlora_model(directory)
    assert {name for name, module in model.named_modules() if isinstance(module, ExpertChunkLora)}
    model.train()
    ids = torch.randint(0, 256, (2, 10))
    hidden = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    expert_shapes = {(2 * config["moe_intermediate_size"], config["hidden_size"]),
                     (config["hidden_size"], config["moe_intermediate_size"])}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor):
        loss = model(inputs_embeds=hidden, labels=ids).loss
    loss.backward()
    assert not [t for t in saved if t.is_floating_point() and t.dim() == 3 and tuple(t.shape[1:]) in expert_shapes]
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert all("lora" in name for name in trainable)
    reached = [name for name, param in trainable.items() if param.grad is not None and param.grad.abs().sum() > 0]
    for family_name in ("self_attn", "shared_experts", "lora_gate_up_A", "lora_down_B", "layers.0.mlp.gate_proj"):
        assert any(family_name in name for name in reached), family_name
    assert all(name in reached for name in trainable if "mtp" not in name)  # MTP: not in this loss
    assert all(param.grad is None for param in model.parameters() if not param.requires_grad)


def test_adapters_save_and_load_on_the_4bit_base(official_checkpoint, tmp_path):
    directory, _, _ = official_checkpoint("v3", **WHOLE_BLOCK_WIDTHS["v3"])
    model = qlora_model(directory)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(load_4bit(directory, "v3"), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_trainer_lowers_the_loss(official_checkpoint, tmp_path):
    from transformers import Trainer, TrainingArguments

    directory, _, _ = official_checkpoint("v2", **WHOLE_BLOCK_WIDTHS["v2"])
    model = prepare_model_for_kbit_training(load_4bit(directory, "v2"))
    model = get_peft_model(model, lora_config(r=8, lora_alpha=16, targets=("attention", "shared", "experts")))
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    with torch.no_grad():
        before = model(ids, labels=ids).loss.item()
    arguments = TrainingArguments(str(tmp_path / "run"), max_steps=15, learning_rate=1e-2, per_device_train_batch_size=4,
                                  report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=arguments, train_dataset=rows).train()
    model.eval()
    with torch.no_grad():
        assert model(ids, labels=ids).loss.item() < before - 0.1


def test_generation_reads_the_4bit_latent_projection(official_checkpoint):
    """MLA's absorbed decoding reads kv_b_proj's weight itself: the 4-bit one is dequantized for it."""
    directory, _, _ = official_checkpoint("v2", **WHOLE_BLOCK_WIDTHS["v2"])
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    tokens = {}
    for absorb in ("decode", "never"):
        model = CLASSES["v2"].from_pretrained(directory, dtype=torch.float32, quantization_config=bnb_config(),
                                              mla_absorb=absorb)
        tokens[absorb] = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens["decode"], tokens["never"])


def test_saving_a_4bit_model_is_refused(official_checkpoint, tmp_path):
    directory, _, _ = official_checkpoint("v2")
    with pytest.raises(NotImplementedError, match="merge-lora"):
        load_4bit(directory, "v2").save_pretrained(tmp_path / "saved")


def test_8bit_is_refused_naming_why(official_checkpoint):
    directory, _, _ = official_checkpoint("v2")
    with pytest.raises(ValueError, match="load_in_4bit"):
        CLASSES["v2"].from_pretrained(directory, quantization_config=BitsAndBytesConfig(load_in_8bit=True))


@pytest.mark.parametrize("edit,message", [
    (lambda state: state.pop("model.layers.1.mlp.experts.3.up_proj.weight"), "model.layers.1.mlp.experts.3.up_proj.weight"),
    (lambda state: state.update({"model.layers.2.mlp.experts.5.down_proj.weight": torch.zeros(64, 16)}),
     r"model.layers.2.mlp.experts.5.down_proj.weight.*shape \[64, 16\], expected \[64, 64\]"),
    (lambda state: state.pop("model.layers.1.self_attn.o_proj.weight"), "model.layers.1.self_attn.o_proj.weight"),
])
def test_a_missing_or_misshapen_tensor_is_named(official_checkpoint, edit, message):
    directory, _, _ = official_checkpoint("v2", edit_state=edit, **WHOLE_BLOCK_WIDTHS["v2"])
    with pytest.raises(CheckpointError, match=message):
        load_4bit(directory, "v2")


def adapter_deltas(peft_model) -> dict[str, torch.Tensor]:
    """``{DeepSeek key: scaling * B @ A}`` of every LoRA module of ``peft_model``, as PEFT computes it."""
    layout = OfficialLayout(peft_model.get_base_model().config)
    deltas = {}
    for name, module in peft_model.named_modules():
        name = name.removeprefix("base_model.model.")
        if isinstance(module, ExpertChunkLora):
            for projection, delta in module.get_delta_weight("default").items():
                deltas.update(layout.official_items(f"{name}.{projection}", delta))
        elif hasattr(module, "lora_A") and "default" in module.lora_A:
            deltas.update(layout.official_items(f"{name}.weight", module.get_delta_weight("default").float()))
    return deltas


@pytest.mark.parametrize("base", ["float", "fp8"])
def test_merge_lora_applies_a_qlora_adapter_to_the_full_precision_base(official_checkpoint, tmp_path, base):
    """The adapter trained on the 4-bit base merges into the float (or FP8) checkpoint: merged - base is the
    adapter's own delta, the one it adds to the dequantized 4-bit weights."""
    from modeling_deepseek_moe.conversion import merge_lora
    from modeling_deepseek_moe.fp8 import dequantize_fp8_blockwise
    from modeling_deepseek_moe.safetensors_io import checkpoint_files, open_safetensors
    from modeling_deepseek_moe.synthetic import write_fp8_official_checkpoint

    directory, _, _ = official_checkpoint("v3", **WHOLE_BLOCK_WIDTHS["v3"])
    model = qlora_model(directory)
    model.save_pretrained(tmp_path / "adapter")
    deltas = adapter_deltas(model)
    if base == "fp8":
        directory = tmp_path / "fp8-base"
        write_fp8_official_checkpoint(directory, "v3", **WHOLE_BLOCK_WIDTHS["v3"])
    merge_lora(str(directory), str(tmp_path / "adapter"), str(tmp_path / "merged"), quiet=True)

    def read(folder):
        tensors = {}
        for file in checkpoint_files(str(folder)):
            with open_safetensors(str(folder / file)) as handle:
                tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
        return {key: dequantize_fp8_blockwise(tensor, tensors[key.removesuffix(".weight") + ".weight_scale_inv"])
                if tensor.dtype == torch.float8_e4m3fn else tensor.float() for key, tensor in tensors.items()}

    before, after = read(directory), read(tmp_path / "merged")
    assert any("experts.7.up_proj" in key for key in deltas) and any("kv_b_proj" in key for key in deltas)
    for key, delta in deltas.items():
        if base == "float":
            assert relative_error(after[key] - before[key], delta) < 1e-5, key
        else:  # re-quantized to FP8: within e4m3's rounding (3 mantissa bits) of base + delta
            error = relative_error(after[key], before[key] + delta)
            assert error < 0.05 and error < relative_error(after[key], before[key]), key


def test_merge_and_unload_requantizes_each_expert_with_its_delta(official_checkpoint):
    """PEFT's merge_and_unload on the 4-bit base: each expert's weight is dequantized, gets the adapter's
    delta and is quantized again by bitsandbytes, part by part (the merged model is 4-bit still)."""
    directory, _, _ = official_checkpoint("v3", **WHOLE_BLOCK_WIDTHS["v3"])
    model = qlora_model(directory)
    layer = next(module for module in model.modules() if isinstance(module, ExpertChunkLora))
    chunk = layer.get_base_layer()
    expected = {projection: chunk.dequantized(projection) + delta for projection, delta in layer.get_delta_weight("default").items()}
    merged_model = model.merge_and_unload()
    assert chunk.gate_up_proj.dtype == torch.uint8
    assert not any(isinstance(module, ExpertChunkLora) for module in merged_model.modules())
    for projection, values in expected.items():
        merged = chunk.dequantized(projection)
        for expert in range(values.shape[0]):
            for part, part_values in enumerate(values[expert].chunk(chunk.PARTS[projection])):
                round_trip = bitsandbytes_round_trip(part_values.detach(), "nf4", True)
                assert torch.equal(merged[expert].chunk(chunk.PARTS[projection])[part], round_trip)


def test_an_fp8_checkpoint_is_refused_naming_the_way_out(tmp_path):
    from modeling_deepseek_moe.synthetic import write_fp8_official_checkpoint

    write_fp8_official_checkpoint(tmp_path / "fp8", "v3", **WHOLE_BLOCK_WIDTHS["v3"])
    with pytest.raises(CheckpointError, match="already quantized.*deepseek-moe-convert dequantize"):
        load_4bit(tmp_path / "fp8", "v3")


def test_llm_int8_skip_modules_keeps_those_projections_float(official_checkpoint):
    directory, _, _ = official_checkpoint("v2", **WHOLE_BLOCK_WIDTHS["v2"])
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["lm_head", r".*\.shared_experts"])
    model = CLASSES["v2"].from_pretrained(directory, dtype=torch.float32, quantization_config=config)
    shared = model.model.layers[1].mlp.shared_experts
    assert type(shared.up_proj) is torch.nn.Linear and shared.up_proj.weight.dtype == torch.float32
    assert isinstance(model.model.layers[1].self_attn.o_proj, bnb.nn.Linear4bit)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantizing_into_the_reused_buffer_equals_bitsandbytes(quant_type, dtype):
    values = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    rows = values.reshape(-1, bnb4bit.BLOCKSIZE)
    packed, state = F.quantize_4bit(rows, blocksize=bnb4bit.BLOCKSIZE, quant_type=quant_type)
    expected = F.dequantize_4bit(packed, F.QuantState(absmax=state.absmax, shape=rows.shape, blocksize=bnb4bit.BLOCKSIZE,
                                                      quant_type=quant_type, dtype=dtype)).view(-1)
    buffer = frozen.scratch(values.numel(), dtype, values.device)
    written = bnb4bit.dequantize_codes(packed, state.absmax, quant_type, dtype, out=buffer.fill_(float("nan")))
    assert written.data_ptr() == buffer.data_ptr() and torch.equal(written, expected)


def test_linear4bit_layers_with_gradients_run_by_tiles_and_equal_bitsandbytes(official_checkpoint, monkeypatch):
    """Linear4bit layers become TiledLinear4bit (still bitsandbytes' class for transformers and PEFT): with
    gradients on the CPU their tiles go through the thread's reused buffer, and forward and input gradient
    equal bitsandbytes' own Linear4bit forward (and its MatMul4Bit backward)."""
    directory, _, _ = official_checkpoint("v2", **WHOLE_BLOCK_WIDTHS["v2"])
    model = load_4bit(directory, "v2")
    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert layers and all(type(layer) is bnb4bit.TiledLinear4bit for layer in layers)
    monkeypatch.setattr(bnb4bit, "DEQUANTIZE_BUDGET_BYTES", 4096)  # several tiles per layer
    for layer in layers:
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0), requires_grad=True)
        grad = torch.randn(2, 5, layer.out_features, generator=torch.Generator().manual_seed(1))
        results = []
        for forward in (layer.forward, lambda v, layer=layer: bnb.nn.Linear4bit.forward(layer, v)):
            x.grad = None
            output = forward(x)
            output.backward(grad)
            results.append((output.detach(), x.grad.clone()))
        assert relative_error(results[0][0], results[1][0]) < 1e-6 and relative_error(results[0][1], results[1][1]) < 1e-6
    assert type(pickle.loads(pickle.dumps(layers[0]))) is bnb4bit.TiledLinear4bit


def test_a_qlora_step_on_the_cpu_dequantizes_into_one_reused_buffer(official_checkpoint):
    """No 4-bit product allocates a buffer per tile (bitsandbytes' dequantize_4bit op allocates its output):
    every tile of a training step is written into the thread's scratch buffer."""
    directory, _, _ = official_checkpoint("v3", **WHOLE_BLOCK_WIDTHS["v3"])
    model = qlora_model(directory).train()
    ids = torch.randint(0, 256, (2, 10))
    calls = []

    class CountDequantize(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    with CountDequantize():
        model(ids, labels=ids).loss.backward()
    assert calls and not [name for name in calls if "dequantize_4bit" in name]


def test_4bit_experts_keep_their_activations_in_the_compute_dtype(official_checkpoint):
    """Under prepare_model_for_kbit_training the stream is float32; with bf16 compute the experts' saved
    activations are bf16 (half the memory), and the block returns float32."""
    directory, config, _ = official_checkpoint("v3", **WHOLE_BLOCK_WIDTHS["v3"])
    model = prepare_model_for_kbit_training(load_4bit(directory, "v3", compute_dtype=torch.bfloat16),
                                            use_gradient_checkpointing=False).train()
    chunk = next(module for module in model.modules() if isinstance(module, ExpertChunk))
    rows = torch.randn(12, config["hidden_size"], requires_grad=True)
    offsets = torch.tensor([4] * 4 + [12] * (chunk.num_experts - 4), dtype=torch.int32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor):
        output = chunk(rows, offsets, torch.rand(12))
    activations = [t for t in saved if t.is_floating_point() and t.shape[-1] in (config["moe_intermediate_size"], 2 * config["moe_intermediate_size"])]
    assert output.dtype == torch.float32 and activations and all(t.dtype == torch.bfloat16 for t in activations)


def test_dequantizing_into_a_buffer_without_the_native_function_copies(monkeypatch):
    """A bitsandbytes build whose library lacks the CPU function: the values are dequantized and copied."""
    monkeypatch.setattr(bnb4bit, "_native_cpu_dequantize", lambda quant_type, dtype: None)
    values = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    packed, state = F.quantize_4bit(values.reshape(-1, bnb4bit.BLOCKSIZE), blocksize=bnb4bit.BLOCKSIZE, quant_type="nf4")
    buffer = torch.full((values.numel(),), float("nan"))
    written = bnb4bit.dequantize_codes(packed, state.absmax, "nf4", torch.float32, out=buffer)
    assert written.data_ptr() == buffer.data_ptr() and torch.equal(written, bnb4bit.dequantize_codes(packed, state.absmax, "nf4", torch.float32))
