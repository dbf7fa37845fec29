"""DeepSeek-V3's block-wise FP8 weights: the format and every product that reads it.

A quantized weight ``[..., out, in]`` is stored as ``float8_e4m3fn`` with ``weight_scale_inv`` float32
``[..., ceil(out / 128), ceil(in / 128)]``; ``dequantized = fp8 * scale_inv`` per 128 x 128 block, edge
blocks partial. ``scale_fmt="ue8m0"`` (DeepSeek-V3.1) rounds every scale up to a power of two. Products:
:class:`FP8Linear` (attention and dense projections, FP8 GEMMs where the GPU has them) and
:func:`fp8_grouped_linear` (stacked routed experts), both dequantizing by bounded tiles elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from .fixed_dtypes import keep_dtypes_apply
from .fp8_cpu import decode_linear, decode_product
from .fp8_cpu import dequantize as dequantize_by_kernel
from .frozen import DEQUANTIZE_BUDGET_BYTES, frozen_product, grouped_dequantizing_product, scratch, select_experts, tiled_linear
from .linear import linear_layer

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = (128, 128)
SCALE_FORMATS = ("float", "ue8m0")
# The weights DeepSeek-V3 stores in FP8: attention projections and every MLP projection (dense, shared,
# routed). Embeddings, heads, norms, the router and MTP's eh_proj stay in bf16.
QUANTIZED_KEY = re.compile(
    r"\.(self_attn\.(q_proj|k_proj|v_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$"
)
SCALE_SUFFIX = ".weight_scale_inv"
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> tuple[int, ...]:
    """The ``weight_scale_inv`` shape of a weight of ``shape``: ``[..., ceil(out/b0), ceil(in/b1)]``."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def _expand_blocks(scales: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """One scale per element: ``[..., r_blocks, c_blocks]`` -> ``[..., rows, cols]`` (edge blocks cropped)."""
    expanded = scales.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return expanded[..., :rows, :cols]


def quantize_fp8_blockwise(
    weight: torch.Tensor, block: tuple[int, int] = BLOCK, scale_fmt: str = "float"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``[..., out, in]`` -> ``(fp8 weight, weight_scale_inv float32 [..., ceil(out/b0), ceil(in/b1)])``,
    each block scaled so that its largest magnitude maps to 448 (``ue8m0``: scale rounded up to 2^k)."""
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FORMATS}, got {scale_fmt!r}")
    *lead, rows, cols = weight.shape
    padded_rows, padded_cols = -(-rows // block[0]) * block[0], -(-cols // block[1]) * block[1]
    values = weight.float()
    if (padded_rows, padded_cols) != (rows, cols):
        values = torch.nn.functional.pad(values, (0, padded_cols - cols, 0, padded_rows - rows))
    blocks = values.reshape(*lead, padded_rows // block[0], block[0], padded_cols // block[1], block[1])
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12)  # [..., r_blocks, c_blocks]
    scales = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        scales = torch.exp2(torch.ceil(torch.log2(scales)))
    quantized = (values.reshape(blocks.shape) / scales[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    quantized = quantized.reshape(*lead, padded_rows, padded_cols)[..., :rows, :cols].to(FP8_DTYPE)
    return quantized.contiguous(), scales.float().contiguous()


# float8_e4m3fn bits ``s.eeee.mmm`` moved into a float16 as ``s.0eeee.mmm0000000`` are the same number
# divided by 2**8, subnormals included (NaN, which no checkpoint weight holds, reads as 480). On the CPU
# torch converts float8 element by element (~2.7 ns per element measured here); these two integer ops
# and the vectorized float16 -> float32 conversion take ~0.4 ns, and the 2**8 rides on the block scale.
_E4M3_IN_FLOAT16_SCALE = 2.0**8


def _fp8_as_float32(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(values, factor)`` with ``values * factor`` exactly ``weight.to(torch.float32)``."""
    if weight.device.type != "cpu" or weight.dtype != torch.float8_e4m3fn:
        return weight.to(torch.float32), 1.0
    bits = weight.view(torch.int8).to(torch.int16)  # sign-extended: s...s s.eeee.mmm
    bits.bitwise_left_shift_(7).bitwise_and_(~0x4000)  # s.0eeee.mmm0000000
    return bits.view(torch.float16).float(), _E4M3_IN_FLOAT16_SCALE


def dequantize_fp8_blockwise(
    weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32, block: tuple[int, int] = BLOCK,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fp8 weight [..., out, in] * scale_inv`` per block -> ``dtype``. Raises ValueError when the scale's
    shape is not the block grid of the weight (instead of guessing the block size from the ratio). ``out``
    (contiguous, as many values): where the CPU kernel writes the result (a reused buffer); elsewhere the
    result is a new tensor."""
    *lead, rows, cols = weight.shape
    expected = scale_shape(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {list(scale_inv.shape)}, expected {list(expected)} for a weight "
            f"{list(weight.shape)} in {block[0]}x{block[1]} blocks"
        )
    if torch.compiler.is_compiling():  # opaque (see _fp8_dequantize below)
        return torch.ops.deepseek_moe.fp8_dequantize(weight, scale_inv, dtype, block[0], block[1])
    fast = dequantize_by_kernel(weight, scale_inv, dtype, block, out)
    if fast is not None:
        return fast
    values, factor = _fp8_as_float32(weight)
    scales = scale_inv.float() * factor  # exact: factor is a power of two
    if rows % block[0] == 0 and cols % block[1] == 0:  # whole blocks: scale in place, by broadcasting
        blocks = values.view(*lead, rows // block[0], block[0], cols // block[1], block[1])
        blocks.mul_(scales[..., :, None, :, None])
    else:
        values.mul_(_expand_blocks(scales, rows, cols, block))
    return values.to(dtype)


# Compiled, dequantization is one opaque operator running the eager code above: Inductor's CPU code for the
# scale expansion (repeat_interleave / index // block, then cropped to a partial edge block) gives wrong
# numbers in torch 2.13 (e.g. a [64, 160] weight), and eagerly the kernel serves.
def _fp8_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, block_rows: int,
                    block_cols: int) -> torch.Tensor:
    return dequantize_fp8_blockwise(weight, scale_inv, dtype, (block_rows, block_cols))


torch.library.custom_op("deepseek_moe::fp8_dequantize", _fp8_dequantize, mutates_args=(),
                        schema="(Tensor weight, Tensor scale_inv, ScalarType dtype, int block_rows, int block_cols) -> Tensor")


@torch.library.register_fake("deepseek_moe::fp8_dequantize")
def _fp8_dequantize_shape(weight, scale_inv, dtype, block_rows, block_cols) -> torch.Tensor:
    return weight.new_empty(weight.shape, dtype=dtype)


def quantize_tensors(tensors: dict[str, torch.Tensor], scale_fmt: str = "float") -> dict[str, torch.Tensor]:
    """Official-layout ``tensors``: the weights DeepSeek quantizes (``QUANTIZED_KEY``) -> FP8 + their
    ``weight_scale_inv``; everything else unchanged."""
    out = {}
    for key, tensor in tensors.items():
        if QUANTIZED_KEY.search(key) and tensor.dtype != FP8_DTYPE:
            out[key], out[key.removesuffix(".weight") + SCALE_SUFFIX] = quantize_fp8_blockwise(tensor, scale_fmt=scale_fmt)
        else:
            out[key] = tensor
    return out


# ---------------------------------------------------------------------- compute
FP8_COMPUTE_MODES = ("auto", "dequantize", "scaled")
def fp8_matmuls_available(device: torch.device) -> bool:
    """Whether ``device`` multiplies FP8 matrices natively (CUDA compute capability >= 8.9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def uses_scaled_matmul(mode: str, device: torch.device) -> bool:
    """``mode`` ("auto" / "dequantize" / "scaled") resolved for ``device``."""
    return mode == "scaled" or (mode == "auto" and fp8_matmuls_available(device))


def quantize_dequantize_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x`` ``[..., in]`` through FP8 in 1 x ``group`` blocks per token (scale = amax / 448), back in
    float32: the activations a block-wise FP8 matmul sees, on any device."""
    flat = x.reshape(-1, x.shape[-1])
    quantized, scales = quantize_fp8_blockwise(flat, block=(1, group))
    return dequantize_fp8_blockwise(quantized, scales, block=(1, group)).view(x.shape)


def _scaled_mm_blockwise(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """FP8 GEMM on the GPU: ``x`` ``[tokens, in]`` quantized per token in 1 x 128 groups, ``weight``
    ``[out, in]`` FP8 in 128 x 128 blocks (DeepSeek's inference recipe) -> ``[tokens, out]`` in x's dtype."""
    from torch.nn.functional import ScalingType, scaled_mm

    quantized, scales = quantize_fp8_blockwise(x, block=(1, 128))
    outer_major = scales.t().contiguous().t()  # the 1 x 128 recipe reads its scales outer-dim-major
    return scaled_mm(quantized, weight.t(), outer_major, ScalingType.BlockWise1x128, scale_inv,
                     ScalingType.BlockWise128x128, output_dtype=x.dtype)


def row_tile_height(weight: torch.Tensor, dtype: torch.dtype, block: tuple[int, int], budget: int, parts: int = 1) -> int:
    """Rows of ``weight`` ``[..., rows, cols]`` (FP8) to dequantize at a time into ``dtype``: all of them
    within ``budget`` bytes, else whole scale blocks within it (at least one) where the ``parts`` row
    blocks quantized apart (gate, up) share one block grid, else all."""
    rows, cols = weight.shape[-2:]
    row_bytes = cols * torch.empty((), dtype=dtype).element_size()
    if rows * row_bytes <= budget or (parts > 1 and (rows // parts) % block[0]):
        return rows
    return max(1, budget // (row_bytes * block[0])) * block[0]


def transient_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Where the CPU kernel dequantizes a weight consumed at once: the thread's :func:`.frozen.scratch`; None
    on other devices, where the kernel does not serve (no buffer held there for nothing)."""
    return scratch(numel, dtype, device) if device.type == "cpu" else None


def dequantized_row_tiles(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, block: tuple[int, int],
                          height: int):
    """``(top, bottom, rows top:bottom of weight dequantized to dtype)`` over ``weight`` ``[rows, cols]``
    in tiles of ``height`` rows (a multiple of the block height, or all rows), each in the thread's
    transient buffer: a tile is consumed before the next is made."""
    for top in range(0, weight.shape[0], height):
        bottom = min(top + height, weight.shape[0])
        scales = scale_inv[top // block[0] : -(-bottom // block[0])]
        buffer = transient_buffer((bottom - top) * weight.shape[1], dtype, weight.device)
        yield top, bottom, dequantize_fp8_blockwise(weight[top:bottom], scales, dtype, block, buffer)


def row_tiled_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, transposed: bool, height: int,
                     block: tuple[int, int]) -> torch.Tensor:
    """``x @ W.T`` (or ``x @ W`` when ``transposed``) for the FP8 ``weight`` ``W`` ``[rows, cols]``, dequantized
    ``height`` rows at a time (into x's dtype)."""
    return tiled_linear(x, dequantized_row_tiles(weight, scale_inv, x.dtype, block, height), transposed)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
               mode: str = "auto", block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """``x @ dequantize(weight).T (+ bias)`` with the weight left in FP8: the scaled FP8 GEMM where the
    hardware has one (``mode`` "auto"/"scaled"), else the weight dequantized for this call only (in x's
    dtype, by row tiles when it exceeds ``DEQUANTIZE_BUDGET_BYTES``; float32 compute equals the
    dequantized-float32 reference). "scaled" without FP8 kernels emulates them: activations through FP8
    per 1 x 128 group, then a float32 product. On the CPU, without gradients, up to
    ``fp8_cpu.MAX_ROWS`` rows go through the decode kernel (:mod:`.fp8_cpu`). Compiled, the product is
    the opaque grouped FP8 operator (see :func:`fp8_grouped_linear`)."""
    scaled = uses_scaled_matmul(mode, x.device)
    if scaled and fp8_matmuls_available(x.device) and block == (128, 128) and weight.shape[0] % 128 == 0 \
            and weight.shape[1] % 128 == 0 and x.dtype in (torch.bfloat16, torch.float32):
        output = _scaled_mm_blockwise(x.reshape(-1, x.shape[-1]), weight, scale_inv).view(*x.shape[:-1], weight.shape[0])
        return output if bias is None else output + bias
    inputs = quantize_dequantize_activations(x, block[1]).to(x.dtype) if scaled else x
    # a few rows: the kernel reads the FP8 bytes only (compiled: as its operator)
    output = decode_linear(inputs, weight, scale_inv, block)
    if output is not None:
        return output if bias is None else output + bias
    rows = inputs.reshape(-1, inputs.shape[-1])
    if torch.compiler.is_compiling():  # the grouped FP8 operator with one group (opaque, as it)
        ends = torch.full((1,), rows.shape[0], dtype=torch.int32, device=rows.device)
        output = torch.ops.deepseek_moe.fp8_grouped_rows(rows, weight[None], scale_inv[None], ends, 1, *block).view(*x.shape[:-1], weight.shape[0])
        return output if bias is None else output + bias

    def product(v: torch.Tensor, transposed: bool) -> torch.Tensor:
        height = row_tile_height(weight, v.dtype, block, DEQUANTIZE_BUDGET_BYTES)
        return row_tiled_linear(v, weight, scale_inv, transposed, height, block)

    output = frozen_product(inputs, product)
    return output if bias is None else output + bias


class FP8Linear(nn.Linear):
    """A linear layer whose weight stays block-wise FP8: ``weight`` ``float8_e4m3fn [out, in]`` (frozen)
    and ``weight_scale_inv`` float32 ``[ceil(out/b0), ceil(in/b1)]``, as DeepSeek-V3 stores them. Neither
    changes dtype with the model (``.to(torch.bfloat16)`` moves them, keeps them FP8/float32)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block: tuple[int, int] = BLOCK,
                 mode: str = "auto", scale_fmt: str = "float") -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.block, self.mode, self.scale_fmt = tuple(block), mode, scale_fmt
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.register_buffer("weight_scale_inv", torch.empty(scale_shape((out_features, in_features), self.block)))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return fp8_linear(x, self.weight, self.weight_scale_inv, bias, self.mode, self.block)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32, keep: bool = False) -> torch.Tensor:
        """The weight as ``dtype``. ``keep=True`` keeps that copy for later calls (absorbed MLA decoding
        reads ``kv_b_proj`` at every step: dequantized once, not per step); changing the weight drops it."""
        keep = keep and not torch.compiler.is_compiling()  # a compiled graph keeps nothing on the module
        cached = self.__dict__.get("_dequantized")
        if keep and cached is not None and cached.dtype == dtype and cached.device == self.weight.device:
            return cached
        weight = dequantize_fp8_blockwise(self.weight, self.weight_scale_inv, dtype, self.block)
        if keep:
            self.__dict__["_dequantized"] = weight
        return weight

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float ``weight`` ``[out, in]`` into this layer (random init, LoRA merges)."""
        quantized, scales = quantize_fp8_blockwise(weight.float(), self.block, self.scale_fmt)
        self.__dict__.pop("_dequantized", None)
        self.weight.data = quantized.to(self.weight.device)
        self.weight_scale_inv = scales.to(self.weight.device)

    @torch.no_grad()
    def merge_delta(self, delta: torch.Tensor, safe: bool = False) -> None:
        """``weight += delta`` in float32, re-quantized (with this checkpoint's scale format)."""
        merged = self.dequantized_weight() + delta.to(self.weight.device, torch.float32)
        if safe and not torch.isfinite(merged).all():
            raise ValueError("merging gives non-finite weights")
        self.set_weight(merged)

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_dequantized", None)
        return keep_dtypes_apply(self, super()._apply, fn, recurse, ("weight", "weight_scale_inv"))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 blocks={self.block}, mode={self.mode}"


def fp8_grouped_linear(weight: torch.Tensor, scale_inv: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor,
                       parts: int, mode: str, block: tuple[int, int]) -> torch.Tensor:
    """:func:`.grouped_mm.grouped_linear` with FP8 stacked weights ``[experts, out, in]`` (frozen) and their
    scales (``parts`` row blocks quantized apart): rows ``[n, in]`` -> ``[n, out]``. Only the experts with
    rows are dequantized (in the rows' dtype), at most ``DEQUANTIZE_BUDGET_BYTES`` of them at a time, in the
    forward and again in the backward (autograd keeps no dequantized copy); ``mode`` "scaled" first sends
    the activations through FP8 in 1 x 128 groups (DeepSeek's inference numerics). There is no grouped FP8
    kernel here yet, so "auto" dequantizes on every device (emulating would only add work). The products
    run feature-major (``[in, n]`` columns), the CPU's fast form. On the CPU, without gradients, up to
    ``fp8_cpu.MAX_ROWS`` rows per expert with rows (on average) go through the decode kernel (:mod:`.fp8_cpu`)
    instead. Compiled, the product is one opaque operator (it reads its offsets on the host)."""
    if mode == "scaled":
        rows = quantize_dequantize_activations(rows, block[1]).to(rows.dtype)
    if torch.compiler.is_compiling():
        return torch.ops.deepseek_moe.fp8_grouped_rows(rows, weight, scale_inv, offsets, parts, block[0], block[1])
    ends = offsets.tolist()
    # the kernel's cost grows with each expert's rows, dequantizing's with the experts that have rows: the mean
    # decides (the most rows did: one popular expert sent 48 tokens of bench_fp8's model to dequantizing, 1.9x)
    active = sum(end > start for start, end in zip([0, *ends[:-1]], ends))
    per_expert = -(-rows.shape[0] // max(active, 1))
    output = decode_product(weight, scale_inv, rows, offsets, weight.shape[1] // parts, block, per_expert)
    if output is not None:
        return output
    return frozen_product(rows.t(), _dequantizing_product(weight, scale_inv, ends, parts, block, rows.dtype)).t()


def _dequantizing_product(weight: torch.Tensor, scale_inv: torch.Tensor, ends: list[int], parts: int,
                          block: tuple[int, int], dtype: torch.dtype) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """:func:`.frozen.grouped_dequantizing_product` over FP8 stacks: experts dequantized within the budget, an
    expert over it (DeepSeek-V3's gate/up: 117 MB in float32) by row tiles."""
    tile_rows = row_tile_height(weight, dtype, block, DEQUANTIZE_BUDGET_BYTES, parts)

    def dequantize(experts: list[int], dtype: torch.dtype) -> torch.Tensor:
        buffer = transient_buffer(len(experts) * weight[0].numel(), dtype, weight.device)
        return dequantize_stacked(select_experts(weight, experts), select_experts(scale_inv, experts), parts, dtype, block,
                                  buffer)

    def row_tiled(expert: int, expert_rows: torch.Tensor, transposed: bool) -> torch.Tensor:
        return row_tiled_linear(expert_rows, weight[expert], scale_inv[expert], transposed, tile_rows, block)

    return grouped_dequantizing_product(ends, tuple(weight.shape[1:]), dequantize, DEQUANTIZE_BUDGET_BYTES,
                                        row_tiled if tile_rows < weight.shape[1] else None)


# The grouped FP8 product as one opaque operator for compile and export (as grouped_mm's): inside, it runs
# eagerly, offsets read on the host; its backward is the transposed product, dequantizing again.
def _fp8_grouped_rows(rows: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, offsets: torch.Tensor,
                      parts: int, block_rows: int, block_cols: int) -> torch.Tensor:
    # contiguous, as the shape function says (the eager product may return a transposed view)
    return fp8_grouped_linear(weight, scale_inv, rows, offsets, parts, "dequantize", (block_rows, block_cols)).contiguous()


def _fp8_grouped_rows_backward(grad: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, offsets: torch.Tensor,
                               parts: int, block_rows: int, block_cols: int) -> torch.Tensor:
    product = _dequantizing_product(weight, scale_inv, offsets.tolist(), parts, (block_rows, block_cols), grad.dtype)
    return product(grad.t().contiguous(), True).t()


_FP8_GROUPED_SCHEMA = "Tensor weight, Tensor scale_inv, Tensor offsets, int parts, int block_rows, int block_cols) -> Tensor"
torch.library.custom_op("deepseek_moe::fp8_grouped_rows", _fp8_grouped_rows, mutates_args=(),
                        schema="(Tensor rows, " + _FP8_GROUPED_SCHEMA)
torch.library.custom_op("deepseek_moe::fp8_grouped_rows_backward", _fp8_grouped_rows_backward, mutates_args=(),
                        schema="(Tensor grad, " + _FP8_GROUPED_SCHEMA)


@torch.library.register_fake("deepseek_moe::fp8_grouped_rows")
def _fp8_grouped_rows_shape(rows, weight, scale_inv, offsets, parts, block_rows, block_cols) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[1])


@torch.library.register_fake("deepseek_moe::fp8_grouped_rows_backward")
def _fp8_grouped_rows_backward_shape(grad, weight, scale_inv, offsets, parts, block_rows, block_cols) -> torch.Tensor:
    return grad.new_empty(grad.shape[0], weight.shape[2])


def _fp8_grouped_rows_setup(ctx, inputs, output) -> None:
    _, weight, scale_inv, offsets, *ctx.settings = inputs
    ctx.save_for_backward(weight, scale_inv, offsets)


def _fp8_grouped_rows_autograd(ctx, grad: torch.Tensor):
    grad_rows = torch.ops.deepseek_moe.fp8_grouped_rows_backward(grad, *ctx.saved_tensors, *ctx.settings)
    return grad_rows, None, None, None, None, None, None


torch.library.register_autograd("deepseek_moe::fp8_grouped_rows", _fp8_grouped_rows_autograd,
                                setup_context=_fp8_grouped_rows_setup)


def stacked_scale_shape(experts: int, rows: int, cols: int, parts: int, block: tuple[int, int] = BLOCK) -> tuple[int, int, int]:
    """Scale shape of ``experts`` stacked weights ``[rows, cols]`` made of ``parts`` row blocks that were
    quantized apart (a routed expert's gate and up projections): each part keeps its own block grid."""
    part_rows, part_cols = scale_shape((rows // parts, cols), block)
    return experts, parts * part_rows, part_cols


def dequantize_stacked(weight: torch.Tensor, scale_inv: torch.Tensor, parts: int, dtype: torch.dtype = torch.float32,
                       block: tuple[int, int] = BLOCK, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[experts, rows, cols]`` FP8 + scales of :func:`stacked_scale_shape` -> ``dtype`` (``out``: as
    :func:`dequantize_fp8_blockwise`'s)."""
    experts, rows, cols = weight.shape
    split = weight.view(experts, parts, rows // parts, cols)
    scales = scale_inv.view(experts, parts, -1, scale_inv.shape[-1])
    return dequantize_fp8_blockwise(split, scales, dtype, block, out).view(experts, rows, cols)


def quantize_stacked(values: torch.Tensor, parts: int, block: tuple[int, int] = BLOCK,
                     scale_fmt: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`dequantize_stacked`: ``[experts, rows, cols]`` -> (FP8, scales)."""
    experts, rows, cols = values.shape
    quantized, scales = quantize_fp8_blockwise(values.reshape(experts, parts, rows // parts, cols), block, scale_fmt)
    return quantized.view(experts, rows, cols), scales.view(experts, -1, scales.shape[-1])


def fp8_settings(config) -> dict | None:
    """``{"block", "mode", "scale_fmt"}`` of a config whose ``quantization_config`` asks for DeepSeek's
    block-wise FP8, else None."""
    quantization = getattr(config, "quantization_config", None)
    if hasattr(quantization, "to_dict"):  # transformers' loading contract leaves its config object there
        quantization = quantization.to_dict()
    if not quantization or quantization.get("quant_method") != "fp8":
        return None
    return {"block": tuple(quantization.get("weight_block_size", BLOCK)), "mode": config.fp8_compute,
            "scale_fmt": quantization.get("scale_fmt") or "float"}


def projection(config, in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """A weight DeepSeek quantizes (attention and MLP projections): :class:`FP8Linear` when the config's
    ``quantization_config`` is FP8, a float one (:func:`.linear.linear_layer`) otherwise."""
    settings = fp8_settings(config)
    if settings is None:
        return linear_layer(config, in_features, out_features, bias)
    return FP8Linear(in_features, out_features, bias=bias, **settings)
