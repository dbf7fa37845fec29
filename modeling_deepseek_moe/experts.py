"""The routed experts of an MoE layer: stacked weights in chunks, and one grouped-product seam.

Routed experts are stacked tensors (``gate_up_proj [experts, 2 * moe_intermediate, hidden]``,
``down_proj [experts, hidden, moe_intermediate]``, the official per-expert ``[out, in]`` matrices stacked),
split into ``num_expert_chunks`` contiguous :class:`ExpertChunk` modules so a ``device_map`` can place them
apart. A chunk takes rows grouped by expert and runs one grouped product per projection
(:meth:`ExpertChunk.project`): the plain product (:func:`.grouped_mm.grouped_linear`), the FP8 product for
FP8 stacks (:func:`.fp8.fp8_grouped_linear`), the 4-bit product for bitsandbytes stacks
(:func:`.bnb4bit.bnb4bit_grouped_linear`), plus LoRA adapters' deltas and expert parallelism's gradient
scale, all at that one place. Which rows a chunk gets is the dispatcher's business (:mod:`.dispatch`),
except for a decoding step on the CPU, whose whole mixture is one kernel call
(:meth:`ExpertChunk.decode_mixture`).

With an FP8 ``quantization_config`` the stacked weights stay ``float8_e4m3fn`` with their block scales
(``gate_up_proj_scale_inv``: the gate's and the up projection's block grids stacked). With a bitsandbytes
4-bit one they are bitsandbytes' 4-bit codes and statistics of each expert's gate, up and down weight
(:mod:`.bnb4bit`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN, SiLUActivation

from .configuration import DeepseekMoEConfig
from .bnb4bit import bnb4bit_grouped_linear, bnb4bit_settings, dequantize_experts, quantize_part, stack_tensor_shapes
from .dispatch import expert_parallel_mixture, sliced_mixture, token_major_mixture
from .distributed import ExpertParallel, scale_gradient
from .fixed_dtypes import keep_dtypes_apply
from .fp8 import FP8_DTYPE, dequantize_stacked, fp8_grouped_linear, fp8_settings, quantize_stacked, stacked_scale_shape
from .fp8_cpu import routed_mixture
from .grouped_mm import grouped_linear
from .mlp import gated


class ExpertChunk(nn.Module):
    """A contiguous range of routed experts ``[first_expert, first_expert + num_experts)``, stacked."""

    # Row blocks of each stacked projection that DeepSeek stores (and quantizes) as separate tensors.
    PARTS = {"gate_up_proj": 2, "down_proj": 1}

    def __init__(self, config: DeepseekMoEConfig, first_expert: int, num_experts: int) -> None:
        super().__init__()
        self.first_expert = first_expert
        self.num_experts = num_experts
        hidden, intermediate = config.hidden_size, config.moe_intermediate_size
        # [experts, out, in] of each stacked projection, whatever form stores it
        self.shapes = {"gate_up_proj": (num_experts, 2 * intermediate, hidden), "down_proj": (num_experts, hidden, intermediate)}
        self.fp8 = fp8_settings(config)
        self.bnb4bit = bnb4bit_settings(config)
        for name, shape in self.shapes.items():
            if self.bnb4bit is not None:  # frozen 4-bit codes; their statistics are derived, never loaded
                for suffix, (stored, dtype) in stack_tensor_shapes(*shape, self.PARTS[name], self.bnb4bit).items():
                    if suffix:
                        self.register_buffer(name + suffix, torch.empty(stored, dtype=dtype), persistent=False)
                    else:
                        setattr(self, name, nn.Parameter(torch.empty(stored, dtype=dtype), requires_grad=False))
            elif self.fp8 is None:
                setattr(self, name, nn.Parameter(torch.empty(shape)))
            else:  # frozen FP8 weights: adapters (ExpertChunkLora) train on top of them
                setattr(self, name, nn.Parameter(torch.empty(shape, dtype=FP8_DTYPE), requires_grad=False))
                self.register_buffer(name + "_scale_inv", torch.empty(stacked_scale_shape(*shape, self.PARTS[name], self.fp8["block"])))
        self.act_fn = ACT2FN[config.hidden_act]
        self.gradient_scale = 1.0  # expert parallelism: 1 / ep_size (see distributed.ExpertParallel)

    def forward(
        self,
        rows: torch.Tensor,
        offsets: torch.Tensor,
        row_weights: torch.Tensor,
        experts: slice = slice(None),
        delta: Callable[[str, torch.Tensor, torch.Tensor, slice], torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """``rows`` ``[n, hidden]`` grouped by expert (``offsets``: int32 cumulative rows per expert of the
        range ``experts`` of this chunk, all by default) -> ``[n, hidden]``: each row through its expert,
        scaled by ``row_weights`` ``[n]``. ``delta(projection, rows, offsets, experts)``, if given, adds to
        each projection (LoRA adapters). 4-bit experts run in their compute dtype from input to output, as a
        model of that dtype does (cast back at the end): under ``prepare_model_for_kbit_training``'s float32
        stream their activations would otherwise be float32."""
        intermediate = self.shapes["down_proj"][-1]
        stream_dtype = rows.dtype
        if self.bnb4bit is not None:
            rows = rows.to(self.bnb4bit["compute_dtype"])
        gate_up = self.project("gate_up_proj", rows, offsets, experts, delta)  # [n, 2 * intermediate]
        gate, up = split_features(gate_up, intermediate)
        # The mixing weight is applied before the (linear) down projection: on [n, intermediate]
        # instead of [n, hidden].
        weights = row_weights.to(gate_up.dtype)[:, None]
        if torch.is_grad_enabled() and gate_up.requires_grad:
            hidden = gated(self.act_fn, gate, up) * weights
        else:  # inference: reuse the activation's buffer
            hidden = self.act_fn(gate).mul_(up).mul_(weights)
        return self.project("down_proj", hidden, offsets, experts, delta).to(stream_dtype)

    def decode_mixture(self, hidden_states: torch.Tensor, topk_indices: torch.Tensor,
                       topk_weights: torch.Tensor) -> torch.Tensor | None:
        """The routed mixture of all experts of this chunk in one kernel call (:func:`.fp8_cpu.routed_mixture`),
        where it serves: at most ``fp8_cpu.MAX_ROWS`` tokens, FP8 or bf16 stacks in CPU memory, SiLU, no emulated
        FP8 activations, no gradients. Else None (the dispatcher's path). (6-32 tokens of bench_fp8.py's MoE
        layer, 64 experts, top-6, on an AMD EPYC Zen 4: 0.48-0.72x the dispatcher's time with FP8 experts,
        0.25-0.38x with bf16 ones.) Inputs on another device (the rest of the model on a GPU) come to the
        experts' and the result goes back."""
        if (self.bnb4bit is not None or (self.fp8 or {}).get("mode") == "scaled"
                or not isinstance(self.act_fn, (nn.SiLU, SiLUActivation))):
            return None
        device = self.gate_up_proj.device
        scales = [getattr(self, name + "_scale_inv", None) for name in self.PARTS]
        mixed = routed_mixture(hidden_states.to(device), topk_indices.to(device), topk_weights.to(device), self.gate_up_proj,
                               scales[0], self.down_proj, scales[1], self.fp8["block"] if self.fp8 else None)
        return None if mixed is None else mixed.to(hidden_states.device)

    def project(self, projection: str, rows: torch.Tensor, offsets: torch.Tensor, experts: slice = slice(None),
                delta: Callable | None = None) -> torch.Tensor:
        """The grouped product of one stacked projection of the experts ``experts`` over ``rows`` ``[n, in]``
        -> ``[n, out]``: FP8 and 4-bit stacks through their products, others through the plain one (with
        expert parallelism's gradient scale), plus the adapters' ``delta``."""
        weight = getattr(self, projection)
        if self.bnb4bit is not None:
            output = bnb4bit_grouped_linear(self.stack_4bit(projection, experts), rows, offsets,
                                            self.shapes[projection][1:], self.bnb4bit)
        elif weight.dtype == FP8_DTYPE:
            output = fp8_grouped_linear(weight[experts], getattr(self, projection + "_scale_inv")[experts], rows,
                                        offsets, self.PARTS[projection], self.fp8["mode"], self.fp8["block"])
        else:
            if self.gradient_scale != 1.0 and weight.requires_grad:
                weight = scale_gradient(weight, self.gradient_scale)
            output = grouped_linear(expert_range(weight, experts), rows, offsets)
        extra = delta(projection, rows, offsets, experts) if delta is not None else None
        return output if extra is None else output + extra.to(output.dtype)

    def stack_4bit(self, projection: str, experts: slice = slice(None)) -> dict[str, torch.Tensor]:
        """The 4-bit tensors of a projection (``{suffix: tensor}``, see :mod:`.bnb4bit`), of the ``experts``."""
        suffixes = stack_tensor_shapes(*self.shapes[projection], self.PARTS[projection], self.bnb4bit)
        return {suffix: getattr(self, projection + suffix)[experts] for suffix in suffixes}

    def part_shape(self, projection: str) -> tuple[int, int]:
        """``[out, in]`` of one expert's part of a projection (DeepSeek's per-expert gate, up or down weight)."""
        _, rows, cols = self.shapes[projection]
        return rows // self.PARTS[projection], cols

    @torch.no_grad()
    def set_part(self, projection: str, expert: int, part: int, values: torch.Tensor) -> None:
        """Quantize one expert's part ``[out, in]`` (float, on its device) into a 4-bit stack, allocating
        the stack on that device when it is still on the meta device."""
        stack = self.stack_4bit(projection)
        if stack[""].is_meta:
            for suffix, tensor in stack.items():
                empty = torch.zeros(tensor.shape, dtype=tensor.dtype, device=values.device)
                if suffix:
                    self._buffers[projection + suffix] = empty
                else:
                    self._parameters[projection] = nn.Parameter(empty, requires_grad=False)
            stack = self.stack_4bit(projection)
        for suffix, quantized in quantize_part(values, self.bnb4bit).items():
            stack[suffix][expert, part, : quantized.numel()] = quantized

    def dequantized(self, projection: str, dtype: torch.dtype = torch.float32, experts: slice = slice(None)) -> torch.Tensor:
        """A projection's stacked weights ``[experts, out, in]`` as ``dtype`` (dequantized if FP8 or 4-bit)."""
        if self.bnb4bit is not None:
            chosen = list(range(self.num_experts))[experts]
            return dequantize_experts(self.stack_4bit(projection), chosen, self.shapes[projection][1:], self.bnb4bit, dtype)
        weight = getattr(self, projection)[experts]
        if weight.dtype != FP8_DTYPE:
            return weight.to(dtype)
        scales = getattr(self, projection + "_scale_inv")[experts]
        return dequantize_stacked(weight, scales, self.PARTS[projection], dtype, self.fp8["block"])

    @torch.no_grad()
    def set_weights(self, projection: str, values: torch.Tensor, experts: slice = slice(None)) -> None:
        """Write float ``values`` ``[experts, out, in]`` into a projection (quantized if FP8 or 4-bit)."""
        weight = getattr(self, projection)
        if self.bnb4bit is not None:
            parts = self.PARTS[projection]
            for expert, expert_values in zip(list(range(self.num_experts))[experts], values):
                for part, part_values in enumerate(expert_values.chunk(parts)):
                    self.set_part(projection, expert, part, part_values.to(weight.device))
            return
        if weight.dtype != FP8_DTYPE:
            weight.data[experts] = values.to(weight.device, weight.dtype)
            return
        quantized, scales = quantize_stacked(values.float(), self.PARTS[projection], self.fp8["block"], self.fp8["scale_fmt"])
        weight.data[experts] = quantized.to(weight.device)
        getattr(self, projection + "_scale_inv")[experts] = scales.to(weight.device)

    @torch.no_grad()
    def merge_delta(self, projection: str, delta: torch.Tensor, safe: bool = False) -> None:
        """``weight += delta`` (``[experts, out, in]``) in float32, e.g. to merge a LoRA adapter; FP8
        and 4-bit weights are re-quantized one expert at a time (never the whole chunk in float32)."""
        weight = getattr(self, projection)
        step = 1 if weight.dtype == FP8_DTYPE or self.bnb4bit is not None else weight.shape[0]
        for start in range(0, weight.shape[0], step):
            experts = slice(start, start + step)
            merged = self.dequantized(projection, experts=experts) + delta[experts].to(weight.device, torch.float32)
            if safe and not torch.isfinite(merged).all():
                raise ValueError(f"merging into {projection} gives non-finite weights")
            self.set_weights(projection, merged, experts)

    def _apply(self, fn, recurse: bool = True):
        fixed = (*self.PARTS, *(f"{p}_scale_inv" for p in self.PARTS)) if self.fp8 else ()  # FP8 stacks and scales
        if self.bnb4bit is not None:  # 4-bit codes and their float32 statistics
            fixed = tuple(p + suffix for p in self.PARTS for suffix in stack_tensor_shapes(*self.shapes[p], self.PARTS[p], self.bnb4bit))
        return keep_dtypes_apply(self, super()._apply, fn, recurse, fixed)


