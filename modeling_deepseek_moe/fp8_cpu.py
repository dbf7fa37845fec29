"""DeepSeek's block-wise FP8 weights on the CPU: decode-sized products that read one byte per weight, and
a fast dequantization for the larger products.

A few rows of activations against FP8 weights (decoding, and the routed experts of a small batch, each with
a few rows) cost what their weight bytes cost only if the weights are converted in registers, never
written out as floats: ``kernels/fp8_cpu.cpp`` does that (FP8 to float16 bits to float32, the block
scale folded into the activations, several rows per weight read). It is compiled on first use with
torch's C++ extension tools (about 20 s, then cached by torch in ``~/.cache/torch_extensions``) for the
CPU it runs on; where that is impossible (no compiler, no AVX2/F16C, ``DEEPSEEK_MOE_FP8_KERNEL=0``), or
for the frozen weights' backward, the dequantize path of :mod:`.fp8` serves, with the same results up to
float32 rounding. That path's dequantization runs in the same kernel module where it is built
(:func:`dequantize`, bit-identical to the torch code it replaces).

The same module serves a bf16 model's decoding (:func:`bf16_grouped_product`, the same dot-product loops over
bf16 weights): a layer's routed experts in one call, each one-row projection as a group of one
(:func:`.linear.matrix_vector`), a bf16 ``kv_b_proj`` head by head (:func:`head_rows_product`), and absorbed MLA's
products with the cached latent (:func:`shared_rows_product`; a decoding step's scores, masked, in one call:
:func:`absorbed_scores`). A decoding
step's whole routed mixture, FP8 or bf16, is one call too (:func:`routed_mixture`). The module registers its
decoding functions as torch operators as well, which compiled graphs call (:func:`kernel`). The elementwise work
around the products, RMSNorm (:func:`rms_norm`), MLA's RoPE (:func:`rotary_interleaved`) and a router's decision
(:func:`route`), is one call each too, outside compiled graphs (which fuse it themselves).
"""

from __future__ import annotations

import hashlib
import os
import platform

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "fp8_cpu.cpp")
# Up to this many rows per weight (per expert with rows, on average, for stacked experts) the kernel beats
# dequantizing the weight for a GEMM (measured on an Intel Xeon with AMX and AVX512-FP16, weights from its L3:
# FP8 projections of 1024 x 1024 to 2816 x 1024 take 0.5x the time at 16 bf16 rows, 0.9x at 32, 1.3-1.5x at 64;
# float32 rows 0.7x at 32, 1.0x at 64; bench_fp8.py's model at 32-128 tokens 0.53-0.87x the time with 16
# rows); beyond, the dequantize path.
MAX_ROWS = 32
_KERNEL: dict = {}


def kernel():
    """The compiled kernel module, or None where it cannot be built (said once, in a warning). In a graph being
    compiled, its decoding functions as torch operators (the kernel built while tracing): the graph calls them
    without a Python step (a Python custom operator costs ~20 us per call, as much as a decoding product)."""
    if torch.compiler.is_compiling():
        namespace = _operator_namespace()
        return getattr(torch.ops, namespace) if namespace else None
    return _module()


def _module():
    if "module" not in _KERNEL:
        _KERNEL["module"] = _build()
        if _KERNEL["module"] is not None:
            _register_shapes(_KERNEL["module"].__name__)
    return _KERNEL["module"]


@torch.compiler.assume_constant_result
def _operator_namespace() -> str:
    """The kernel's operator namespace (its module's name, one per build), "" without a kernel: a constant
    of the traced graph."""
    module = _module()
    return "" if module is None else module.__name__


def _register_shapes(namespace: str) -> None:
    """The kernel operators' output shapes, for tracing."""
    def rows_by_weight_rows(weight, scale, rows, *settings):
        return rows.new_empty(*rows.shape[:-1], weight.shape[-2])

    def rows_by_weight_columns(weight, scale, rows, *settings):
        return rows.new_empty(*rows.shape[:-1], weight.shape[-1])

    shapes = {"fp8_grouped_gemv": rows_by_weight_rows, "fp8_grouped_gemv_transposed": rows_by_weight_columns,
              "bf16_grouped_gemv": lambda weight, rows, ends: rows_by_weight_rows(weight, None, rows),
              "bf16_grouped_gemv_transposed": lambda weight, rows, ends: rows_by_weight_columns(weight, None, rows),
              "routed_mixture": lambda hidden, *tensors_and_settings: torch.empty_like(hidden),
              "head_rows_product": lambda weight, scale, heads, first, count, x, transposed, *block:
                  x.new_empty(*x.shape[:-1], weight.shape[1] if transposed else count)}
    for name, shape in shapes.items():
        torch.library.register_fake(f"{namespace}::{name}", shape)


