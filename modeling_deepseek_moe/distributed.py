"""Past one machine with PyTorch's own engines: FSDP2 (``torch.distributed.fsdp.fully_shard``) and expert
parallelism over ``torch.distributed`` (all-to-all token dispatch), together on a ``(dp, ep)`` mesh.

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

    With expert parallelism each expert chunk is its own FSDP unit over the ranks that hold the same
    experts (the "dp" dimension of the ``(dp, ep)`` mesh), so its gradients are averaged over the
    data-parallel replicas like every other gradient (the ``ep`` ranks' share is averaged in the
    forward, see :class:`ExpertParallel`)."""
    from torch.distributed.fsdp import fully_shard

    for experts in (m for m in model.modules() if getattr(m, "expert_parallel", None) is not None):
        for chunk in experts.chunks.values():
            fully_shard(chunk, mesh=experts.expert_parallel.mesh["dp"], **fsdp_kwargs)
    for unit in [*decoder_units(model), model]:
        fully_shard(unit, mesh=mesh, **fsdp_kwargs)
    return model


# ---------------------------------------------------------------------- expert parallelism
class ExpertParallel:
    """Expert parallelism (``ep_size``, as DeepSeek's configs name it) over a ``(dp, ep)`` device mesh of
    all ranks: in each block of ``ep_size`` consecutive ranks, rank r holds experts
    ``[r * E / ep, (r + 1) * E / ep)`` of every MoE layer; blocks are data-parallel replicas. A rank routes
    its own tokens, sends each (token, expert) row to the expert's rank in its block with
    ``all_to_all_single`` (autograd-aware), runs its experts' grouped products, and gets the results back
    the same way. Group-limited routing with ``n_group`` a multiple of ``ep_size`` keeps a token within
    ``topk_group`` groups, so it visits at most that many ranks (DeepSeek-V2/V3's device limit).

    Gradients: a rank's experts serve the tokens of all ``ep`` ranks of its block, so their weight
    gradients are scaled by ``1 / ep`` (:func:`scale_gradient`): every parameter then gets the gradient
    of the mean of the ranks' losses, which data parallelism (FSDP, DDP) averages further."""

    _meshes: dict = {}  # (world size, ep_size) -> DeviceMesh, built once for all MoE layers

    def __init__(self, mesh, experts: int) -> None:
        self.mesh = mesh
        self.group = mesh["ep"].get_group()
        self.size, self.rank = mesh["ep"].size(), mesh["ep"].get_local_rank()
        self.local_experts = experts // self.size

    @classmethod
    def of(cls, config) -> ExpertParallel | None:
        """The expert-parallel layout of ``config`` (None when ``ep_size`` is 1)."""
        if getattr(config, "ep_size", 1) <= 1:
            return None
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size() if dist.is_initialized() else None
        if world is None or world % config.ep_size:
            raise ValueError(f"`ep_size` ({config.ep_size}) needs torch.distributed initialised with a multiple of "
                             f"that many ranks (world size: {world or 'no process group'}); launch with "
                             f"torchrun --nproc-per-node {config.ep_size}")
        key = (world, config.ep_size)
        if key not in cls._meshes:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            with torch.device("cpu"):  # models are built on the meta device; the mesh's rank table is real
                cls._meshes[key] = init_device_mesh(device, (world // config.ep_size, config.ep_size),
                                                    mesh_dim_names=("dp", "ep"))
        return cls(cls._meshes[key], config.n_routed_experts)

    def run(self, chunk: nn.Module, rows: torch.Tensor, per_expert: torch.Tensor) -> torch.Tensor:
        """``rows`` ``[n, hidden]`` grouped by (global) expert with ``per_expert`` ``[E]`` rows each ->
        each row through its expert, ``[n, hidden]`` in the same order (unweighted)."""
        import torch.distributed as dist
        # The autograd-aware all-to-all torchtitan uses (torch.distributed.nn's is deprecated).
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        group = self.group
        send = per_expert.view(self.size, self.local_experts)  # [ranks, local experts]: rows to each rank's experts
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=group)  # [source ranks, my experts]: rows each rank sends me
        send_sizes, receive_sizes = send.sum(1).tolist(), received.sum(1).tolist()
        incoming = all_to_all_single_autograd(rows.contiguous(), receive_sizes, send_sizes, group)
        # Incoming rows are ordered by source rank, then expert: regroup them by expert for the products.
        experts = torch.arange(self.local_experts, device=rows.device).repeat(self.size)
        expert_of_row = torch.repeat_interleave(experts, received.reshape(-1))
        order = expert_of_row.argsort(stable=True)
        offsets = received.sum(0).cumsum(0).to(torch.int32)
        ones = rows.new_ones(order.numel())
        computed = chunk(incoming.index_select(0, order), offsets, ones)  # [incoming, hidden]
        back = torch.empty_like(computed).index_copy(0, order, computed)  # source order again
        return all_to_all_single_autograd(back, send_sizes, receive_sizes, group)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_gradient(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """``tensor`` itself in the forward; its gradient multiplied by ``scale`` in the backward."""
    return _ScaleGradient.apply(tensor, scale)
