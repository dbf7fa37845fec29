"""Products with frozen weights kept compressed (FP8, bitsandbytes 4-bit): each weight is dequantized for
the product that reads it, and again for the backward, so autograd holds no float copy of it.

:func:`frozen_product` is the autograd seam; :func:`frozen_grouped_linear` is the grouped product of stacked
routed experts over it, which dequantizes only the experts that received rows, a bounded budget of them at
a time. The formats themselves (:mod:`.fp8`, :mod:`.bnb4bit`) say how to dequantize a set of experts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import torch

from .grouped_mm import columns_product
from .linear import linear

# Dequantized weights one grouped product may hold at a time (the rest of the model stays compressed). Small,
# so that the allocator hands the same buffer back (fresh pages of a large one cost more than dequantizing).
DEQUANTIZE_BUDGET_BYTES = 4 * 2**20

_SCRATCH = threading.local()


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``numel`` values of one buffer per thread, dtype and device, reused by every tile a product
    dequantizes (each consumed before the next is made). A fresh buffer per tile (2 GB through the
    allocator per QLoRA step of bench_qlora.py's model) left glibc's heap fragmented between the
    activations: the step's peak RSS was 105 MB higher; an FP8 prefill of 256 tokens (bench_fp8.py's model)
    faulted in 90-150 MB of fresh pages per forward. Over ``DEQUANTIZE_BUDGET_BYTES`` (an expert that cannot
    be tiled) a fresh tensor, so that no buffer stays at that size."""
    if numel * dtype.itemsize > DEQUANTIZE_BUDGET_BYTES:
        return torch.empty(numel, dtype=dtype, device=device)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get((dtype, device))
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


class _FrozenProduct(torch.autograd.Function):
    """``product(x)`` for a product with frozen (compressed) weights; the backward applies its transpose to
    the gradient, so autograd keeps the compressed weights only (dequantized again) instead of a float copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, product: Callable[[torch.Tensor, bool], torch.Tensor]) -> torch.Tensor:
        ctx.product = product
        ctx.column_major = x.dim() == 2 and x.stride(0) == 1 and x.stride(1) != 1
        return product(x, False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        # In the forward input's layout: column-major feature-major columns keep each group's rows contiguous
        # and every product's leading dimension the weight's, not the batch's (see .grouped_mm.bucketed_width).
        grad = grad.t().contiguous().t() if ctx.column_major else grad.contiguous()
        return ctx.product(grad, True), None


def frozen_product(x: torch.Tensor, product: Callable[[torch.Tensor, bool], torch.Tensor]) -> torch.Tensor:
    """``product(x, transposed=False)``, differentiable in ``x`` through ``product(grad, transposed=True)``."""
    return _FrozenProduct.apply(x, product)


def select_experts(stacked: torch.Tensor, experts: list[int]) -> torch.Tensor:
    """``stacked[experts]`` along the first dimension: a view for consecutive experts, else a gathered copy
    (of the compressed tensor, which is small)."""
    if experts[-1] - experts[0] == len(experts) - 1:
        return stacked[experts[0] : experts[-1] + 1]
    return stacked.index_select(0, torch.tensor(experts, device=stacked.device))


def tiled_linear(x: torch.Tensor, tiles: Iterable[tuple[int, int, torch.Tensor]], transposed: bool) -> torch.Tensor:
    """``x @ W.T`` (or ``x @ W`` when ``transposed``) for a weight ``W`` ``[rows, cols]`` given as ``(top,
    bottom, rows top:bottom of W)`` tiles, each dequantized when it is reached: output columns tile by tile,
    or a sum over the tiles."""
    if not transposed:
        return torch.cat([linear(x, tile) for _, _, tile in tiles], dim=-1)
    total = None
    for top, bottom, tile in tiles:
        part = x[..., top:bottom] @ tile
        total = part if total is None else total.add_(part)
    return total


def grouped_dequantizing_product(
    ends: list[int],
    weight_shape: tuple[int, int],
    dequantize: Callable[[list[int], torch.dtype], torch.Tensor],
    budget: int,
    one_expert_product: Callable[[int, torch.Tensor, bool], torch.Tensor] | None = None,
) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """``product(columns, transposed)`` for :func:`frozen_product` over frozen stacked weights of
    ``weight_shape`` ``(out, in)`` per expert that exist only compressed: feature-major ``columns`` ``[in, n]``
    grouped by expert (``ends``: cumulative columns per expert) through each expert's weight (or its
    transpose). ``dequantize(experts, dtype)`` gives ``[len(experts), out, in]``; it is called for the experts
    with columns only, at most ``budget`` bytes of them at a time. ``one_expert_product(expert, rows,
    transposed)``, if given, replaces it for an expert alone over the budget (by row tiles,
    :func:`tiled_linear`). The products run feature-major, the CPU's fast form."""
    out_features, in_features = weight_shape
    starts = [0, *ends[:-1]]
    active = [expert for expert, (start, end) in enumerate(zip(starts, ends)) if end > start]

    def product(inputs: torch.Tensor, transposed: bool) -> torch.Tensor:
        if not active:
            return inputs.new_zeros(in_features if transposed else out_features, inputs.shape[1])
        per_batch = max(1, budget // (out_features * in_features * inputs.element_size()))
        outputs = []
        for first in range(0, len(active), per_batch):
            experts = active[first : first + per_batch]
            if one_expert_product is not None:  # batches of one expert
                (expert,) = experts
                expert_rows = inputs[:, starts[expert] : ends[expert]].t()  # feature-major -> rows, and back
                outputs.append(one_expert_product(expert, expert_rows, transposed).t())
                continue
            dense = dequantize(experts, inputs.dtype)  # [len(experts), out, in]
            begin = starts[experts[0]]
            local_offsets = torch.tensor([ends[e] - begin for e in experts], dtype=torch.int32, device=inputs.device)
            outputs.append(columns_product(dense.transpose(1, 2) if transposed else dense,
                                           inputs[:, begin : ends[experts[-1]]], local_offsets))
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]

    return product


def frozen_grouped_linear(
    rows: torch.Tensor,
    offsets: torch.Tensor,
    weight_shape: tuple[int, int],
    dequantize: Callable[[list[int], torch.dtype], torch.Tensor],
    budget: int,
    one_expert_product: Callable[[int, torch.Tensor, bool], torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`.grouped_mm.grouped_linear` over frozen compressed stacked weights (see
    :func:`grouped_dequantizing_product`): rows ``[n, in]`` grouped by expert (``offsets``: int32 cumulative
    rows per expert) -> ``[n, out]``, dequantizing in the forward and again in the backward."""
    product = grouped_dequantizing_product(offsets.tolist(), weight_shape, dequantize, budget, one_expert_product)
    return frozen_product(rows.contiguous().t(), product).t()  # column-major columns: see _FrozenProduct.backward