def _build():
    if os.environ.get("DEEPSEEK_MOE_FP8_KERNEL", "1") == "0":
        return None
    if platform.machine() not in ("x86_64", "AMD64") or not os.path.exists(SOURCE):
        return None  # another CPU, or a trust_remote_code folder (it carries the Python files only)
    try:
        from torch.utils.cpp_extension import load

        with open(SOURCE, "rb") as handle:
            source = handle.read()
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else platform.processor()
        digest = hashlib.sha256(source + flags.encode() + torch.__version__.encode()).hexdigest()[:12]
        logger.info("building the CPU decode kernel (FP8 and bf16 weights) for this CPU (once, cached by torch)")
        return load(name=f"deepseek_moe_fp8_cpu_{digest}", sources=[SOURCE], verbose=False,
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as error:  # no compiler, no AVX2, ...: the dequantize path serves
        logger.warning(f"the CPU decode kernel could not be built ({type(error).__name__}: {error}); FP8 products "
                       "dequantize their weights instead and bf16 ones run torch's (slower for decoding)")
        return None


def serving_kernel(x: torch.Tensor, rows_per_weight: int | None):
    """The kernel (:func:`kernel`: its module, or its operators in a compiled graph) where it computes this
    product, else None: CPU activations that need no gradient (the weights are frozen; training goes through
    the dequantize path), at most ``MAX_ROWS`` rows against each weight (None: any number). (The kernel found
    is returned, not looked up again by the caller: a decoded token makes ~60 such calls, and each Python step
    shows.)"""
    if x.device.type != "cpu" or (rows_per_weight is not None and rows_per_weight > MAX_ROWS) \
            or (x.requires_grad and torch.is_grad_enabled()):
        return None
    return kernel()


FLOAT_DTYPES = (torch.float32, torch.bfloat16)


def serves_eagerly(*tensors: torch.Tensor) -> bool:
    """Whether the kernel's eager functions (norm, RoPE, routing) serve: outside compiled graphs (which fuse such
    work themselves), CPU tensors of which none needs a gradient, float32 or bf16."""
    if torch.compiler.is_compiling() or _module() is None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # a loop, not all() over a generator: ~40 calls per decoded token
        if t.device.type != "cpu" or t.dtype not in FLOAT_DTYPES or (grad and t.requires_grad):
            return False
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """transformers' Llama RMSNorm (DeepSeek's) of bf16 ``x`` ``[..., d]`` with ``weight`` ``[d]`` in one pass: the
    same numbers but where a float32 rounding of the mean of squares (summed in another order) moves a result
    across a bf16 rounding boundary. None where the kernel does not serve, and for float32 ``x``, whose results
    would show that rounding (a float32 model's numbers stay torch's)."""
    if x.dtype != torch.bfloat16 or not serves_eagerly(x, weight):
        return None
    return _module().rms_norm(x, weight, eps)


def rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """:func:`.rope.apply_rotary_interleaved` in one call, bit for bit: ``x`` ``[batch, heads, seq, d]`` with
    ``cos``/``sin`` ``[batch or 1, seq, d]`` of its dtype. None where the kernel does not serve."""
    if (x.dim() != 4 or x.stride(-1) != 1 or cos.dim() != 3 or cos.shape[0] not in (1, x.shape[0])
            or cos.shape[1:] != x.shape[2:] or cos.dtype != x.dtype or sin.dtype != x.dtype
            or not serves_eagerly(x, cos, sin)):
        return None
    return _module().rotary_interleaved(x, cos, sin)


def route(logits: torch.Tensor, bias: torch.Tensor | None, sigmoid: bool, group_score: str | None, groups: int,
          kept_groups: int, top_k: int, normalise: bool, epsilon: float, scaling: float
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A router's scores, chosen experts and weights from its float32 ``logits`` ``[tokens, experts]`` in one call,
    the numbers of :meth:`.routing.TopKRouter.forward`: ``sigmoid`` (else softmax) scores, ``bias`` added for the
    choice, ``group_score`` "max" or "top2_sum" to keep ``kept_groups`` of ``groups`` (None: no groups, and those two
    unused), weights normalised (``normalise``, ``epsilon``) and times ``scaling``. None where the kernel does not
    serve."""
    if logits.dtype != torch.float32 or not logits.is_contiguous() or not serves_eagerly(logits, *([] if bias is None else [bias])):
        return None
    if group_score is None:
        return _module().route(logits, bias, sigmoid, 0, 1, 1, top_k, normalise, epsilon, scaling)
    return _module().route(logits, bias, sigmoid, {"max": 1, "top2_sum": 2}[group_score], groups, kept_groups, top_k,
                           normalise, epsilon, scaling)


def decode_product(weight: torch.Tensor, scale_inv: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor | None,
                   part_rows: int, block: tuple[int, int], rows_per_weight: int) -> torch.Tensor | None:
    """:func:`grouped_rows_product` where the kernel serves this product (:func:`serving_kernel`), else None (the
    caller dequantizes)."""
    if serving_kernel(rows, rows_per_weight) is None:
        return None
    return grouped_rows_product(weight, scale_inv, rows, ends, part_rows, block)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor | None:
    """``x`` ``[..., in]`` (float32 or bf16) through one FP8 projection ``weight`` ``[out, in]`` with its
    ``scale_inv`` -> ``[..., out]`` in x's dtype, as the kernel takes them (no reshape here: a decoded token makes
    dozens of these calls, and each Python step shows), where the kernel serves (:func:`serving_kernel`: at most ``MAX_ROWS``
    rows), else None."""
    module = serving_kernel(x, x.numel() // max(x.shape[-1], 1))
    if module is None:
        return None
    return module.fp8_grouped_gemv(weight.contiguous(), scale_inv, x, None, weight.shape[0], block[0], block[1])


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, block: tuple[int, int],
               out: torch.Tensor | None = None) -> torch.Tensor | None:
    """FP8 ``weight`` ``[..., rows, cols]`` times its block scales (``scale_inv`` ``[..., scale rows, scale
    cols]``) as ``dtype``, by the kernel: the numbers of :func:`.fp8.dequantize_fp8_blockwise`'s torch path
    (float32, or float32 rounded to bfloat16), about 10x faster; written into ``out`` (contiguous, as many
    values) where given. None where the kernel does not serve (another device or dtype, compiling, no
    kernel)."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float8_e4m3fn or dtype not in (torch.float32, torch.bfloat16)
            or torch.compiler.is_compiling() or kernel() is None):
        return None
    rows, cols = weight.shape[-2:]
    output = kernel().fp8_dequantize(weight.reshape(-1, rows, cols).view(torch.uint8),
                                     scale_inv.float().reshape(-1, *scale_inv.shape[-2:]).contiguous(), block[0], block[1],
                                     dtype == torch.bfloat16, out)
    return output.view(weight.shape)


