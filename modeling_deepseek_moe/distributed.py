"""Past one machine with PyTorch's own engines: FSDP2 (``torch.distributed.fsdp.fully_shard``) and expert
parallelism over ``torch.distributed`` (all-to-all token dispatch).

Each decoder layer (and V3's MTP module) is one FSDP unit, the embedding, final norm and head belong to
the root unit; parameters are sharded over the mesh, gathered layer by layer in forward and backward,
gradients reduce-scattered (averaged). Router buffers (V3's correction bias, load counters) are not
parameters: they stay whole on every rank, and the bias update all-reduces the loads of all ranks, so
every rank applies the same update. Launch with ``torchrun`` (see ``examples/train_distributed.py``).
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP wraps one by one: every decoder layer and MTP module of ``model``."""
    base = getattr(model, "model", model)
    return [*base.layers, *getattr(base, "mtp", [])]


def fully_shard_model(model: nn.Module, mesh=None, **fsdp_kwargs) -> nn.Module:
    """Shard ``model`` with FSDP2, the decoder layer as the wrap unit; ``mesh`` (a 1-D DeviceMesh, default:
    all ranks on the current device type) and ``fsdp_kwargs`` (``mp_policy``, ``reshard_after_forward``,
    ``offload_policy``) go to ``fully_shard``. Returns the same (now sharded) model.

    With expert parallelism the routed experts are already split over the ranks: FSDP leaves them out,
    and their gradients (summed over every rank's tokens by the all-to-all) are divided by the number of
    ranks, so that they are averaged over the global batch like the gradients FSDP reduces."""
    from torch.distributed.fsdp import fully_shard

    parallel = [module for module in model.modules() if getattr(module, "expert_parallel", None) is not None]
    expert_params = {param for module in parallel for param in module.parameters()}
    for param in expert_params:
        param.register_hook(lambda grad, ranks=parallel[0].expert_parallel.size: grad / ranks)
    for unit in [*decoder_units(model), model]:
        fully_shard(unit, mesh=mesh, ignored_params=expert_params or None, **fsdp_kwargs)
    return model


# ---------------------------------------------------------------------- expert parallelism
class ExpertParallel:
    """Expert parallelism over all ranks of the default process group (``ep_size`` = world size, as
    DeepSeek's configs name it): rank r holds experts ``[r * E / ep, (r + 1) * E / ep)`` of every MoE layer,
    routes its own tokens, sends each (token, expert) row to the expert's rank with
    ``all_to_all_single`` (autograd-aware), runs its experts' grouped products, and gets the results
    back the same way. Group-limited routing with ``n_group`` a multiple of ``ep_size`` keeps a token
    within ``topk_group`` groups, so it visits at most that many ranks (DeepSeek-V2/V3's device limit)."""

    def __init__(self, size: int, rank: int, experts: int) -> None:
        self.size, self.rank, self.local_experts = size, rank, experts // size

    @classmethod
    def of(cls, config) -> ExpertParallel | None:
        """The expert-parallel layout of ``config`` (None when ``ep_size`` is 1)."""
        if getattr(config, "ep_size", 1) <= 1:
            return None
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() != config.ep_size:
            world = dist.get_world_size() if dist.is_initialized() else "no process group"
            raise ValueError(f"`ep_size` ({config.ep_size}) needs torch.distributed initialised with as many ranks "
                             f"(world size: {world}); launch with torchrun --nproc-per-node {config.ep_size}")
        return cls(config.ep_size, dist.get_rank(), config.n_routed_experts)

    def run(self, chunk: nn.Module, rows: torch.Tensor, per_expert: torch.Tensor) -> torch.Tensor:
        """``rows`` ``[slots, hidden]`` grouped by (global) expert with ``per_expert`` ``[E]`` rows each ->
        each row through its expert, ``[slots, hidden]`` in the same order (unweighted)."""
        import torch.distributed as dist
        # The autograd-aware all-to-all torchtitan uses (torch.distributed.nn's is deprecated).
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        group = dist.group.WORLD
        send = per_expert.view(self.size, self.local_experts)  # [ranks, local experts]: rows to each rank's experts
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send)  # [source ranks, my experts]: rows each rank sends me
        send_sizes, receive_sizes = send.sum(1).tolist(), received.sum(1).tolist()
        incoming = all_to_all_single_autograd(rows.contiguous(), receive_sizes, send_sizes, group)
        # Incoming rows are ordered by source rank, then expert: regroup them by expert for the products.
        experts = torch.arange(self.local_experts, device=rows.device).repeat(self.size)
        expert_of_row = torch.repeat_interleave(experts, received.reshape(-1))
        order = expert_of_row.argsort(stable=True)
        offsets = received.sum(0).cumsum(0).to(torch.int32)
        ones = rows.new_ones(order.numel())
        computed = chunk(incoming.index_select(0, order).t(), offsets, ones).t()  # [incoming, hidden]
        back = torch.empty_like(computed).index_copy(0, order, computed)  # source order again
        return all_to_all_single_autograd(back, send_sizes, receive_sizes, group)