def split_features(rows: torch.Tensor, at: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows[:, :at], rows[:, at:]``, sliced in the orientation the memory holds them: the CPU's products
    are feature-major (``rows`` is the transposed view of ``[features, n]``), and autograd's slice backward
    builds its gradient in the sliced tensor's layout; slicing the other way would cost a transposing copy
    of every gradient (fwd+bwd 12% slower measured)."""
    if rows.stride(0) == 1 and rows.stride(1) != 1:  # feature-major memory
        features = rows.t()
        return features[:at].t(), features[at:].t()
    return rows[:, :at], rows[:, at:]


def expert_range(stacked: torch.Tensor, experts: slice) -> torch.Tensor:
    """``stacked[experts]``, or ``stacked`` itself for all of them: autograd gives even a full-range slice
    a backward that builds a zero tensor of the whole size (192 MB per MoE layer of bench_moe.py)."""
    return stacked if experts == slice(None) else stacked[experts]


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
        the weighted sum of each token's experts, ``[tokens, hidden]``, through the dispatcher of the
        device the experts are on (:mod:`.dispatch`)."""
        if self.expert_parallel is not None:
            return expert_parallel_mixture(self, hidden_states, topk_indices, topk_weights)
        on_cpu = all(next(chunk.parameters()).device.type == "cpu" for chunk in self.chunks)
        if on_cpu:
            (chunk, *others) = self.chunks
            # a decoding step's mixture in one kernel call (eager or compiled), where it serves
            mixed = None if others or type(chunk) is not ExpertChunk else chunk.decode_mixture(hidden_states, topk_indices, topk_weights)
            if mixed is not None:
                return mixed
            if not torch.compiler.is_compiling():
                return sliced_mixture(self, hidden_states, topk_indices, topk_weights)
        return token_major_mixture(self, hidden_states, topk_indices, topk_weights)
