"""Linear layers for decoding on the CPU: a product of a few bf16 (or fp16) rows runs as matrix-vector products.

torch 2.13's CPU ``F.linear`` sends one or a few bf16 rows through its GEMM path, which reads the weight at ~21
GB/s for one row on this project's Xeon, and at a third to half the decode kernel's rate for 2-8 rows on an AMD
EPYC Zen 4; ``torch.mv`` reads one row's weight at ~26 GB/s from memory and faster from cache: 0.57-0.82x the
time for DeepSeek's projection shapes, the same numbers (``benchmarks/bench_e2e.py``'s profile; float32 runs the
same either way). A decoding step is made of such products. Where the CPU decode kernel is built, bf16 rows go
through it instead: one more 10-30% for one row (it streams the weight at ~30 GB/s), and up to ``FEW_ROWS`` rows
(a few sequences decoded together, or a few draft tokens) in one call.

On a CPU without instructions for half-precision products (no avx512_bf16 or AMX for bf16: AVX2 CPUs such as an
AMD EPYC Zen 3, or AVX-512 ones before Cooper Lake) torch's bf16 and float16 GEMMs run at 12-20 GFLOP/s where its
float32 GEMM runs at 75-106: products of more rows than the kernel takes then run in float32, the weight converted
by row tiles (:func:`float32_product`), without gradients (autograd would keep the float32 copies).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .fp8_cpu import bf16_grouped_product

HALF_PRECISION = (torch.bfloat16, torch.float16)


# Up to this many half-precision rows the decode kernel serves (bf16 weights of 384 x 1024 to 16384 x 1024 from
# memory, AMD EPYC Zen 4: 0.33-0.55x torch's time at 1 to 8 rows, 0.62-0.70x at 16; not measured against an
# Intel Xeon's AMX GEMM, whose tiles are 16 rows, hence 8).
FEW_ROWS = 8


def _half_cpu_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` has half-precision operands of one dtype on the CPU and needs no gradient."""
    return (x.device.type == "cpu" and x.dtype in HALF_PRECISION and weight.dtype == x.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def few_half_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` is one to ``FEW_ROWS`` half-precision rows on the CPU without gradients."""
    return 0 < x.numel() <= FEW_ROWS * x.shape[-1] and _half_cpu_inference(x, weight)


# Float32 copies of a half-precision weight that :func:`float32_product` holds at a time (DeepSeek-V3's head in
# float32 would take 3.7 GB): a tile that stays in the last-level cache from its conversion to its product. On an
# AMD EPYC Zen 3 (32 MB L3), 512 rows through V2-Lite's dense MLP and head: tiles of 8 MB 0.57-0.63x the time of
# tiles of 64 MB, 0.72-0.76x that of the float32 product alone (2 and 4 MB: within 10% of 8).
FLOAT32_TILE_BYTES = 8 * 2**20


@functools.cache
def native_half_products(dtype: torch.dtype) -> bool:
    """Whether this CPU has instructions for products of ``dtype`` (bf16: avx512_bf16 or AMX, ARM's bf16; float16:
    avx512_fp16 or AMX-FP16, ARM's fp16 arithmetic). True where torch cannot tell."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:
        return True
    found = capabilities()
    if not (found.get("avx2") or found.get("neon")):  # a CPU torch does not describe
        return True
    names = ("avx512_bf16", "amx_bf16", "bf16") if dtype == torch.bfloat16 else ("avx512_fp16", "amx_fp16", "fp16_arith")
    return any(found.get(name) for name in names)


def products_in_float32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` runs in float32 (:func:`float32_product`): half-precision operands on a CPU without
    instructions for their products (:func:`native_half_products`; on an AMD EPYC Zen 3, 512 rows through
    DeepSeek-V2-Lite's projections and head 3.7-5.6x faster, the conversion included), no gradient needed."""
    return _half_cpu_inference(x, weight) and not native_half_products(x.dtype)


def float32_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed in float32 and rounded to ``x``'s dtype, the weight converted by row
    tiles of at most ``FLOAT32_TILE_BYTES``."""
    rows = x.float()
    output = x.new_empty(*x.shape[:-1], weight.shape[0])
    step = max(1, FLOAT32_TILE_BYTES // (4 * weight.shape[1]))
    for top in range(0, weight.shape[0], step):
        tile_bias = None if bias is None else bias[top : top + step].float()
        output[..., top : top + step] = F.linear(rows, weight[top : top + step].float(), tile_bias)
    return output


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; a few half-precision rows on the CPU (:func:`few_half_rows`) by the decode kernel
    (:func:`.fp8_cpu.bf16_grouped_product`), else one row as :func:`matrix_vector` (compiled: an opaque operator
    running ``torch.mv``, since Inductor would generate its own loop); more rows in float32 where the CPU has no
    instructions for their products (:func:`products_in_float32`)."""
    if not few_half_rows(x, weight):
        if products_in_float32(x, weight) and not torch.compiler.is_compiling():
            return float32_product(x, weight, bias)
        return F.linear(x, weight, bias)
    output = bf16_grouped_product(weight, x, None)  # [..., out]
    if output is None:  # no kernel (matrix_vector would only ask it again)
        if x.numel() != x.shape[-1]:
            return F.linear(x, weight, bias)
        product = torch.ops.deepseek_moe.matrix_vector if torch.compiler.is_compiling() else torch.mv
        output = product(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return output if bias is None else output + bias


def matrix_vector(weight: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """``weight @ row``: bf16 by the decode kernel where it is built (:func:`.fp8_cpu.bf16_grouped_product`,
    10-30% faster than ``torch.mv`` for DeepSeek's projection shapes, measured), else ``torch.mv``."""
    output = bf16_grouped_product(weight, row.view(1, -1), None)
    return torch.mv(weight, row) if output is None else output.view(-1)


torch.library.custom_op("deepseek_moe::matrix_vector", matrix_vector, mutates_args=(), schema="(Tensor weight, Tensor row) -> Tensor")


@torch.library.register_fake("deepseek_moe::matrix_vector")
def _matrix_vector_shape(weight: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    return row.new_empty(weight.shape[0])


def float32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x.float(), weight.float())`` (the routers' float32 logits). A bf16 weight against a few rows
    is read in place by the decode kernel, whose products of bf16 and float32 are exact as well: the float32
    copy of the weight that ``weight.float()`` makes at every call cost more than the product itself."""
    rows = x.float()
    if weight.dtype == torch.bfloat16:
        output = bf16_grouped_product(weight, rows, None)
        if output is not None:
            return output
    return F.linear(rows, weight.float())


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (same parameters, state dict and PEFT handling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear_layer(config, in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """A float linear layer of the model: :class:`Linear`, or a plain ``nn.Linear`` where the config asks for
    bitsandbytes (transformers' quantizer replaces exact ``nn.Linear`` modules only)."""
    from .bnb4bit import is_bitsandbytes_config  # (bnb4bit -> frozen -> grouped_mm import this module)

    if is_bitsandbytes_config(getattr(config, "quantization_config", None)):
        return nn.Linear(in_features, out_features, bias=bias)
    return Linear(in_features, out_features, bias=bias)
