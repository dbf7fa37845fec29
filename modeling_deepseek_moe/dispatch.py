"""Dispatch: which rows each routed expert computes and how the results return to their tokens (the step
between the router and the experts: route -> dispatch -> grouped compute -> combine).

Every dispatcher sorts the (token, expert) assignments by expert once (:func:`sorted_assignments`) and
hands each :class:`.experts.ExpertChunk` the rows of its experts with the cumulative row count of each
(``offsets``); the chunk returns one row per input row, already scaled by its mixing weight. They differ in
how rows are laid out, chosen per device (:func:`.experts.RoutedExperts.forward`):

* :func:`sliced_mixture`, the CPU's (every chunk in CPU memory, eager mode). Each expert's group of rows
  is padded to the width MKL's GEMM runs fastest at (:func:`padded_widths`: 1, 4, 16, then multiples of 8,
  measured on this project's 2-core CPU, ``benchmarks/bench_group_widths.py``; padding rows read token 0
  with weight 0), decode-sized batches stay unpadded; experts run in slices of consecutive experts of at
  most ``SLICE_BYTES`` of input rows, each combined before the next, so that the allocator reuses its
  buffers; one host sync per layer. The result is combined feature-major ``[hidden, tokens]``.
* :func:`token_major_mixture`, everyone else's (GPUs, ``torch.compile``, ``torch.export``, chunks on
  several devices): one row per assignment, unpadded, offsets on the device; with one chunk no host sync
  and no shape that depends on the routing, with several one sync to split the rows between them.
* :func:`expert_parallel_mixture`: the unpadded rows through ``all_to_all`` to the ranks that hold their
  experts (:class:`.distributed.ExpertParallel`) and back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .grouped_mm import bucketed_width, few_rows
from .linear import HALF_PRECISION
from .routing import tokens_per_expert

# Input rows (bytes) of one slice of experts run together on the CPU (see sliced_mixture).
SLICE_BYTES = 8 * 2**20
# Width of each expert's group of rows on the CPU, padded from its number of assignments (padded_widths):
# (largest count, multiple it is padded to) for small groups, a multiple of SLOT_ALIGNMENT beyond.
# Measured per expert on this project's CPU (MKL, V3-sized experts, benchmarks/RESULTS.md): 2-3 rows
# cost as much as 4, 5-15 rows more than 16, and wider groups run 5-15% faster per row on a multiple of 8
# than on the widths around it.
SMALL_GROUP_WIDTHS = ((1, 1), (4, 4), (16, 16))
SLOT_ALIGNMENT = 8


class Assignments(NamedTuple):
    """Every (token, expert) assignment of a batch, grouped by expert (stably: tokens in order)."""

    token: torch.Tensor  # [assignments], the token of each
    weight: torch.Tensor  # [assignments], its mixing weight
    expert: torch.Tensor  # [assignments], its expert
    counts: torch.Tensor  # [experts], assignments of each expert


def sorted_assignments(topk_indices: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> Assignments:
    """``topk_indices`` / ``topk_weights`` ``[tokens, top_k]`` -> the assignments grouped by expert."""
    flat = topk_indices.reshape(-1)  # [assignments]
    order = flat.argsort(stable=True)
    counts = tokens_per_expert(topk_indices, num_experts)
    return Assignments(order // topk_indices.shape[1], topk_weights.reshape(-1)[order], flat[order], counts)


class _AddAt(torch.autograd.Function):
    """``target.index_add_(dim, index, source)`` whose backward keeps only ``index``: index_add_'s own
    derivative saves ``source`` (for its shape), every expert output of the layer kept until the backward
    ([hidden, slots] per MoE layer in training: 8.3 MB of bench_qlora.py's step, ~470 MB for a V3 layer over
    4096 tokens)."""

    @staticmethod
    def forward(ctx, target: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(target)
        ctx.save_for_backward(index)
        ctx.dim = dim
        return target.index_add_(dim, index, source)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad, None, None, grad.index_select(ctx.dim, index)


def add_at(target: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``target.index_add_(dim, index, source)`` (in place), differentiable without keeping ``source``."""
    if not torch.is_grad_enabled() or not (source.requires_grad or target.requires_grad):
        return target.index_add_(dim, index, source)
    return _AddAt.apply(target, dim, index, source)


