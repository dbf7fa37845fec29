"""Past one machine, on this CPU: 2 processes with the gloo backend. FSDP2 training steps (each rank half
of the batch) equal single-process steps on the whole batch, with and without gradient checkpointing,
and the V3 bias update is the same on every rank and equals the single-process one."""

from __future__ import annotations

import pytest
import torch

from modeling_deepseek_moe import DeepseekMoEV3ForCausalLM
from modeling_deepseek_moe.distributed import decoder_units, fully_shard_model

from conftest import relative_error, spawn_ranks

STEPS = 2
BATCH = torch.Generator().manual_seed(0)
IDS = torch.randint(0, 256, (4, 12), generator=BATCH)


def train(model: DeepseekMoEV3ForCausalLM, ids: torch.Tensor) -> None:
    model.train()
    # SGD: an update is the averaged gradient itself (AdamW would amplify float noise in near-zero gradients)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(STEPS):
        model(ids, labels=ids).loss.backward()
        optimizer.step()  # the V3 bias update runs here (global optimizer post-step hook)
        optimizer.zero_grad()


def load(directory, checkpointing: bool, **overrides) -> DeepseekMoEV3ForCausalLM:
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32, bias_update_speed=0.01,
                                                     num_nextn_predict_layers=0, num_expert_chunks=2, **overrides)
    if checkpointing:
        model.activation_checkpointing_enable()
    return model


def _fsdp_rank(rank: int, world: int, port: int, directory: str, checkpointing: bool, ep_size: int, result: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = fully_shard_model(load(directory, checkpointing, ep_size=ep_size))
    rows = IDS.shape[0] // world
    train(model, IDS[rank * rows : (rank + 1) * rows])
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    torch.save(state, f"{result}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("world, checkpointing, ep_size", [(2, False, 1), (2, True, 1), (2, False, 2), (4, False, 2)])
def test_fsdp2_steps_equal_single_process_steps(tmp_path, official_checkpoint, world, checkpointing, ep_size):
    """ep_size 2: experts split over each block of 2 ranks; with 4 ranks, 2 data-parallel blocks (a (2, 2)
    mesh: expert chunks sharded over "dp", everything else over all ranks)."""
    directory, _, _ = official_checkpoint("v3")
    result = str(tmp_path / "state")
    spawn_ranks(_fsdp_rank, world, str(directory), checkpointing, ep_size, result)
    ranks = [torch.load(f"{result}.{rank}") for rank in range(world)]
    if ep_size > 1:  # the whole model: each rank's own experts, the rest from rank 0
        for rank in range(world):
            assert all(f".chunks.{1 - rank % 2}." not in name for name in ranks[rank])
        ranks[0].update({k: v for k, v in ranks[1].items() if ".chunks.1." in k})

    single = load(directory, checkpointing)
    before = {k: v.clone() for k, v in single.state_dict().items()}
    train(single, IDS)
    expected = single.state_dict()
    assert ranks[0].keys() == expected.keys()
    for name, tensor in expected.items():
        if tensor.is_floating_point() and not torch.equal(tensor, before[name]):  # compare what training changed
            assert relative_error(ranks[0][name] - before[name], tensor - before[name]) < 1e-4, name
        if "e_score_correction_bias" in name:  # buffers: identical on every rank, equal to one process's
            assert torch.equal(ranks[0][name], ranks[1][name])
            assert torch.allclose(ranks[0][name], tensor) and tensor.abs().max() > 0


def test_the_decoder_layer_is_the_wrap_unit(official_checkpoint):
    model = DeepseekMoEV3ForCausalLM.from_pretrained(official_checkpoint("v3")[0])
    units = decoder_units(model)
    assert units == [*model.model.layers, *model.model.mtp] and len(units) == 4


def _expert_parallel_rank(rank: int, world: int, port: int, directory: str, result: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32, ep_size=world,
                                                     num_nextn_predict_layers=0)
    experts = model.model.layers[1].mlp.experts
    assert list(experts.chunks) == [str(rank)] and experts.chunks[str(rank)].gate_up_proj.shape[0] == 8
    model.train()
    rows = IDS.shape[0] // world
    ids = IDS[rank * rows : (rank + 1) * rows]
    output = model(ids, labels=ids)
    output.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"logits": output.logits.detach(), "grads": grads}, f"{result}.{rank}")
    dist.destroy_process_group()


def test_expert_parallel_forward_and_backward_equal_one_process(tmp_path, official_checkpoint):
    directory, _, _ = official_checkpoint("v3")
    result = str(tmp_path / "ep")
    spawn_ranks(_expert_parallel_rank, 2, str(directory), result)
    ranks = [torch.load(f"{result}.{rank}") for rank in range(2)]

    single = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32, num_nextn_predict_layers=0,
                                                      num_expert_chunks=2)
    single.train()
    per_half = []
    for rank in range(2):  # each rank's half alone: its logits and its own (non-expert) gradients
        ids = IDS[rank * 2 : (rank + 1) * 2]
        single.zero_grad()
        output = single(ids, labels=ids)
        output.loss.backward()
        per_half.append((output.logits.detach(), {n: p.grad.clone() for n, p in single.named_parameters()}))
    for rank, (logits, grads) in enumerate(per_half):
        assert relative_error(ranks[rank]["logits"], logits) < 1e-5
        for name, grad in ranks[rank]["grads"].items():
            if ".experts.chunks." in name:  # a rank's experts serve both ranks' tokens: mean of both losses
                grad_of_both = (per_half[0][1][name] + per_half[1][1][name]) / 2
                assert name.split(".experts.chunks.")[1].startswith(f"{rank}.") and relative_error(grad, grad_of_both) < 1e-5, name
            else:
                assert relative_error(grad, grads[name]) < 1e-5, name
    assert any(".experts.chunks.1." in name for name in ranks[1]["grads"])


def test_expert_parallel_needs_a_process_group(official_checkpoint):
    with pytest.raises(ValueError, match=r"`ep_size` \(2\) needs torch.distributed initialised"):
        DeepseekMoEV3ForCausalLM.from_pretrained(official_checkpoint("v3")[0], ep_size=2)


def _ddp_rank(rank: int, world: int, port: int, directory: str, result: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # V3's default config: an MTP module (num_nextn_predict_layers=1) and no MTP loss. DDP without
    # find_unused_parameters fails at the second step if any trainable parameter received no gradient.
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert len(model.model.mtp) == 1
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
    rows = IDS.shape[0] // world
    ids = IDS[rank * rows : (rank + 1) * rows]
    for _ in range(3):
        ddp(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.save(model.lm_head.weight.detach(), f"{result}.{rank}")
    # DDP's reducer holds the process group: freed after destroy_process_group, with the GIL held, it joins
    # gloo's threads while one waits for the GIL to release the last all-reduce (a hang; see
    # examples/finetune.py's end_process_group). Freed first, the group goes with its GIL-releasing Python object.
    del ddp, model, optimizer
    dist.destroy_process_group()


def test_ddp_trains_v3_with_its_default_mtp_module_without_find_unused_parameters(tmp_path, official_checkpoint):
    directory, _, _ = official_checkpoint("v3")
    result = str(tmp_path / "head")
    spawn_ranks(_ddp_rank, 2, str(directory), result)
    assert torch.equal(torch.load(f"{result}.0"), torch.load(f"{result}.1"))  # the replicas stayed in step
