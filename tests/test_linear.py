"""One half-precision row on the CPU as a matrix-vector product (modeling_deepseek_moe/linear.py), in the
projections and in the routed experts' decode-sized grouped product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_deepseek_moe.grouped_mm import columns_product
from modeling_deepseek_moe.linear import Linear, linear, one_row

from conftest import relative_error


def test_one_row_is_the_only_case_taken():
    weight = torch.randn(8, 16, dtype=torch.bfloat16)
    assert one_row(torch.randn(1, 1, 16, dtype=torch.bfloat16), weight)
    assert not one_row(torch.randn(2, 16, dtype=torch.bfloat16), weight)  # two rows: F.linear
    assert not one_row(torch.randn(1, 16), weight.float())  # float32 runs the same either way
    assert not one_row(torch.randn(1, 16, dtype=torch.bfloat16, requires_grad=True), weight)  # training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_equals_f_linear_within_one_rounding(dtype):
    layer = Linear(300, 200, bias=True).to(dtype)
    x = torch.randn(1, 1, 300, dtype=dtype)
    with torch.no_grad():
        output = layer(x)
    expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert output.shape == (1, 1, 200) and output.dtype == dtype
    assert relative_error(output, expected) < 2**-7
    assert relative_error(output, F.linear(x, layer.weight, layer.bias)) < 2**-7


def test_gradients_go_through_f_linear():
    layer = Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(1, 16, dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_few_rows_of_bf16_experts_row_by_row():
    weight = torch.randn(8, 24, 40, dtype=torch.bfloat16)
    counts = torch.tensor([1, 0, 2, 0, 0, 1, 0, 0])  # decode-sized: at most one row per two experts
    offsets = counts.cumsum(0).to(torch.int32)
    columns = torch.randn(40, 4, dtype=torch.bfloat16)
    output = columns_product(weight, columns, offsets)
    expert_of_column = torch.repeat_interleave(torch.arange(8), counts)
    expected = torch.einsum("coi,ic->oc", weight[expert_of_column].float(), columns.float())
    assert output.shape == (24, 4) and relative_error(output, expected) < 2**-7


def test_compiled_one_row_equals_eager():
    layer = Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))
