"""Feed-forward compute: the dense MLP (dense layers, shared experts) and the routed experts.

Routed experts are stacked tensors (``gate_up_proj [experts, 2 * moe_intermediate, hidden]``,
``down_proj [experts, hidden, moe_intermediate]``, the official per-expert ``[out, in]`` matrices stacked),
split into ``num_expert_chunks`` contiguous chunks so a ``device_map`` can place them apart. The forward
sorts the (token, expert) assignments by expert once and runs one grouped matrix product per projection
for each slice of consecutive experts (a whole chunk while it trains): no Python loop over experts, no
host sync per expert.

With an FP8 ``quantization_config`` the stacked weights stay ``float8_e4m3fn`` with their block scales
(``gate_up_proj_scale_inv``: the gate's and the up projection's block grids stacked); a product
dequantizes only the experts that received tokens, a bounded batch of them (or rows of one) at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration import DeepseekMoEConfig
from .distributed import ExpertParallel, scale_gradient
from .routing import tokens_per_expert
from .fp8 import (
    DEQUANTIZE_BUDGET_BYTES,
    FP8_DTYPE,
    dequantize_stacked,
    fp8_settings,
    frozen_product,
    keep_dtypes_apply,
    projection,
    quantize_dequantize_activations,
    quantize_stacked,
    row_tile_height,
    row_tiled_linear,
    stacked_scale_shape,
)

# Input columns (bytes) of one slice of experts run together (see RoutedExperts.forward).
SLICE_BYTES = 8 * 2**20
# Width of each expert's column group, padded from its number of assignments (see padded_widths):
# (largest count, multiple it is padded to) for small groups, a multiple of SLOT_ALIGNMENT beyond.
# Measured per expert on this project's CPU (MKL, V3-sized experts, benchmarks/RESULTS.md): 2-3 columns
# cost as much as 4, 5-15 columns more than 16, and wider groups run 5-15% faster per column on a
# multiple of 8 than on the widths around it.
SMALL_GROUP_WIDTHS = ((1, 1), (4, 4), (16, 16))
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


def _aligned_for_cpu(matrix: torch.Tensor) -> torch.Tensor:
    """CPU grouped_mm rejects a 2-D operand whose leading stride is not a multiple of 16 bytes (e.g. a
    gradient over an odd number of columns, or a single column): such a matrix is copied row-major with
    its rows padded to 16 bytes."""
    leading = matrix.stride(-2) if matrix.stride(-1) == 1 else matrix.stride(-1)  # how the kernel reads it
    if matrix.device.type != "cpu" or matrix.numel() == 0 or (leading * matrix.element_size()) % 16 == 0:
        return matrix
    rows, cols = matrix.shape
    per_16_bytes = 16 // matrix.element_size()
    return matrix.new_empty(rows, -(-cols // per_16_bytes) * per_16_bytes)[:, :cols].copy_(matrix)


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


def _few_columns(columns: int, groups: int) -> bool:
    """Decode-sized batches, at most one column per two groups: most groups are empty or one column wide,
    a product MKL runs faster as ``row @ weight.T`` than as ``weight @ column`` (406 vs 504 us per V3
    expert; the MoE block of 1-4 tokens 5-12% faster), and padding them would only add work."""
    return 2 * columns <= groups


def _grouped_product(weight: torch.Tensor, columns: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[:, cols of g] = weight[g] @ columns[:, cols of g]`` with ``weight`` ``[groups, out, in]`` and
    ``columns`` ``[in, cols]``: grouped_mm's "3d x 2d" form, where the weights keep their stored
    ``[out, in]`` layout and each expert's product is one wide GEMM (measured faster on CPU than
    ``rows @ weight.T``, except for decode-sized batches: :func:`_few_columns`). Falls back to a
    per-group loop where the build has no kernel."""
    if columns.shape[1] == 0:  # a chunk that received no tokens (kernels reject empty operands)
        return columns.new_zeros(weight.shape[1], 0)
    if not _grouped_mm_supported(weight, columns):
        return _looped_group_mm(weight, columns, offsets)
    if columns.device.type == "cpu" and _few_columns(columns.shape[1], weight.shape[0]) and weight.stride(-1) == 1:
        # (weight.transpose(1, 2) is then column-major: a row-major right operand is slow in bf16)
        return _GROUPED_MM(_aligned_for_cpu(columns.t()), weight.transpose(1, 2), offs=offsets).t()
    if columns.device.type == "cpu" and columns.stride(0) != 1 and not _fast_row_major(columns):
        columns = columns.t().contiguous().t()
    return _GROUPED_MM(weight, _aligned_for_cpu(columns), offs=offsets)


