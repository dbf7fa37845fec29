"""Feed-forward compute: the dense MLP (dense layers, shared experts) and the routed experts.

Routed experts are stacked tensors (``gate_up_proj [experts, 2 * moe_intermediate, hidden]``,
``down_proj [experts, hidden, moe_intermediate]``, the official per-expert ``[out, in]`` matrices stacked),
split into ``num_expert_chunks`` contiguous chunks so a ``device_map`` can place them apart. The forward
sorts the (token, expert) assignments by expert once and runs one grouped matrix product per chunk and
projection: no Python loop over experts, no host sync per expert.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration import DeepseekMoEConfig

# Width multiple of each expert's column group (grouped GEMMs on CPU measured ~20% slower on odd widths).
SLOT_ALIGNMENT = 8
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_supported(weight: torch.Tensor, columns: torch.Tensor) -> bool:
    """Whether this build has a grouped-mm kernel for these operands (else: the per-group loop)."""
    if _GROUPED_MM is None or weight.dtype != columns.dtype:
        return False
    if weight.device.type == "cuda":
        return torch.cuda.get_device_capability(weight.device) >= (8, 0) and weight.dtype == torch.bfloat16
    return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _fast_row_major(columns: torch.Tensor) -> bool:
    """CPU grouped_mm takes a row-major right operand only with 16-byte aligned rows, and runs it ~20x
    slower in bf16 than a column-major one (measured); float32 with aligned rows is as fast."""
    size = columns.element_size()
    return columns.dtype == torch.float32 and (columns.stride(0) * size) % 16 == 0 and columns.data_ptr() % 16 == 0


def _looped_group_mm(weight: torch.Tensor, columns: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`grouped_linear`'s product, one group at a time."""
    output = columns.new_empty(weight.shape[1], columns.shape[1])
    start = 0
    for group, end in enumerate(offsets.tolist()):
        output[:, start:end] = weight[group] @ columns[:, start:end]
        start = end
    return output


def _looped_weight_grad(grad: torch.Tensor, columns: torch.Tensor, offsets: torch.Tensor, groups: int) -> torch.Tensor:
    grad_weight = grad.new_zeros(groups, grad.shape[0], columns.shape[0])
    start = 0
    for group, end in enumerate(offsets.tolist()):
        grad_weight[group] = grad[:, start:end] @ columns[:, start:end].t()
        start = end
    return grad_weight


class _GroupedMatmul(torch.autograd.Function):
    """``out[:, cols of g] = weight[g] @ columns[:, cols of g]`` with ``weight`` ``[groups, out, in]`` and
    ``columns`` ``[in, cols]``: grouped_mm's "3d x 2d" form, where the weights keep their stored
    ``[out, in]`` layout and each expert's product is one wide GEMM (measured faster on CPU than
    ``rows @ weight.T``). Falls back to a per-group loop where the build has no kernel."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, columns: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, columns, offsets)
        if not _grouped_mm_supported(weight, columns):
            return _looped_group_mm(weight, columns, offsets)
        if columns.device.type == "cpu" and columns.stride(0) != 1 and not _fast_row_major(columns):
            columns = columns.t().contiguous().t()
        return _GROUPED_MM(weight, columns, offs=offsets)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, columns, offsets = ctx.saved_tensors
        grad = grad.contiguous()  # CPU kernels reject broadcast gradients
        fused = _grouped_mm_supported(weight, columns)
        grad_weight = grad_columns = None
        if ctx.needs_input_grad[0]:
            if fused:  # "2d x 2d" form: one [out, in] product per group of columns
                grad_weight = _GROUPED_MM(grad, columns.t(), offs=offsets)
            else:
                grad_weight = _looped_weight_grad(grad, columns, offsets, weight.shape[0])
        if ctx.needs_input_grad[1]:
            weight_t = weight.transpose(1, 2)
            grad_columns = _GROUPED_MM(weight_t, grad, offs=offsets) if fused else _looped_group_mm(weight_t, grad, offsets)
        return grad_weight, grad_columns, None


def grouped_linear(weight: torch.Tensor, columns: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-group linear layer in feature-major layout: columns ``offsets[g-1]:offsets[g]`` of ``columns``
    ``[in, cols]`` through ``weight[g]`` ``[out, in]``; returns ``[out, cols]``. ``offsets`` are int32
    cumulative column counts, one per group."""
    return _GroupedMatmul.apply(weight, columns, offsets)


