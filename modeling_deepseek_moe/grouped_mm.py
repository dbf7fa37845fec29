"""Grouped matrix products: ``weight[g] @ x`` for each group g of consecutive rows, the one kernel seam of
the routed experts (plain weights, LoRA factors, dequantized FP8 stacks and their gradients all go through
it).

:func:`grouped_linear` takes rows (``[n, in]``, grouped by expert, ``offsets`` the cumulative group ends on
the device) and picks the form per device: on the CPU in eager mode the feature-major "3d x 2d" form
``weight [out, in] @ columns [in, n]`` (MKL runs each expert's product as one wide GEMM, measured faster
than ``rows @ weight.T``, except for decode-sized batches), through the rows' transposed view; elsewhere,
and whenever torch compiles or exports, the token-major "2d x 3d" form as one opaque operator. Builds with
no grouped kernel for the operands fall back to a per-group loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8_cpu import bf16_grouped_product
from .linear import HALF_PRECISION, linear, products_in_float32

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_supported(weight: torch.Tensor, columns: torch.Tensor) -> bool:
    """Whether this build has a grouped-mm kernel for these operands (else: the per-group loop)."""
    if _GROUPED_MM is None or weight.dtype != columns.dtype:
        return False
    if weight.device.type == "cuda":
        return torch.cuda.get_device_capability(weight.device) >= (8, 0) and weight.dtype == torch.bfloat16
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and _leading_stride_aligned(weight))  # (a weight is not copied to align it)


def _fast_row_major(columns: torch.Tensor) -> bool:
    """CPU grouped_mm takes a row-major right operand only with 16-byte aligned rows, and runs it ~20x
    slower in bf16 than a column-major one (measured); float32 with aligned rows is as fast."""
    size = columns.element_size()
    return columns.dtype == torch.float32 and (columns.stride(0) * size) % 16 == 0 and columns.data_ptr() % 16 == 0


def _aligned_for_cpu(matrix: torch.Tensor) -> torch.Tensor:
    """CPU grouped_mm rejects a 2-D operand whose leading stride is not a multiple of 16 bytes (e.g. a
    gradient over an odd number of columns, or a single column): such a matrix is copied row-major with
    its rows padded to 16 bytes, the padding zero (in bf16 the kernel reads the element after a group's
    last column as the partner of an odd one, and multiplies it by zero: uninitialized NaN there made the
    last expert's weight gradient NaN)."""
    if matrix.device.type != "cpu" or matrix.numel() == 0 or _leading_stride_aligned(matrix):
        return matrix
    rows, cols = matrix.shape
    per_16_bytes = 16 // matrix.element_size()
    padded = matrix.new_empty(rows, -(-cols // per_16_bytes) * per_16_bytes)
    padded[:, cols:].zero_()
    return padded[:, :cols].copy_(matrix)


def _leading_stride_aligned(matrix: torch.Tensor) -> bool:
    """Whether the leading stride of the last two dimensions, as the CPU kernel reads it, is 16-byte aligned."""
    leading = matrix.stride(-2) if matrix.stride(-1) == 1 else matrix.stride(-1)
    return (leading * matrix.element_size()) % 16 == 0


def bucketed_width(columns: int) -> int:
    """The leading dimension given to a CPU half-precision grouped product of ``columns`` columns: rounded up
    to 8 steps per octave (at most 1/8 more). oneDNN, which runs those products, keeps one compiled
    primitive per operand layout, leading dimensions included (~0.7 MB each, up to 1024 of them): with the
    batch's own width as leading dimension every new batch size made new ones (a QLoRA step +27 MB of RSS,
    step after step, measured on bench_qlora.py's model); bucketed, the set stays small. The extra columns
    are never computed (the groups end before them)."""
    step = 1 << max(0, columns.bit_length() - 4)
    return -(-columns // step) * step


def column_major(columns: torch.Tensor, width: int) -> torch.Tensor:
    """``columns`` ``[k, n]`` -> a column-major ``[k, width]`` (stride ``(1, k)``, ``width >= n``) whose first
    ``n`` columns are ``columns``, the rest unspecified (read, never computed): a view of the same buffer when
    ``columns`` is column-major with room behind it, else a copy."""
    rows, total = columns.shape
    if columns.stride(0) == 1 and (columns.stride(1) == rows or total == 1):
        end = (columns.storage_offset() + width * rows) * columns.element_size()
        if columns.untyped_storage().nbytes() >= end:
            return columns.as_strided((rows, width), (1, rows))
    buffer = columns.new_empty(width, rows)
    buffer[:total].copy_(columns.t())
    return buffer.t()


def _looped_rows_product(weight: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``rows[group g] @ weight[g].T`` -> ``[n, out]``, one :func:`.linear.linear` per group with rows: the
    fallback where the build has no grouped kernel, and decode-sized half-precision batches (a single row is
    a matrix-vector product there: 0.66x grouped_mm's time for 6 V2-Lite experts in bf16). Empty groups are
    skipped (~3 us each)."""
    if rows.shape[0] == 0:  # no group has rows: one empty product, so that autograd still sees both operands
        return linear(rows, weight[0])
    output = rows.new_empty(rows.shape[0], weight.shape[1])
    start = 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            output[start:end] = linear(rows[start:end], weight[group])
        start = end
    return output


def _looped_group_mm(weight: torch.Tensor, columns: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`columns_product`, one group at a time (feature-major in and out)."""
    return _looped_rows_product(weight, columns.t(), offsets).t()


def _looped_weight_grad(grad: torch.Tensor, columns: torch.Tensor, offsets: torch.Tensor, groups: int) -> torch.Tensor:
    grad_weight = grad.new_zeros(groups, grad.shape[0], columns.shape[0])
    start = 0
    for group, end in enumerate(offsets.tolist()):
        grad_weight[group] = grad[:, start:end] @ columns[:, start:end].t()
        start = end
    return grad_weight


def few_rows(rows: int, groups: int) -> bool:
    """Decode-sized batches, at most one row per two groups: most groups are empty or one row wide, a
    product MKL runs faster as ``row @ weight.T`` than as ``weight @ column`` (406 vs 504 us per V3
    expert; the MoE block of 1-4 tokens 5-12% faster), and padding them would only add work."""
    return 2 * rows <= groups


def columns_product(weight: torch.Tensor, columns: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[:, cols of g] = weight[g] @ columns[:, cols of g]`` with ``weight`` ``[groups, out, in]`` and
    ``columns`` ``[in, cols]``: grouped_mm's "3d x 2d" form, where the weights keep their stored
    ``[out, in]`` layout and each expert's product is one wide GEMM (measured faster on CPU than
    ``rows @ weight.T``, except for decode-sized batches: :func:`few_rows`). Falls back to a
    per-group loop where the build has no kernel. No autograd (see :class:`_GroupedMatmul`)."""
    if columns.shape[1] == 0:  # a chunk that received no tokens (kernels reject empty operands)
        return columns.new_zeros(weight.shape[1], 0)
    if not _grouped_mm_supported(weight, columns):
        return _looped_group_mm(weight, columns, offsets)
    if columns.device.type == "cpu" and few_rows(columns.shape[1], weight.shape[0]) and weight.stride(-1) == 1:
        if columns.dtype in HALF_PRECISION:  # mostly one row per expert: see .linear and .fp8_cpu
            product = bf16_grouped_product(weight, columns.t(), offsets)
            return _looped_group_mm(weight, columns, offsets) if product is None else product.t()
        # (weight.transpose(1, 2) is then column-major: a row-major right operand is slow in bf16)
        return _GROUPED_MM(_aligned_for_cpu(columns.t()), weight.transpose(1, 2), offs=offsets).t()
    if columns.device.type == "cpu" and columns.dtype in HALF_PRECISION:
        if products_in_float32(columns, weight):  # float32 products, one expert's weight converted at a time
            return _looped_group_mm(weight, columns, offsets)
        total = columns.shape[1]  # (see bucketed_width)
        return _GROUPED_MM(weight, _aligned_for_cpu(column_major(columns, bucketed_width(total))), offs=offsets)[:, :total]
    if columns.device.type == "cpu" and columns.stride(0) != 1 and not _fast_row_major(columns):
        columns = columns.t().contiguous().t()
    return _GROUPED_MM(weight, _aligned_for_cpu(columns), offs=offsets)


class _GroupedMatmul(torch.autograd.Function):
    """:func:`_grouped_product` with gradients for the weights and the columns."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, columns: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # The columns only for the weights' gradient: frozen weights (LoRA's base) keep no copy of their input.
        ctx.save_for_backward(weight, columns if ctx.needs_input_grad[0] else None, offsets)
        ctx.total = columns.shape[1]
        return columns_product(weight, columns, offsets)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, columns, offsets = ctx.saved_tensors
        total = ctx.total
        if total == 0:
            return torch.zeros_like(weight) if ctx.needs_input_grad[0] else None, grad.new_zeros(weight.shape[2], 0), None
        grad = grad.contiguous()  # CPU kernels reject broadcast gradients
        fused = _grouped_mm_supported(weight, grad)
        if fused and grad.device.type == "cpu" and grad.dtype in HALF_PRECISION:  # (see bucketed_width)
            width = bucketed_width(total)
            grad = column_major(grad, width)[:, :total]  # one copy, read in place by both products
            if ctx.needs_input_grad[0]:
                columns = column_major(columns, width)[:, :total]
        grad_weight = grad_columns = None
        if ctx.needs_input_grad[0]:
            if fused:  # "2d x 2d" form: one [out, in] product per group of columns
                grad_weight = _GROUPED_MM(_aligned_for_cpu(grad), _aligned_for_cpu(columns.t()), offs=offsets)
            else:
                grad_weight = _looped_weight_grad(grad, columns, offsets, weight.shape[0])
        if ctx.needs_input_grad[1]:
            grad_columns = columns_product(weight.transpose(1, 2), grad, offsets)
        return grad_weight, grad_columns, None


def _rows_product(rows: torch.Tensor, matrices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``rows[group g] @ matrices[g]`` for ``rows`` ``[n, k]`` and ``matrices`` ``[groups, k, m]`` -> ``[n, m]``."""
    if rows.shape[0] == 0:
        return rows.new_zeros(0, matrices.shape[2])
    if _grouped_mm_supported(matrices, rows):
        return _GROUPED_MM(_aligned_for_cpu(rows), matrices, offs=offsets)
    return _looped_rows_product(matrices.transpose(1, 2), rows, offsets)


def _grouped_rows_eager(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if rows.device.type == "cpu" and few_rows(rows.shape[0], weight.shape[0]):  # decoding: see columns_product
        product = bf16_grouped_product(weight, rows, offsets)
        if product is not None:
            return product
    return _rows_product(rows, weight.transpose(1, 2), offsets)


def _grouped_rows_backward(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                           grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad = grad.contiguous()
    grad_rows = _rows_product(grad, weight, offsets)
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


def grouped_linear(weight: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-group linear layer: rows ``offsets[g-1]:offsets[g]`` of ``rows`` ``[n, in]`` through ``weight[g]``
    ``[out, in]`` -> ``[n, out]``, differentiable in both. ``offsets`` are int32 cumulative row counts, one per
    group (a group may be empty); on the CPU they may be read on the host, elsewhere they stay on the device."""
    if rows.device.type == "cpu" and not torch.compiler.is_compiling():
        return _GroupedMatmul.apply(weight, rows.t(), offsets).t()  # feature-major: the CPU's fast form
    return torch.ops.deepseek_moe.grouped_rows(rows, weight, offsets)