class _GroupedMatmul(torch.autograd.Function):
    """:func:`_grouped_product` with gradients for the weights and the columns."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, columns: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, columns, offsets)
        return _grouped_product(weight, columns, offsets)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, columns, offsets = ctx.saved_tensors
        if columns.shape[1] == 0:
            return torch.zeros_like(weight) if ctx.needs_input_grad[0] else None, torch.zeros_like(columns), None
        grad = grad.contiguous()  # CPU kernels reject broadcast gradients
        fused = _grouped_mm_supported(weight, columns)
        grad_weight = grad_columns = None
        if ctx.needs_input_grad[0]:
            if fused:  # "2d x 2d" form: one [out, in] product per group of columns
                grad_weight = _GROUPED_MM(_aligned_for_cpu(grad), _aligned_for_cpu(columns.t()), offs=offsets)
            else:
                grad_weight = _looped_weight_grad(grad, columns, offsets, weight.shape[0])
        if ctx.needs_input_grad[1]:
            grad_columns = _grouped_product(weight.transpose(1, 2), grad, offsets)
        return grad_weight, grad_columns, None


def _grouped_rows_eager(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if rows.shape[0] == 0:
        return rows.new_zeros(0, weight.shape[1])
    if not _grouped_mm_supported(weight, rows):
        return _looped_group_mm(weight, rows.t(), offsets).t()
    return _GROUPED_MM(_aligned_for_cpu(rows), weight.transpose(1, 2), offs=offsets)


def _grouped_rows_backward(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                           grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad = grad.contiguous()
    grad_rows = _grouped_rows_eager(grad, weight.transpose(1, 2).contiguous(), offsets)
    if rows.shape[0] == 0:
        return grad_rows, torch.zeros_like(weight)
    if _grouped_mm_supported(weight, rows):  # "2d x 2d": one [out, in] product per group of rows
        grad_weight = _GROUPED_MM(_aligned_for_cpu(grad.t()), _aligned_for_cpu(rows), offs=offsets)
    else:
        grad_weight = _looped_weight_grad(grad.t(), rows.t(), offsets, weight.shape[0])
    return grad_rows, grad_weight


# An opaque operator for compile and export: torch's grouped_mm has meta kernels for bfloat16 only, and the
# loop fallback needs its offsets on the host. Inside the operator both run eagerly; the compiler sees one
# node with a known output shape (transformers' MoE integration does the same).
torch.library.custom_op("deepseek_moe::grouped_rows", _grouped_rows_eager, mutates_args=(),
                        schema="(Tensor rows, Tensor weight, Tensor offsets) -> Tensor")
torch.library.custom_op("deepseek_moe::grouped_rows_backward", _grouped_rows_backward, mutates_args=(),
                        schema="(Tensor rows, Tensor weight, Tensor offsets, Tensor grad) -> (Tensor, Tensor)")


@torch.library.register_fake("deepseek_moe::grouped_rows")
def _grouped_rows_shape(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[1])


@torch.library.register_fake("deepseek_moe::grouped_rows_backward")
def _grouped_rows_backward_shape(rows, weight, offsets, grad) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(rows), torch.empty_like(weight)


def _grouped_rows_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_rows_autograd(ctx, grad: torch.Tensor):
    rows, weight, offsets = ctx.saved_tensors
    grad_rows, grad_weight = torch.ops.deepseek_moe.grouped_rows_backward(rows, weight, offsets, grad)
    return grad_rows, grad_weight, None


torch.library.register_autograd("deepseek_moe::grouped_rows", _grouped_rows_autograd, setup_context=_grouped_rows_setup)


def grouped_rows(weight: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-group linear layer in token-major layout: rows ``offsets[g-1]:offsets[g]`` of ``rows`` ``[n, in]``
    through ``weight[g]`` ``[out, in]`` -> ``[n, out]`` (grouped_mm's "2d x 3d" form), differentiable, one
    operator node for compile and export; the offsets stay on the device."""
    return torch.ops.deepseek_moe.grouped_rows(rows, weight, offsets)


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
        self.gate_proj = projection(config, config.hidden_size, intermediate_size)
        self.up_proj = projection(config, config.hidden_size, intermediate_size)
        self.down_proj = projection(config, intermediate_size, config.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertChunk(nn.Module):
    """A contiguous range of routed experts ``[first_expert, first_expert + num_experts)``, stacked."""

    # Row blocks of each stacked projection that DeepSeek stores (and quantizes) as separate tensors.
    PARTS = {"gate_up_proj": 2, "down_proj": 1}

    def __init__(self, config: DeepseekMoEConfig, first_expert: int, num_experts: int) -> None:
        super().__init__()
        self.first_expert = first_expert
        self.num_experts = num_experts
        hidden, intermediate = config.hidden_size, config.moe_intermediate_size
        shapes = {"gate_up_proj": (num_experts, 2 * intermediate, hidden), "down_proj": (num_experts, hidden, intermediate)}
        self.fp8 = fp8_settings(config)
        for name, shape in shapes.items():
            if self.fp8 is None:
                setattr(self, name, nn.Parameter(torch.empty(shape)))
            else:  # frozen FP8 weights: adapters (ExpertChunkLora) train on top of them
                setattr(self, name, nn.Parameter(torch.empty(shape, dtype=FP8_DTYPE), requires_grad=False))
                self.register_buffer(name + "_scale_inv", torch.empty(stacked_scale_shape(*shape, self.PARTS[name], self.fp8["block"])))
        self.act_fn = ACT2FN[config.hidden_act]
        self.gradient_scale = 1.0  # expert parallelism: 1 / ep_size (see distributed.ExpertParallel)

    def forward(
        self,
        columns: torch.Tensor,
        offsets: torch.Tensor,
        column_weights: torch.Tensor,
        experts: slice = slice(None),
        delta: Callable[[str, torch.Tensor, torch.Tensor, slice], torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """``columns`` ``[hidden, slots]`` grouped by expert (``offsets``: cumulative slots per expert of the
        range ``experts`` of this chunk, all by default) -> ``[hidden, slots]``: each column through its
        expert, scaled by ``column_weights`` ``[slots]``. ``delta(projection, inputs, offsets, experts)``, if
        given, adds to each projection (LoRA adapters)."""
        intermediate = self.down_proj.shape[-1]
        gate_up = self.project("gate_up_proj", columns, offsets, experts, delta)  # [2 * intermediate, slots]
        gate, up = gate_up[:intermediate], gate_up[intermediate:]
        weights = column_weights.to(gate_up.dtype)
        # The mixing weight is applied before the (linear) down projection: on [intermediate, slots]
        # instead of [hidden, slots].
        if torch.is_grad_enabled() and gate_up.requires_grad:
            hidden = self.act_fn(gate) * up * weights
        else:  # inference: reuse the activation's buffer
            hidden = self.act_fn(gate).mul_(up).mul_(weights)
        return self.project("down_proj", hidden, offsets, experts, delta)

    def project(self, projection: str, inputs: torch.Tensor, offsets: torch.Tensor, experts: slice = slice(None),
                delta=None) -> torch.Tensor:
        weight = getattr(self, projection)
        if weight.dtype == FP8_DTYPE:
            output = fp8_grouped_linear(weight[experts], getattr(self, projection + "_scale_inv")[experts], inputs,
                                        offsets, self.PARTS[projection], self.fp8["mode"], self.fp8["block"])
        else:
            if self.gradient_scale != 1.0 and weight.requires_grad:
                weight = scale_gradient(weight, self.gradient_scale)
            output = grouped_linear(expert_range(weight, experts), inputs, offsets)
        extra = delta(projection, inputs, offsets, experts) if delta is not None else None
        return output if extra is None else output + extra.to(output.dtype)

    def dequantized(self, projection: str, dtype: torch.dtype = torch.float32, experts: slice = slice(None)) -> torch.Tensor:
        """A projection's stacked weights ``[experts, out, in]`` as ``dtype`` (dequantized if FP8)."""
        weight = getattr(self, projection)[experts]
        if weight.dtype != FP8_DTYPE:
            return weight.to(dtype)
        scales = getattr(self, projection + "_scale_inv")[experts]
        return dequantize_stacked(weight, scales, self.PARTS[projection], dtype, self.fp8["block"])

    @torch.no_grad()
    def set_weights(self, projection: str, values: torch.Tensor, experts: slice = slice(None)) -> None:
        """Write float ``values`` ``[experts, out, in]`` into a projection (quantized if FP8)."""
        weight = getattr(self, projection)
        if weight.dtype != FP8_DTYPE:
            weight.data[experts] = values.to(weight.device, weight.dtype)
            return
        quantized, scales = quantize_stacked(values.float(), self.PARTS[projection], self.fp8["block"], self.fp8["scale_fmt"])
        weight.data[experts] = quantized.to(weight.device)
        getattr(self, projection + "_scale_inv")[experts] = scales.to(weight.device)

    @torch.no_grad()
    def merge_delta(self, projection: str, delta: torch.Tensor, safe: bool = False) -> None:
        """``weight += delta`` (``[experts, out, in]``) in float32, e.g. to merge a LoRA adapter; FP8
        weights are re-quantized one expert at a time (never the whole chunk in float32)."""
        weight = getattr(self, projection)
        step = 1 if weight.dtype == FP8_DTYPE else weight.shape[0]
        for start in range(0, weight.shape[0], step):
            experts = slice(start, start + step)
            merged = self.dequantized(projection, experts=experts) + delta[experts].to(weight.device, torch.float32)
            if safe and not torch.isfinite(merged).all():
                raise ValueError(f"merging into {projection} gives non-finite weights")
            self.set_weights(projection, merged, experts)

    def _apply(self, fn, recurse: bool = True):
        fixed = (*self.PARTS, *(f"{p}_scale_inv" for p in self.PARTS)) if self.fp8 else ()  # FP8 stacks and scales
        return keep_dtypes_apply(self, super()._apply, fn, recurse, fixed)


def fp8_grouped_linear(weight: torch.Tensor, scale_inv: torch.Tensor, columns: torch.Tensor, offsets: torch.Tensor,
                       parts: int, mode: str, block: tuple[int, int]) -> torch.Tensor:
    """:func:`grouped_linear` with FP8 stacked weights (frozen): only the experts with columns are
    dequantized (in the columns' dtype), at most ``DEQUANTIZE_BUDGET_BYTES`` of them at a time, in the
    forward and again in the backward (autograd keeps no dequantized copy); ``mode`` "scaled" first sends
    the activations through FP8 in 1 x 128 groups (DeepSeek's inference numerics). There is no grouped FP8
    kernel here yet, so "auto" dequantizes on every device (emulating would only add work)."""
    if mode == "scaled":
        columns = quantize_dequantize_activations(columns.t(), block[1]).t().to(columns.dtype)
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    active = [expert for expert, (start, end) in enumerate(zip(starts, ends)) if end > start]
    per_batch = max(1, DEQUANTIZE_BUDGET_BYTES // (weight[0].numel() * columns.element_size()))
    batches = [active[first : first + per_batch] for first in range(0, len(active), per_batch)]
    # An expert over the budget (DeepSeek-V3's gate/up: 117 MB in float32) goes by row tiles.
    tile_rows = row_tile_height(weight, columns.dtype, block, DEQUANTIZE_BUDGET_BYTES, parts)

    def product(inputs: torch.Tensor, transposed: bool) -> torch.Tensor:
        if not batches:
            return inputs.new_zeros(weight.shape[2 if transposed else 1], inputs.shape[1])
        outputs = []
        for experts in batches:
            if tile_rows < weight.shape[1]:  # batches of one expert
                (expert,) = experts
                rows = inputs[:, starts[expert] : ends[expert]].t()  # feature-major -> rows, and back
                outputs.append(row_tiled_linear(rows, weight[expert], scale_inv[expert], transposed, tile_rows, block).t())
                continue
            if experts[-1] - experts[0] == len(experts) - 1:  # consecutive experts: views, no copy
                chosen = slice(experts[0], experts[-1] + 1)
                stack, scales = weight[chosen], scale_inv[chosen]
            else:
                index = torch.tensor(experts, device=weight.device)
                stack, scales = weight.index_select(0, index), scale_inv.index_select(0, index)
            dense = dequantize_stacked(stack, scales, parts, inputs.dtype, block)
            begin = starts[experts[0]]
            local_offsets = torch.tensor([ends[e] - begin for e in experts], dtype=torch.int32, device=inputs.device)
            outputs.append(_grouped_product(dense.transpose(1, 2) if transposed else dense,
                                            inputs[:, begin : ends[experts[-1]]], local_offsets))
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]

    return frozen_product(columns, product)


class RoutedExperts(nn.Module):
    """All routed experts of one MoE layer, as ``num_expert_chunks`` :class:`ExpertChunk` modules."""

    def __init__(self, config: DeepseekMoEConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        per_chunk = self.num_experts // config.num_expert_chunks
        self.expert_parallel = ExpertParallel.of(config)
        if self.expert_parallel is None:
            self.chunks = nn.ModuleList(
                ExpertChunk(config, first_expert=c * per_chunk, num_experts=per_chunk)
                for c in range(config.num_expert_chunks)
            )
        else:  # this rank's chunk only, under the name it has in the whole model
            rank = self.expert_parallel.rank
            chunk = ExpertChunk(config, first_expert=rank * per_chunk, num_experts=per_chunk)
            chunk.gradient_scale = 1.0 / self.expert_parallel.size
            self.chunks = nn.ModuleDict({str(rank): chunk})

    def forward(
        self, hidden_states: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """``hidden_states`` ``[tokens, hidden]``, ``topk_indices``/``topk_weights`` ``[tokens, top_k]`` ->
        the weighted sum of each token's experts, ``[tokens, hidden]``.

        The experts work feature-major: one column per (token, expert) assignment, so that each expert's
        product is ``weight [out, in] @ columns [in, n]`` (measured faster on CPU than ``rows @ weight.T``).
        They run in slices of consecutive experts of at most ``SLICE_BYTES`` of input columns, each summed
        into the result before the next: the buffers stay small enough for the allocator to reuse them
        (whole-batch buffers came back as fresh pages on every call: 7-9% of the block with glibc's
        default settings).
        """
        if torch.compiler.is_compiling() and self.runs_without_host_sync():
            return self.run_token_major(hidden_states, topk_indices, topk_weights)
        slots = ExpertSlots.of(topk_indices, topk_weights, self.num_experts)
        combined = hidden_states.new_zeros(hidden_states.shape[1], hidden_states.shape[0])  # [hidden, tokens]
        if self.expert_parallel is not None:
            (chunk,) = self.chunks.values()
            rows = hidden_states.index_select(0, slots.token)  # [slots, hidden]
            outputs = (self.expert_parallel.run(chunk, rows, slots.per_expert) * slots.weight[:, None]).t()
            combined.index_add_(1, slots.token, outputs.to(combined.dtype))
        else:
            self.run_slices(hidden_states, slots, combined)
        # One blocked transpose (.contiguous()) costs less than a strided read in every later use.
        return combined.t().contiguous()

    def runs_without_host_sync(self) -> bool:
        """Whether :meth:`run_token_major` serves this layer: one chunk of plain (not FP8, not
        adapter-wrapped) stacked weights, all on one device, no expert parallelism."""
        return self.expert_parallel is None and len(self.chunks) == 1 and type(self.chunks[0]) is ExpertChunk \
            and self.chunks[0].fp8 is None

    def run_token_major(
        self, hidden_states: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """The routed mixture with no host sync and shapes that do not depend on the routing, as
        ``torch.compile`` and ``torch.export`` need: one row per assignment (``tokens * top_k``, unpadded),
        grouped by expert with device-side offsets, ``rows @ weight[e].T`` per group."""
        chunk = self.chunks[0]
        top_k = topk_indices.shape[1]
        order = topk_indices.reshape(-1).argsort(stable=True)  # [assignments], grouped by expert
        token = order // top_k
        offsets = tokens_per_expert(topk_indices, self.num_experts).cumsum(0).to(torch.int32)
        rows = hidden_states.index_select(0, token)  # [assignments, hidden]
        gate_up = grouped_rows(chunk.gate_up_proj, rows, offsets)  # [assignments, 2 * intermediate]
        gate, up = gate_up.chunk(2, dim=-1)
        weights = topk_weights.reshape(-1)[order].to(gate_up.dtype)[:, None]
        outputs = grouped_rows(chunk.down_proj, chunk.act_fn(gate) * up * weights, offsets)  # [assignments, hidden]
        return hidden_states.new_zeros(hidden_states.shape).index_add_(0, token, outputs.to(hidden_states.dtype))

    def run_slices(self, hidden_states: torch.Tensor, slots: ExpertSlots, combined: torch.Tensor) -> None:
        """Sum each slot's expert output into ``combined`` ``[hidden, tokens]``, slice by slice of experts,
        each on its chunk's device. A chunk being trained (its weights or adapters) runs in one slice:
        autograd gives a slice of a parameter a gradient of the whole parameter's size (measured: fwd+bwd
        1.9x slower), and PEFT's parametrized weights would be recomputed for every slice."""
        slice_slots = max(1, SLICE_BYTES // (hidden_states.shape[1] * hidden_states.element_size()))
        ends = slots.ends  # slot ranges of each (global) expert
        starts = [0, *ends[:-1]]
        counts = [end - start for start, end in zip(starts, ends)]
        per_chunk = self.num_experts // len(self.chunks)
        for base, chunk in zip(range(0, self.num_experts, per_chunk), self.chunks):
            # (parameters(), not the weight attributes: PEFT's ParamWrapper computes those on every access)
            device = next(chunk.parameters()).device
            trained = torch.is_grad_enabled() and any(p.requires_grad for p in chunk.parameters())
            # A chunk without tokens is one empty slice: its weights still get (zero) gradients.
            for first, last in expert_slices(counts[base : base + per_chunk], len(slots.token) if trained else slice_slots):
                begin, end = starts[base + first], ends[base + last - 1]
                token = slots.token[begin:end]
                offsets = torch.tensor(ends[base + first : base + last], dtype=torch.int32, device=device) - begin
                columns = hidden_states.index_select(0, token).to(device).t()  # [hidden, slice slots]
                experts = slice(None) if (first, last) == (0, per_chunk) else slice(first, last)
                outputs = chunk(columns, offsets, slots.weight[begin:end].to(device), experts=experts)
                combined.index_add_(1, token, outputs.to(combined.device, combined.dtype))


def expert_range(stacked: torch.Tensor, experts: slice) -> torch.Tensor:
    """``stacked[experts]``, or ``stacked`` itself for all of them: autograd gives even a full-range slice
    a backward that builds a zero tensor of the whole size (192 MB per MoE layer of bench_moe.py)."""
    return stacked if experts == slice(None) else stacked[experts]


def expert_slices(counts: list[int], max_slots: int) -> list[tuple[int, int]]:
    """Consecutive expert ranges ``(first, last)`` of at most ``max_slots`` slots each (at least one expert)."""
    ranges, first, total = [], 0, 0
    for expert, count in enumerate(counts):
        if total and total + count > max_slots:
            ranges.append((first, expert))
            first, total = expert, 0
        total += count
    ranges.append((first, len(counts)))
    return ranges


def padded_widths(counts: torch.Tensor) -> torch.Tensor:
    """The width of each expert's column group for ``counts`` assignments: the count rounded up to the
    multiple that the grouped GEMM runs fastest at (``SMALL_GROUP_WIDTHS``, else ``SLOT_ALIGNMENT``)."""
    multiple = torch.full_like(counts, SLOT_ALIGNMENT)
    for largest, width_multiple in reversed(SMALL_GROUP_WIDTHS):
        multiple = torch.where(counts <= largest, width_multiple, multiple)
    return (counts + multiple - 1) // multiple * multiple


class ExpertSlots(NamedTuple):
    """Columns of the experts' feature-major buffers: each expert's assignments together, each group
    padded to the width the grouped GEMM runs fastest at (:func:`padded_widths`). Padding slots read
    token 0 and carry weight 0."""

    token: torch.Tensor  # [slots], the token each slot reads and writes back to
    weight: torch.Tensor  # [slots], its mixing weight (0 for padding)
    per_expert: torch.Tensor  # [experts], slots of each expert, padding included
    ends: list[int]  # the same as cumulative slot counts on the host: where each expert's slots end

    @staticmethod
    def of(topk_indices: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> ExpertSlots:
        top_k = topk_indices.shape[1]
        flat = topk_indices.reshape(-1)  # [assignments]
        order = flat.argsort(stable=True)
        counts = tokens_per_expert(flat, num_experts)
        sorted_token, sorted_weight = order // top_k, topk_weights.reshape(-1)[order]
        if _few_columns(flat.numel(), num_experts):  # unpadded: the slots are the sorted assignments
            return ExpertSlots(sorted_token, sorted_weight, counts, counts.cumsum(0).tolist())
        expert_of_sorted = flat[order]
        padded = padded_widths(counts)
        padded_end = padded.cumsum(0)
        rank_in_expert = torch.arange(flat.numel(), device=flat.device) - (counts.cumsum(0) - counts)[expert_of_sorted]
        position = (padded_end - padded)[expert_of_sorted] + rank_in_expert
        ends = padded_end.tolist()  # the layer's one host sync: buffer widths and slices
        total = ends[-1]
        token = torch.zeros(total, dtype=torch.long, device=flat.device).index_put_((position,), sorted_token)
        weight = topk_weights.new_zeros(total).index_put_((position,), sorted_weight)
        return ExpertSlots(token, weight, padded, ends)