class DenseMLP(nn.Module):
    """SwiGLU MLP: the dense layers and the shared experts (``down(act(gate(x)) * up(x))``)."""

    def __init__(self, config: DeepseekMoEConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertChunk(nn.Module):
    """A contiguous range of routed experts ``[first_expert, first_expert + num_experts)``, stacked."""

    def __init__(self, config: DeepseekMoEConfig, first_expert: int, num_experts: int) -> None:
        super().__init__()
        self.first_expert = first_expert
        self.num_experts = num_experts
        hidden, intermediate = config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self,
        columns: torch.Tensor,
        offsets: torch.Tensor,
        column_weights: torch.Tensor,
        delta: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """``columns`` ``[hidden, slots]`` grouped by expert (``offsets``: cumulative slots per expert) ->
        ``[hidden, slots]``: each column through its expert, scaled by ``column_weights`` ``[slots]``.
        ``delta(projection, inputs, offsets)``, if given, adds to each projection (LoRA adapters)."""
        intermediate = self.down_proj.shape[-1]
        gate_up = self.project("gate_up_proj", columns, offsets, delta)  # [2 * intermediate, slots]
        gate, up = gate_up[:intermediate], gate_up[intermediate:]
        weights = column_weights.to(gate_up.dtype)
        # The mixing weight is applied before the (linear) down projection: on [intermediate, slots]
        # instead of [hidden, slots].
        if torch.is_grad_enabled() and gate_up.requires_grad:
            hidden = self.act_fn(gate) * up * weights
        else:  # inference: reuse the activation's buffer
            hidden = self.act_fn(gate).mul_(up).mul_(weights)
        return self.project("down_proj", hidden, offsets, delta)

    def project(self, projection: str, inputs: torch.Tensor, offsets: torch.Tensor, delta=None) -> torch.Tensor:
        output = grouped_linear(getattr(self, projection), inputs, offsets)
        extra = delta(projection, inputs, offsets) if delta is not None else None
        return output if extra is None else output + extra.to(output.dtype)

    @torch.no_grad()
    def merge_delta(self, projection: str, delta: torch.Tensor, safe: bool = False) -> None:
        """``weight += delta`` (``[experts, out, in]``), e.g. to merge a LoRA adapter."""
        weight = getattr(self, projection)
        merged = weight.float() + delta.to(weight.device)
        if safe and not torch.isfinite(merged).all():
            raise ValueError(f"merging into {projection} gives non-finite weights")
        weight.copy_(merged.to(weight.dtype))


class RoutedExperts(nn.Module):
    """All routed experts of one MoE layer, as ``num_expert_chunks`` :class:`ExpertChunk` modules."""

    def __init__(self, config: DeepseekMoEConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        per_chunk = self.num_experts // config.num_expert_chunks
        self.chunks = nn.ModuleList(
            ExpertChunk(config, first_expert=c * per_chunk, num_experts=per_chunk)
            for c in range(config.num_expert_chunks)
        )

    def forward(
        self, hidden_states: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """``hidden_states`` ``[tokens, hidden]``, ``topk_indices``/``topk_weights`` ``[tokens, top_k]`` ->
        the weighted sum of each token's experts, ``[tokens, hidden]`` (a transposed view).

        The experts work feature-major: one column per (token, expert) assignment, so that each expert's
        product is ``weight [out, in] @ columns [in, n]`` (measured faster on CPU than ``rows @ weight.T``).
        """
        slots = ExpertSlots.of(topk_indices, topk_weights, self.num_experts)
        columns = hidden_states.index_select(0, slots.token).t()  # [hidden, slots]
        outputs = self.run_chunks(columns, slots)  # [hidden, slots], already weighted
        combined = hidden_states.new_zeros(hidden_states.shape[1], hidden_states.shape[0])  # [hidden, tokens]
        return combined.index_add_(1, slots.token, outputs.to(combined.dtype)).t()

    def run_chunks(self, columns: torch.Tensor, slots: ExpertSlots) -> torch.Tensor:
        if len(self.chunks) == 1:
            offsets = slots.per_expert.cumsum(0).to(torch.int32)
            return self.chunks[0](columns, offsets, slots.weight)
        per_chunk = slots.per_expert.view(len(self.chunks), -1)
        slots_per_chunk = per_chunk.sum(dim=1).tolist()
        parts = zip(columns.split(slots_per_chunk, dim=1), slots.weight.split(slots_per_chunk))
        outputs = []
        for chunk, (part, weights), counts in zip(self.chunks, parts, per_chunk):
            device = chunk.gate_up_proj.device
            offsets = counts.cumsum(0).to(device=device, dtype=torch.int32)
            outputs.append(chunk(part.to(device), offsets, weights.to(device)).to(columns.device))
        return torch.cat(outputs, dim=1)


class ExpertSlots(NamedTuple):
    """Columns of the experts' feature-major buffers: each expert's assignments together, each group
    padded to a multiple of ``SLOT_ALIGNMENT`` when the batch is large (odd group widths cost grouped
    GEMMs ~20% on CPU). Padding slots read token 0 and carry weight 0."""

    token: torch.Tensor  # [slots], the token each slot reads and writes back to
    weight: torch.Tensor  # [slots], its mixing weight (0 for padding)
    per_expert: torch.Tensor  # [experts], slots of each expert, padding included

    @staticmethod
    def of(topk_indices: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> ExpertSlots:
        top_k = topk_indices.shape[1]
        flat = topk_indices.reshape(-1)  # [assignments]
        order = flat.argsort(stable=True)
        expert_of_sorted = flat[order]
        counts = torch.bincount(flat, minlength=num_experts)
        # Padding pays only when groups are wide; decode-sized batches would mostly compute padding.
        align = SLOT_ALIGNMENT if flat.numel() >= SLOT_ALIGNMENT * num_experts else 1
        padded = (counts + align - 1) // align * align
        padded_end = padded.cumsum(0)
        rank_in_expert = torch.arange(flat.numel(), device=flat.device) - (counts.cumsum(0) - counts)[expert_of_sorted]
        position = (padded_end - padded)[expert_of_sorted] + rank_in_expert
        total = int(padded_end[-1])  # the layer's one host sync: the buffers' width
        token = torch.zeros(total, dtype=torch.long, device=flat.device).index_put_((position,), order // top_k)
        weight = topk_weights.new_zeros(total).index_put_((position,), topk_weights.reshape(-1)[order])
        return ExpertSlots(token, weight, padded)
