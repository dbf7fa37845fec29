"""Block-wise FP8 quantization (DeepSeek-V3's format): shapes, edge blocks, both scale formats."""

from __future__ import annotations

import pytest
import torch

from modeling_deepseek_moe.fp8 import FP8_DTYPE, dequantize_fp8_blockwise, quantize_fp8_blockwise, scale_shape

from conftest import relative_error


def reference_dequantize(weight, scale_inv):
    """Block by block, as DeepSeek's weight_dequant kernel computes it."""
    out = torch.empty(weight.shape, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rows, cols = slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128)
            out[rows, cols] = weight[rows, cols].float() * scale_inv[i, j]
    return out


@pytest.mark.parametrize("shape", [(576, 7168 // 8), (192, 300), (128, 128), (5, 7)])
def test_edge_blocks_and_scale_shapes(shape):
    weight = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    quantized, scale_inv = quantize_fp8_blockwise(weight)
    assert quantized.dtype == FP8_DTYPE and quantized.shape == weight.shape
    assert scale_inv.dtype == torch.float32 and tuple(scale_inv.shape) == scale_shape(shape)
    dequantized = dequantize_fp8_blockwise(quantized, scale_inv)
    assert torch.equal(dequantized, reference_dequantize(quantized, scale_inv))
    assert relative_error(dequantized, weight) < 0.04  # e4m3 has 3 mantissa bits


def test_kv_a_proj_shape_from_deepseek_v3():
    # [576, 7168] -> scale [5, 56]: transformers 5.23 infers block = 576 // 5 and fails on it.
    assert scale_shape((576, 7168)) == (5, 56)


def test_ue8m0_scales_are_powers_of_two():
    weight = torch.randn(300, 260)
    quantized, scale_inv = quantize_fp8_blockwise(weight, scale_fmt="ue8m0")
    assert torch.equal(scale_inv, torch.exp2(torch.log2(scale_inv).round()))
    assert relative_error(dequantize_fp8_blockwise(quantized, scale_inv), weight) < 0.06


def test_requantizing_a_dequantized_weight_is_exact():
    quantized, scale_inv = quantize_fp8_blockwise(torch.randn(256, 384))
    again, again_scale = quantize_fp8_blockwise(dequantize_fp8_blockwise(quantized, scale_inv))
    assert torch.equal(again.view(torch.uint8), quantized.view(torch.uint8))
    assert torch.equal(again_scale, scale_inv)


def test_stacked_experts_quantize_per_expert():
    weights = torch.randn(4, 64, 200)
    quantized, scale_inv = quantize_fp8_blockwise(weights)
    assert scale_inv.shape == (4, 1, 2)
    for expert in range(4):
        single, single_scale = quantize_fp8_blockwise(weights[expert])
        assert torch.equal(quantized[expert].view(torch.uint8), single.view(torch.uint8))
        assert torch.equal(scale_inv[expert], single_scale)


def test_wrong_scale_shape_is_an_error_not_a_guess():
    quantized, scale_inv = quantize_fp8_blockwise(torch.randn(192, 256))
    with pytest.raises(ValueError, match=r"weight_scale_inv has shape \[1, 2\], expected \[2, 2\]"):
        dequantize_fp8_blockwise(quantized, scale_inv[:1])