# ---------------------------------------------------------------------- the CPU's dispatcher
def padded_widths(counts: torch.Tensor) -> torch.Tensor:
    """The width of each expert's group of rows for ``counts`` assignments: the count rounded up to the
    multiple that the CPU's grouped GEMM runs fastest at (``SMALL_GROUP_WIDTHS``, else ``SLOT_ALIGNMENT``)."""
    multiple = torch.full_like(counts, SLOT_ALIGNMENT)
    for largest, width_multiple in reversed(SMALL_GROUP_WIDTHS):
        multiple = torch.where(counts <= largest, width_multiple, multiple)
    return (counts + multiple - 1) // multiple * multiple


class ExpertSlots(NamedTuple):
    """The CPU dispatcher's rows ("slots"): each expert's assignments together, each group padded to the
    width the grouped GEMM runs fastest at (:func:`padded_widths`). Padding slots read token 0 and carry
    weight 0. Decode-sized batches (:func:`.grouped_mm.few_rows`) are not padded."""

    token: torch.Tensor  # [slots], the token each slot reads and writes back to
    weight: torch.Tensor  # [slots], its mixing weight (0 for padding)
    per_expert: torch.Tensor  # [experts], slots of each expert, padding included
    ends: list[int]  # the same as cumulative slot counts on the host: where each expert's slots end

    @staticmethod
    def of(topk_indices: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> ExpertSlots:
        assigned = sorted_assignments(topk_indices, topk_weights, num_experts)
        counts, total = assigned.counts, topk_indices.numel()
        if few_rows(total, num_experts):  # unpadded: the slots are the sorted assignments
            return ExpertSlots(assigned.token, assigned.weight, counts, counts.cumsum(0).tolist())
        padded = padded_widths(counts)
        padded_end = padded.cumsum(0)
        rank_in_expert = torch.arange(total, device=counts.device) - (counts.cumsum(0) - counts)[assigned.expert]
        position = (padded_end - padded)[assigned.expert] + rank_in_expert
        ends = padded_end.tolist()  # the layer's one host sync: buffer widths and slices
        token = torch.zeros(ends[-1], dtype=torch.long, device=counts.device).index_put_((position,), assigned.token)
        weight = topk_weights.new_zeros(ends[-1]).index_put_((position,), assigned.weight)
        return ExpertSlots(token, weight, padded, ends)


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


def token_with_room(token: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``token`` followed, in half precision, by token 0 up to the grouped products' bucketed width: the
    rows gathered with it are a buffer the products read in place (see :func:`.grouped_mm.bucketed_width`)."""
    room = bucketed_width(len(token)) - len(token)
    if dtype not in HALF_PRECISION or room == 0:
        return token
    return torch.cat([token, token.new_zeros(room)])


def sliced_mixture(experts, hidden_states: torch.Tensor, topk_indices: torch.Tensor,
                   topk_weights: torch.Tensor) -> torch.Tensor:
    """The routed mixture ``[tokens, hidden]`` of ``experts`` (a :class:`.experts.RoutedExperts`) on the CPU:
    padded slots, slices of at most ``SLICE_BYTES`` of input rows (whole buffers came back as fresh pages
    on every call with glibc's default allocator: 7-9% of the block), each summed into a feature-major
    result before the next. A chunk being trained (its weights or adapters) runs in one slice: autograd
    gives a slice of a parameter a gradient of the whole parameter's size (fwd+bwd 1.9x slower measured),
    and PEFT's parametrized weights would be recomputed for every slice."""
    slots = ExpertSlots.of(topk_indices, topk_weights, experts.num_experts)
    combined = hidden_states.new_zeros(hidden_states.shape[1], hidden_states.shape[0])  # [hidden, tokens]
    slice_slots = max(1, SLICE_BYTES // (hidden_states.shape[1] * hidden_states.element_size()))
    ends = slots.ends  # slot ranges of each (global) expert
    starts = [0, *ends[:-1]]
    counts = [end - start for start, end in zip(starts, ends)]
    per_chunk = experts.num_experts // len(experts.chunks)
    for base, chunk in zip(range(0, experts.num_experts, per_chunk), experts.chunks):
        # (parameters(), not the weight attributes: PEFT's ParamWrapper computes those on every access)
        device = next(chunk.parameters()).device
        trained = torch.is_grad_enabled() and any(p.requires_grad for p in chunk.parameters())
        # A chunk without tokens is one empty slice: its weights still get (zero) gradients.
        for first, last in expert_slices(counts[base : base + per_chunk], len(slots.token) if trained else slice_slots):
            begin, end = starts[base + first], ends[base + last - 1]
            token = slots.token[begin:end]
            offsets = torch.tensor(ends[base + first : base + last], dtype=torch.int32, device=device) - begin
            rows = hidden_states.index_select(0, token_with_room(token, hidden_states.dtype))[: len(token)].to(device)
            chunk_experts = slice(None) if (first, last) == (0, per_chunk) else slice(first, last)
            outputs = chunk(rows, offsets, slots.weight[begin:end].to(device), experts=chunk_experts)
            combined = add_at(combined, 1, token, outputs.t().to(combined.device, combined.dtype))
    # One blocked transpose (.contiguous()) costs less than a strided read in every later use.
    return combined.t().contiguous()


# ---------------------------------------------------------------------- the token-major dispatchers
def token_major_mixture(experts, hidden_states: torch.Tensor, topk_indices: torch.Tensor,
                        topk_weights: torch.Tensor) -> torch.Tensor:
    """The routed mixture ``[tokens, hidden]`` with one unpadded row per assignment and each chunk's
    offsets on its device: no host sync and shapes independent of the routing with one chunk (what compile
    and export need); with several chunks, one host sync splits the rows between them."""
    assigned = sorted_assignments(topk_indices, topk_weights, experts.num_experts)
    output = hidden_states.new_zeros(hidden_states.shape)
    ends = assigned.counts.cumsum(0)  # [experts]: where each expert's rows end
    per_chunk = experts.num_experts // len(experts.chunks)
    bounds = [(0, None)]  # one chunk: all rows, without reading where they end
    if len(experts.chunks) > 1:
        chunk_ends = ends[per_chunk - 1 :: per_chunk].tolist()  # the one host sync
        bounds = list(zip([0, *chunk_ends[:-1]], chunk_ends))
    for base, chunk, (begin, end) in zip(range(0, experts.num_experts, per_chunk), experts.chunks, bounds):
        device = next(chunk.parameters()).device
        token = assigned.token[begin:end]
        offsets = (ends[base : base + per_chunk] - begin).to(device=device, dtype=torch.int32)
        rows = hidden_states.index_select(0, token).to(device)  # [rows of the chunk, hidden]
        outputs = chunk(rows, offsets, assigned.weight[begin:end].to(device))
        output = add_at(output, 0, token, outputs.to(output.device, output.dtype))
    return output


def expert_parallel_mixture(experts, hidden_states: torch.Tensor, topk_indices: torch.Tensor,
                            topk_weights: torch.Tensor) -> torch.Tensor:
    """The routed mixture ``[tokens, hidden]`` under expert parallelism: this rank's assignments, unpadded,
    sent to the ranks holding their experts and back (:meth:`.distributed.ExpertParallel.run`)."""
    assigned = sorted_assignments(topk_indices, topk_weights, experts.num_experts)
    (chunk,) = experts.chunks.values()
    rows = hidden_states.index_select(0, assigned.token)  # [assignments, hidden]
    outputs = experts.expert_parallel.run(chunk, rows, assigned.counts) * assigned.weight[:, None]
    return add_at(hidden_states.new_zeros(hidden_states.shape), 0, assigned.token, outputs.to(hidden_states.dtype))
