"""A few half-precision rows on the CPU as matrix-vector products (modeling_deepseek_moe/linear.py), in the
projections and in the routed experts' decode-sized grouped product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_deepseek_moe.grouped_mm import columns_product
from modeling_deepseek_moe.linear import FEW_ROWS, Linear, few_half_rows

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
