"""A few half-precision rows on the CPU as matrix-vector products (modeling_deepseek_moe/linear.py), in the
projections and in the routed experts' decode-sized grouped product; more rows in float32 on a CPU without
instructions for half-precision products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_deepseek_moe.grouped_mm import columns_product
from modeling_deepseek_moe import linear as linear_module
from modeling_deepseek_moe.linear import FEW_ROWS, Linear, few_half_rows, linear, native_half_products

from conftest import relative_error


def test_few_half_rows_are_the_only_case_taken():
    weight = torch.randn(8, 16, dtype=torch.bfloat16)
    assert few_half_rows(torch.randn(1, 1, 16, dtype=torch.bfloat16), weight)
    assert few_half_rows(torch.randn(1, FEW_ROWS, 16, dtype=torch.bfloat16), weight)
    assert not few_half_rows(torch.randn(FEW_ROWS + 1, 16, dtype=torch.bfloat16), weight)  # more rows: F.linear
    assert not few_half_rows(torch.randn(0, 16, dtype=torch.bfloat16), weight)
    assert not few_half_rows(torch.randn(1, 16), weight.float())  # float32 runs the same either way
    assert not few_half_rows(torch.randn(1, 16, dtype=torch.bfloat16, requires_grad=True), weight)  # training
    assert not few_half_rows(torch.randn(1, 16, dtype=torch.bfloat16), weight.clone().requires_grad_())


@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_equals_f_linear_within_one_rounding(dtype, rows):
    layer = Linear(300, 200, bias=True).to(dtype)
    x = torch.randn(1, rows, 300, dtype=dtype)
    with torch.no_grad():
        output = layer(x)
    expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert output.shape == (1, rows, 200) and output.dtype == dtype
    assert relative_error(output, expected) < 2**-7
    assert relative_error(output, F.linear(x, layer.weight, layer.bias)) < 2**-7


def test_gradients_go_through_f_linear():
    layer = Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(1, 16, dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_few_half_rows_of_bf16_experts_row_by_row():
    weight = torch.randn(8, 24, 40, dtype=torch.bfloat16)
    counts = torch.tensor([1, 0, 2, 0, 0, 1, 0, 0])  # decode-sized: at most one row per two experts
    offsets = counts.cumsum(0).to(torch.int32)
    columns = torch.randn(40, 4, dtype=torch.bfloat16)
    output = columns_product(weight, columns, offsets)
    expert_of_column = torch.repeat_interleave(torch.arange(8), counts)
    expected = torch.einsum("coi,ic->oc", weight[expert_of_column].float(), columns.float())
    assert output.shape == (24, 4) and relative_error(output, expected) < 2**-7


@pytest.mark.parametrize("rows", [1, FEW_ROWS])
def test_compiled_few_half_rows_equal_eager(rows):
    layer = Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(1, rows, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))


@pytest.mark.parametrize("capabilities, bf16, fp16", [
    ({}, True, True),  # a CPU torch does not describe: its products as they are
    ({"avx2": True, "fma3": True}, False, False),  # AVX2 only (an AMD EPYC Zen 3)
    ({"avx2": True, "avx512_f": True, "avx512_bf16": True}, True, False),  # an AMD EPYC Zen 4
    ({"avx2": True, "amx_bf16": True, "amx_fp16": True}, True, True),  # an Intel Xeon with AMX-FP16
    ({"neon": True, "bf16": True}, True, False),
])
def test_native_half_products_read_the_cpu_capabilities(monkeypatch, capabilities, bf16, fp16):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert native_half_products.__wrapped__(torch.bfloat16) is bf16
    assert native_half_products.__wrapped__(torch.float16) is fp16


@pytest.fixture
def float32_products(monkeypatch):
    """A CPU without half-precision product instructions, weights converted by tiles of 7 rows; records the
    (dtype, shape) of every weight F.linear receives."""
    monkeypatch.setattr(linear_module, "native_half_products", lambda dtype: False)
    monkeypatch.setattr(linear_module, "FLOAT32_TILE_BYTES", 4 * 64 * 7)
    weights, original = [], F.linear

    def recording_linear(x, weight, bias=None):
        weights.append((weight.dtype, tuple(weight.shape)))
        return original(x, weight, bias)

    monkeypatch.setattr(linear_module.F, "linear", recording_linear)
    return weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_many_half_rows_without_product_instructions_run_in_float32_tiles(float32_products, dtype):
    x, weight, bias = torch.randn(2, 10, 64, dtype=dtype), torch.randn(30, 64, dtype=dtype), torch.randn(30, dtype=dtype)
    with torch.no_grad():
        output = linear(x, weight, bias)
    assert float32_products == [(torch.float32, (7, 64))] * 4 + [(torch.float32, (2, 64))]  # 30 rows: 7 + 7 + 7 + 7 + 2
    expected = F.linear(x.float(), weight.float(), bias.float())
    assert output.dtype == dtype and output.shape == (2, 10, 30)
    assert relative_error(output, expected) < 2**-8  # float32 sums, rounded once


def test_half_rows_needing_gradients_keep_half_precision_products(float32_products):
    x = torch.randn(10, 64, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(30, 64, dtype=torch.bfloat16)
    linear(x, weight).sum().backward()  # autograd would keep the float32 copies
    assert float32_products == [(torch.bfloat16, (30, 64))] and x.grad is not None


def test_grouped_half_products_without_product_instructions_convert_one_expert_at_a_time(float32_products):
    weight = torch.randn(4, 30, 64, dtype=torch.bfloat16)
    columns = torch.randn(64, 40, dtype=torch.bfloat16)
    offsets = torch.tensor([10, 10, 30, 40], dtype=torch.int32)  # expert 1 receives nothing
    output = columns_product(weight, columns, offsets)
    assert all(dtype == torch.float32 and shape[0] <= 7 for dtype, shape in float32_products)
    assert len(float32_products) == 3 * 5  # three experts with rows, 5 tiles each
    expected = torch.cat([weight[0].float() @ columns[:, :10].float(), weight[2].float() @ columns[:, 10:30].float(),
                          weight[3].float() @ columns[:, 30:].float()], dim=1)
    assert relative_error(output, expected) < 2**-8
