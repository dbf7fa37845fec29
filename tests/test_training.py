"""Training: aux loss in the model loss, V3 bias updates once per optimizer step, router statistics,
gradient checkpointing, Trainer and PEFT."""

from __future__ import annotations

import pytest
import torch

from modeling_deepseek_moe import DeepseekMoEV1ForCausalLM, DeepseekMoEV2ForCausalLM, DeepseekMoEV3ForCausalLM
from modeling_deepseek_moe.training import RouterStatsCallback, max_violation, routers

from conftest import relative_error, spawn_ranks

CLASSES = {"v1": DeepseekMoEV1ForCausalLM, "v2": DeepseekMoEV2ForCausalLM, "v3": DeepseekMoEV3ForCausalLM}


def batch(seed, size=2, length=12):
    return torch.randint(0, 256, (size, length), generator=torch.Generator().manual_seed(seed))


def load(official_checkpoint, family, **overrides):
    directory, _, _ = official_checkpoint(family)
    return CLASSES[family].from_pretrained(directory, dtype=torch.float32, **overrides).train()


@pytest.mark.parametrize("family", ["v1", "v2", "v3"])
def test_loss_is_language_model_loss_plus_balance_losses(official_checkpoint, family):
    model = load(official_checkpoint, family)
    ids = batch(0)
    out = model(ids, labels=ids, output_router_logits=True)
    model.eval()
    with torch.no_grad():
        plain = model(ids, labels=ids)
    assert plain.aux_loss is None
    layers = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    assert len(out.router_logits) == len(layers) and out.router_logits[0].shape == (24, 16)
    assert out.aux_loss > 0
    assert out.loss.item() == pytest.approx(plain.loss.item() + out.aux_loss.item(), rel=1e-5)


@pytest.mark.parametrize("family", ["v1", "v2", "v3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_reaches_every_trained_weight(official_checkpoint, family, dtype):
    directory, _, _ = official_checkpoint(family)
    model = CLASSES[family].from_pretrained(directory, dtype=dtype).train()
    ids = batch(1)
    model(ids, labels=ids).loss.backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None and "mtp" not in n]
    assert without_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", ["v1", "v2", "v3"])
def test_gradient_checkpointing_gives_the_same_gradients_and_loads(official_checkpoint, family):
    grads, loads = [], []
    for checkpointing in (False, True):
        model = load(official_checkpoint, family)
        if checkpointing:
            model.activation_checkpointing_enable()
        ids = batch(2)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        loads.append([r.step_load.clone() for r in routers(model).values()])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert relative_error(grads[1][name], grads[0][name]) < 1e-5, name
    for plain, recomputed in zip(*loads):
        assert torch.equal(plain, recomputed)  # recomputation does not count tokens twice


def test_bias_update_once_per_optimizer_step_with_accumulation(official_checkpoint):
    model = load(official_checkpoint, "v3", bias_update_speed=0.01)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    router = model.model.layers[1].mlp.gate
    before = router.e_score_correction_bias.clone()
    expected_load = torch.zeros(16)
    for micro in range(2):  # gradient accumulation: two micro-batches, one optimizer step
        ids = batch(10 + micro)
        model(ids, labels=ids).loss.backward()
        expected_load += router.last_forward_load
        assert torch.equal(router.e_score_correction_bias, before)  # nothing moves before the step
    optimizer.step()
    expected = before - 0.01 * torch.sign(expected_load - expected_load.mean())
    assert torch.allclose(router.e_score_correction_bias, expected, atol=1e-7, rtol=0)
    assert torch.equal(router.last_step_load, expected_load) and router.step_load.sum() == 0
    assert "e_score_correction_bias" not in {n.split(".")[-1] for n, _ in model.named_parameters()}
    assert router.e_score_correction_bias.dtype == torch.float32
    optimizer.zero_grad()
    optimizer.step()  # a step without forward moves nothing
    assert torch.allclose(router.e_score_correction_bias, expected, atol=1e-7, rtol=0)


def test_zero_speed_freezes_the_bias(official_checkpoint):
    model = load(official_checkpoint, "v3", bias_update_speed=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [r.e_score_correction_bias.clone() for r in routers(model).values()]
    ids = batch(3)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(torch.equal(r.e_score_correction_bias, b) for r, b in zip(routers(model).values(), before))


def test_router_statistics_report_loads_and_max_violation(official_checkpoint):
    model = load(official_checkpoint, "v2")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    ids = batch(4)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    stats = model.model.router_statistics()
    assert set(stats) == {"layers.1.mlp", "layers.2.mlp"}
    layer = stats["layers.1.mlp"]
    assert sum(layer["last_step_tokens_per_expert"]) == 24 * 4
    load_tensor = torch.tensor(layer["last_step_tokens_per_expert"])
    assert layer["last_step_max_vio"] == pytest.approx(float(load_tensor.max() / load_tensor.mean() - 1))
    assert max_violation(torch.ones(16)) == 0.0


def test_trainer_with_accumulation_moves_bias_and_logs_balance(official_checkpoint, tmp_path):
    from datasets_free import TokenDataset
    from transformers import Trainer, TrainingArguments

    model = load(official_checkpoint, "v3")
    before = [r.e_score_correction_bias.clone() for r in routers(model).values()]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        logging_steps=1, learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(16, 12), callbacks=[RouterStatsCallback()])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "moe/max_vio" in entry and "loss" in entry]
    assert len(logged) == 3 and all(entry["moe/max_vio"] >= 0 for entry in logged)
    used = [(r, b) for r, b in zip(routers(model).values(), before) if r.last_step_load.sum() > 0]
    assert len(used) == 2  # the two MoE layers; the MTP module is not run by the causal-LM loss
    moved = [(r.e_score_correction_bias - b).abs().max().item() for r, b in used]
    # three optimizer steps of +-0.001 each (not six: accumulation steps do not count)
    assert all(0 < m <= 0.003 + 1e-7 for m in moved)


def _bias_update_on_rank(rank: int, world: int, port: int, result_file: str) -> None:
    import torch.distributed as dist

    from modeling_deepseek_moe import DeepseekMoEV3Config
    from modeling_deepseek_moe.moe import MoEBlock
    from modeling_deepseek_moe.training import finish_optimizer_step

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    moe = MoEBlock(DeepseekMoEV3Config(hidden_size=16, moe_intermediate_size=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1))
    moe.gate.step_load.copy_(torch.arange(8.0) if rank == 0 else torch.arange(8.0).flip(0) * 3)  # different per rank
    finish_optimizer_step(moe)
    torch.save(moe.gate.e_score_correction_bias, f"{result_file}.{rank}")
    dist.destroy_process_group()


def test_bias_update_all_reduces_loads_across_ranks(tmp_path):
    result = str(tmp_path / "bias")
    spawn_ranks(_bias_update_on_rank, 2, result)
    biases = [torch.load(f"{result}.{rank}") for rank in range(2)]
    total = torch.arange(8.0) + torch.arange(8.0).flip(0) * 3
    expected = -0.001 * torch.sign(total - total.mean())
    assert torch.equal(biases[0], biases[1])
    assert torch.allclose(biases[0], expected)