def grouped_rows_product(weight: torch.Tensor, scale_inv: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor | None,
                         part_rows: int, block: tuple[int, int]) -> torch.Tensor:
    """``rows`` ``[n, in]`` (float32 or bf16) grouped by expert (``ends``: cumulative rows per expert, int64 or
    int32) through the FP8 stacks ``weight`` ``[experts, out, in]`` with ``scale_inv`` ``[experts, scale rows,
    scale cols]`` (``part_rows`` apart quantized apart) -> ``[n, out]`` in the rows' dtype. A weight ``[out,
    in]`` with its ``scale_inv`` and ``ends`` None: one linear layer. The kernel takes the tensors as they are
    (no conversion or view here: a decoded token makes hundreds of these calls)."""
    return kernel().fp8_grouped_gemv(weight.contiguous(), scale_inv, rows, ends, part_rows, block[0], block[1])


def _bf16_read_in_place(t: torch.Tensor) -> bool:
    """Whether the kernel reads ``t`` ``[..., rows, cols]`` in place as a stack of bf16 matrices: bfloat16, each matrix's
    rows contiguous and back to back (a weight, or a cache with room beyond its slots)."""
    return t.dtype == torch.bfloat16 and t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]


def bf16_grouped_product(weight: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor | None) -> torch.Tensor | None:
    """``rows`` ``[n, in]`` grouped by expert (``ends``: cumulative rows per expert) through the bfloat16
    stacks ``weight`` ``[experts, out, in]`` -> ``[n, out]`` in the rows' dtype, every expert in one kernel
    call (one ``torch.mv`` per expert reads the weights ~20% slower); a weight ``[out, in]`` and ``ends``
    None: one projection, of rows ``[..., in]`` -> ``[..., out]``. None where the kernel does not serve
    (:func:`serving_kernel`, with all the rows counted against each weight)."""
    if not _bf16_read_in_place(weight):
        return None
    module = serving_kernel(rows, rows.numel() // max(rows.shape[-1], 1))
    return None if module is None else module.bf16_grouped_gemv(weight, rows, ends)


def routed_mixture(hidden: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
                   gate_up_scale: torch.Tensor | None, down: torch.Tensor, down_scale: torch.Tensor | None,
                   block: tuple[int, int] | None) -> torch.Tensor | None:
    """A decoding step's routed mixture ``[n, hidden]`` in one kernel call: ``hidden`` ``[n, hidden]`` through
    each token's ``topk_indices`` experts (SwiGLU with the stacked ``gate_up`` ``[experts, 2 * intermediate,
    hidden]`` and ``down`` ``[experts, hidden, intermediate]``, FP8 with their scales and ``block``, or bf16
    with None), weighted by ``topk_weights`` and summed: what the dispatcher and
    :meth:`.experts.ExpertChunk.forward` compute, with the same numbers, without their ~20 Python-level calls
    per layer. None where the kernel does not serve (:func:`serving_kernel`, weights neither FP8 nor bf16, activations
    neither float32 nor bf16)."""
    module = None if gate_up.dtype not in (torch.float8_e4m3fn, torch.bfloat16) or hidden.dtype not in FLOAT_DTYPES \
        else serving_kernel(hidden, len(hidden))
    if module is None:
        return None
    return module.routed_mixture(hidden, topk_indices, topk_weights, gate_up, gate_up_scale, down, down_scale,
                                   *(block or (0, 0)))


# Up to this many cached slots and rows (heads x new tokens) per sequence, absorbed attention's weighted sum of the
# cached latent goes through the kernel's transposed product, which reads the cache once per 4 rows (16 heads, AMD
# EPYC Zen 4: 65 slots 22 us against torch's 107 with the cache padded to its bucketed width, 1024 slots 172 against
# 170); beyond, torch's bf16 GEMM is the faster (16 heads over 4096 slots: 609 against 367 us; 128 heads over 65
# slots: 93 against 82).
SHARED_VALUES_MAX_SLOTS, SHARED_VALUES_MAX_ROWS = 1024, 16


def shared_rows_product(rows: torch.Tensor, shared: torch.Tensor, transposed: bool = False) -> torch.Tensor | None:
    """``rows`` ``[batch, n, k]`` against every sequence's own bf16 ``shared`` ``[batch, total, k]``: ``rows[b] @
    shared[b].T`` -> ``[batch, n, total]`` in the rows' dtype, with ``shared`` read in place (MLA's absorbed
    attention scores: every head's query against the one cached latent, or RoPE key, of its sequence); or,
    ``transposed``, ``rows`` ``[batch, n, total]`` @ ``shared[b]`` -> ``[batch, n, k]`` (the attention weights
    over the cached latent). torch's bf16 batched product of the scores' shapes took 4-10x the kernel's time with
    16 heads, 1.2-2x with 128 (65-4096 cached slots, AMD EPYC Zen 4), so every row count goes through the
    kernel. None where it does not serve: bf16 ``shared`` with contiguous rows on the CPU, no gradients, and
    for the transposed product at most ``SHARED_VALUES_MAX_SLOTS`` slots and ``SHARED_VALUES_MAX_ROWS`` rows per
    sequence, ``k`` in whole vectors."""
    if not _bf16_read_in_place(shared) or (
            transposed and (shared.shape[-2] > SHARED_VALUES_MAX_SLOTS or rows.shape[1] > SHARED_VALUES_MAX_ROWS
                            or shared.shape[-1] % 16)):
        return None
    module = serving_kernel(rows, None)
    if module is None:
        return None
    product = module.bf16_grouped_gemv_transposed if transposed else module.bf16_grouped_gemv
    batch, n, _ = rows.shape
    if batch == 1:
        return product(shared[0], rows[0], None)[None]
    return product(shared, rows.reshape(batch * n, -1), torch.arange(1, batch + 1) * n).view(batch, n, -1)


def absorbed_scores(latent_queries: torch.Tensor, rope_queries: torch.Tensor, latent: torch.Tensor, key_rope: torch.Tensor,
                    scaling: float, positions: torch.Tensor | None) -> torch.Tensor | None:
    """Absorbed MLA's attention scores for a decoding step in one kernel call: ``latent_queries`` ``[batch, heads, new,
    c]`` against each sequence's cached ``latent`` ``[batch, 1, total, c]`` plus ``rope_queries`` ``[batch, heads,
    new, r]`` against its ``key_rope`` ``[batch, 1, total, r]``, times ``scaling``, slots past each query's position
    (``positions`` ``[batch or 1, new]``; None: the new tokens are the last slots) at -inf -> float32 ``[batch,
    heads, new, total]``, the numbers of :meth:`.attention.MultiHeadLatentAttention.absorbed_attention`'s unfused
    steps (each product rounded to bf16 as :func:`shared_rows_product`'s, their bf16 sum, the float32 scaling).
    None where the kernel does not serve: eagerly, bf16 queries and cache on the CPU without gradients, the cache
    read in place as :func:`shared_rows_product` reads it."""
    if latent_queries.dtype != torch.bfloat16 or rope_queries.dtype != torch.bfloat16 \
            or not _bf16_read_in_place(latent) or not _bf16_read_in_place(key_rope) \
            or (positions is not None and positions.device.type != "cpu") \
            or not serves_eagerly(latent_queries, rope_queries, latent, key_rope):
        return None
    batch, heads, new, _ = latent_queries.shape
    scores = _module().absorbed_scores(latent_queries.reshape(batch, heads * new, -1), rope_queries.reshape(batch, heads * new, -1),
                                       latent[:, 0], key_rope[:, 0], scaling, new, positions)
    return scores.view(batch, heads, new, -1)


def head_rows_product(weight: torch.Tensor, scale_inv: torch.Tensor | None, block: tuple[int, int] | None, heads: int,
                      first: int, count: int, x: torch.Tensor, transposed: bool) -> torch.Tensor | None:
    """Products with rows ``first:first + count`` of every head's rows of ``weight`` ``[heads * rows, cols]``
    (MLA's ``kv_b_proj``: a head's key rows, then its value rows), FP8 with ``scale_inv`` and ``block`` or
    bf16 (both None), read in place, no float copy: ``x`` ``[batch, heads, seq, cols]`` -> ``[batch, heads,
    seq, count]`` through them, or, ``transposed``, ``x`` ``[batch, heads, seq, count]`` -> ``[batch, heads,
    seq, cols]``. None where the kernel does not serve: more than ``MAX_ROWS`` rows per head, another dtype,
    heads that do not start a scale block, a slice that starts inside one and ends in another."""
    batch, _, seq, _ = x.shape
    per_head, cols = weight.shape[0] // heads, weight.shape[1]
    if scale_inv is None and weight.dtype != torch.bfloat16:
        return None
    module = None if transposed and cols % 16 else serving_kernel(x, batch * seq)  # the transposed kernels: whole vectors
    if module is None:
        return None
    if scale_inv is not None:
        # each head's rows start a scale row, and the slice starts one or lies inside one (heads of 64 + 64 rows
        # in 128-row blocks: the kernel counts the slice's scale rows from its first row)
        first_block, last_block = first // block[0], (first + count - 1) // block[0]
        if per_head % block[0] or (first % block[0] and first_block != last_block) or (transposed and block[1] % 16):
            return None
    return module.head_rows_product(weight, scale_inv, heads, first, count, x, transposed, *(block or (0, 0)))
