"""Feed-forward compute: the dense MLP (dense layers, shared experts) and the routed experts.

Routed experts are stacked tensors (``gate_up_proj [experts, 2 * moe_intermediate, hidden]``,
``down_proj [experts, hidden, moe_intermediate]``, the official per-expert ``[out, in]`` matrices stacked),
split into ``num_expert_chunks`` contiguous chunks so a ``device_map`` can place them apart. The forward
sorts the (token, expert) assignments by expert once and runs one grouped matrix product per chunk and
projection: no Python loop over experts, no host sync per expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration import DeepseekMoEConfig

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_supported(inputs: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this build has a grouped-mm kernel for these operands (else: the per-group loop)."""
    if _GROUPED_MM is None or inputs.dtype != weight.dtype:
        return False
    if inputs.device.type == "cuda":
        return torch.cuda.get_device_capability(inputs.device) >= (8, 0) and inputs.dtype == torch.bfloat16
    return inputs.device.type == "cpu" and inputs.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _looped_mm(inputs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reference grouped product: ``inputs[rows of group g] @ weight[g]`` one group at a time."""
    output = inputs.new_empty(inputs.shape[0], weight.shape[-1])
    start = 0
    for group, end in enumerate(offsets.tolist()):
        torch.mm(inputs[start:end], weight[group], out=output[start:end])
        start = end
    return output


def _weight_grad_looped(inputs: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor, groups: int) -> torch.Tensor:
    grad_weight = inputs.new_zeros(groups, inputs.shape[1], grad.shape[1])
    start = 0
    for group, end in enumerate(offsets.tolist()):
        torch.mm(inputs[start:end].t(), grad[start:end], out=grad_weight[group])
        start = end
    return grad_weight


class _GroupedMatmul(torch.autograd.Function):
    """``out[rows of g] = inputs[rows of g] @ weight[g]``; ``weight`` is ``[groups, in, out]`` (may be a
    transposed view). Wraps ``grouped_mm`` so that its backward always receives a dense gradient (CPU
    kernels reject broadcast ones) and falls back to a loop where the build has no kernel."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inputs, weight, offsets)
        if _grouped_mm_supported(inputs, weight):
            return _GROUPED_MM(inputs, weight, offs=offsets)
        return _looped_mm(inputs, weight, offsets)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inputs, weight, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_inputs = grad_weight = None
        fused = _grouped_mm_supported(inputs, weight)
        if ctx.needs_input_grad[0]:
            weight_t = weight.transpose(1, 2)
            grad_inputs = _GROUPED_MM(grad, weight_t, offs=offsets) if fused else _looped_mm(grad, weight_t, offsets)
        if ctx.needs_input_grad[1]:
            if fused:
                grad_weight = _GROUPED_MM(inputs.t(), grad, offs=offsets)
            else:
                grad_weight = _weight_grad_looped(inputs, grad, offsets, weight.shape[0])
        return grad_inputs, grad_weight, None


def grouped_linear(inputs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-group linear layer: rows ``offsets[g-1]:offsets[g]`` of ``inputs`` ``[rows, in]`` through
    ``weight[g]`` ``[out, in]``; returns ``[rows, out]``. ``offsets`` are int32 cumulative row counts."""
    return _GroupedMatmul.apply(inputs, weight.transpose(1, 2), offsets)


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

    def forward(self, sorted_inputs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``sorted_inputs`` ``[rows, hidden]`` grouped by expert, ``offsets`` ``[num_experts]`` -> ``[rows, hidden]``."""
        gate_up = grouped_linear(sorted_inputs, self.gate_up_proj, offsets)  # [rows, 2 * intermediate]
        gate, up = gate_up.chunk(2, dim=-1)
        if torch.is_grad_enabled() and gate_up.requires_grad:
            hidden = self.act_fn(gate) * up
        else:  # inference: reuse the activation's buffer
            hidden = self.act_fn(gate).mul_(up)
        return grouped_linear(hidden, self.down_proj, offsets)


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
        the weighted sum of each token's experts, ``[tokens, hidden]``."""
        top_k = topk_indices.shape[1]
        flat_experts = topk_indices.reshape(-1)  # [tokens * top_k]
        order = flat_experts.argsort(stable=True)  # assignments grouped by expert
        token_of_row = order // top_k
        rows_per_expert = torch.bincount(flat_experts, minlength=self.num_experts)
        sorted_inputs = hidden_states.index_select(0, token_of_row)  # [tokens * top_k, hidden]
        sorted_outputs = self.run_chunks(sorted_inputs, rows_per_expert)
        row_weights = topk_weights.reshape(-1)[order].unsqueeze(-1).to(sorted_outputs.dtype)
        if torch.is_grad_enabled() and sorted_outputs.requires_grad:
            weighted = sorted_outputs * row_weights
        else:
            weighted = sorted_outputs.mul_(row_weights)
        output = torch.zeros_like(hidden_states)
        return output.index_add_(0, token_of_row, weighted.to(output.dtype))

    def run_chunks(self, sorted_inputs: torch.Tensor, rows_per_expert: torch.Tensor) -> torch.Tensor:
        if len(self.chunks) == 1:
            offsets = rows_per_expert.cumsum(0).to(torch.int32)
            return self.chunks[0](sorted_inputs, offsets)
        # One host sync per layer (rows per chunk), then each chunk computes on its own device.
        per_chunk = rows_per_expert.view(len(self.chunks), -1)
        rows_per_chunk = per_chunk.sum(dim=1).tolist()
        outputs = []
        for chunk, rows, counts in zip(self.chunks, sorted_inputs.split(rows_per_chunk), per_chunk):
            device = chunk.gate_up_proj.device
            offsets = counts.cumsum(0).to(device=device, dtype=torch.int32)
            outputs.append(chunk(rows.to(device), offsets).to(sorted_inputs.device))
        return torch.cat(outputs)
