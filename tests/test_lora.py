"""PEFT LoRA on every weight family, routed experts through ExpertChunkLora: training reaches the
adapters, merge_and_unload keeps the logits, adapters save and load."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from modeling_deepseek_moe import DeepseekMoEV1ForCausalLM, DeepseekMoEV2ForCausalLM, DeepseekMoEV3ForCausalLM
from modeling_deepseek_moe import lora
from modeling_deepseek_moe.lora import ExpertChunkLora, load_adapter, lora_config

from conftest import relative_error

CLASSES = {"v1": DeepseekMoEV1ForCausalLM, "v2": DeepseekMoEV2ForCausalLM, "v3": DeepseekMoEV3ForCausalLM}


def lora_model(official_checkpoint, family, seed=0, **config):
    directory, _, _ = official_checkpoint(family)
    model = CLASSES[family].from_pretrained(directory, dtype=torch.float32)
    peft_model = get_peft_model(model, lora_config(r=4, lora_alpha=8, **config))
    torch.manual_seed(seed)
    with torch.no_grad():  # non-zero B so that the adapters change the output
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_gate_up_B" in name or "lora_down_B" in name:
                param.normal_(0, 0.05)
    return directory, peft_model


@pytest.mark.parametrize("family", ["v1", "v2", "v3"])
def test_every_family_gets_adapters_and_trains_them(official_checkpoint, family):
    _, model = lora_model(official_checkpoint, family)
    wrapped = {name for name, module in model.named_modules() if isinstance(module, ExpertChunkLora)}
    assert wrapped == {"base_model.model.model.layers.1.mlp.experts.chunks.0", "base_model.model.model.layers.2.mlp.experts.chunks.0"} | (
        {"base_model.model.model.mtp.0.mlp.experts.chunks.0"} if family == "v3" else set()
    )
    model.train()
    ids = torch.randint(0, 256, (2, 10))
    hidden = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=hidden, labels=ids).loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora" in name for name in trainable)
    reached = [n for n, p in trainable.items() if p.grad is not None and p.grad.abs().sum() > 0 and "mtp" not in n]
    for family_name in ("self_attn", "shared_experts", "lora_gate_up_A", "lora_down_B", "layers.0.mlp.gate_proj"):
        assert any(family_name in name for name in reached), family_name
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("family", ["v2", "v3"])
def test_merge_and_unload_gives_the_adapted_logits(official_checkpoint, family):
    _, model = lora_model(official_checkpoint, family)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
        merged = model.merge_and_unload()(ids).logits
    assert relative_error(adapted, base) > 1e-3  # the adapters do something
    assert relative_error(merged, adapted) < 1e-5


def test_adapters_save_and_load(official_checkpoint, tmp_path):
    directory, model = lora_model(official_checkpoint, "v3")
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    fresh = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32)
    reloaded = load_adapter(fresh, str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_expert_adapter_equals_merged_weight_per_expert(official_checkpoint, monkeypatch):
    _, model = lora_model(official_checkpoint, "v2", targets=("experts",))
    layer = next(m for m in model.modules() if isinstance(m, ExpertChunkLora))
    base = layer.get_base_layer()
    rows = torch.randn(40, 64)
    offsets = torch.tensor([5, 10, 10, 18, 20, 22, 25, 28, 30, 31, 33, 35, 36, 38, 39, 40], dtype=torch.int32)
    weights = torch.rand(40)
    with torch.no_grad():
        adapted = layer(rows, offsets, weights)
        # A range of experts (a slice of the CPU dispatcher: experts 3-7, rows 10-27) uses their adapters.
        adapted_range = layer(rows[10:28], offsets[3:8] - 10, weights[10:28], experts=slice(3, 8))
        deltas = layer.get_delta_weight("default")
        for name, delta in deltas.items():
            base.merge_delta(name, delta)
        merged = base(rows, offsets, weights)
    assert relative_error(adapted, merged) < 1e-5
    assert relative_error(adapted_range, adapted[10:28]) < 1e-6


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_expert_adapters_keep_the_rows_not_a_float32_copy_for_the_backward(official_checkpoint, monkeypatch, dropout):
    """bf16 rows through float32 adapters (PEFT makes them float32): autograd keeps no float32 copy of the rows
    (the rank-r product is recomputed from them in the backward, with the same dropout mask), and the gradients
    are the plain product's."""
    _, model = lora_model(official_checkpoint, "v2", targets=("experts",), lora_dropout=dropout)
    layer = next(m for m in model.modules() if isinstance(m, ExpertChunkLora)).train()
    layer.get_base_layer().to(torch.bfloat16)
    rank = layer.r["default"]
    adapters = [p for p in layer.parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    rows = torch.randn(40, 64, dtype=torch.bfloat16, requires_grad=True)
    offsets = torch.tensor([5, 10, 10, 18, 20, 22, 25, 28, 30, 31, 33, 35, 36, 38, 39, 40], dtype=torch.int32)
    weights = torch.rand(40, dtype=torch.bfloat16)

    def float_copies_kept_and_gradients():
        saved = []
        torch.manual_seed(1)  # the same dropout mask in both runs
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            output = layer(rows, offsets, weights)
        gradients = torch.autograd.grad(output.float().square().sum(), [rows, *adapters])
        # a float32 tensor of a row per assignment and more than the rank's width: a copy of the rows (or of
        # the intermediate rows the down projection reads)
        copies = [t for t in saved if t.dtype == torch.float32 and 40 in t.shape and t.numel() > 40 * rank]
        return copies, gradients

    copies, gradients = float_copies_kept_and_gradients()
    monkeypatch.setattr(lora, "checkpoint", lambda function, *args, **kwargs: function(*args))
    plain_copies, plain_gradients = float_copies_kept_and_gradients()
    assert copies == [] and len(plain_copies) == 2  # gate_up's input rows and down's intermediate rows
    assert all(torch.equal(a, b) for a, b in zip(gradients, plain_gradients))


def test_peft_target_parameters_on_the_expert_stacks(official_checkpoint):
    """PEFT's own route (ParamWrapper around the stacked expert weights) works too, slower and heavier
    than ExpertChunkLora (benchmarks/bench_lora_memory.py)."""
    from peft import LoraConfig

    directory, _, _ = official_checkpoint("v3")
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=["gate_up_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
        assert relative_error(peft_model(ids).logits, before) > 1e-3  # the adapters act
    peft_model.train()
    peft_model(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad and "mtp" not in n]  # MTP: no loss here
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
