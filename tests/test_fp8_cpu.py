"""The FP8 decode kernel (modeling_deepseek_moe/fp8_cpu.py): a few rows against block-wise FP8 weights,
read one byte per weight, equal to the product with the dequantized float32 weight."""

from __future__ import annotations

import copy
import platform
import shutil

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from modeling_deepseek_moe import (DeepseekMoEV1Config, DeepseekMoEV2Config, DeepseekMoEV3Config, DeepseekMoEV3ForCausalLM, attention,
                                   fp8, fp8_cpu, frozen, grouped_mm)
from modeling_deepseek_moe.fp8 import FP8Linear, dequantize_fp8_blockwise, dequantize_stacked, quantize_fp8_blockwise, quantize_stacked
from modeling_deepseek_moe.norm import RMSNorm
from modeling_deepseek_moe.rope import apply_rotary_interleaved
from modeling_deepseek_moe.routing import RouterOutput, TopKRouter
from modeling_deepseek_moe.synthetic import write_fp8_official_checkpoint

from conftest import relative_error

BUILDS_HERE = platform.machine() in ("x86_64", "AMD64") and shutil.which("c++") is not None


def test_the_kernel_builds_where_a_compiler_and_x86_vectors_are():
    if not BUILDS_HERE:
        pytest.skip("the kernel is x86 (AVX2/AVX-512) and needs a C++ compiler")
    assert fp8_cpu.kernel() is not None


@pytest.fixture
def decode_kernel():
    if fp8_cpu.kernel() is None:
        pytest.skip("no FP8 decode kernel on this machine (the dequantize path serves)")


@pytest.mark.parametrize("block", [(128, 128), (16, 16), (16, 32)])
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16, 17, 32])  # runs of 4, 2, 1 rows; more than one chunk of 16
def test_linear_equals_the_dequantized_float32_product(decode_kernel, block, rows):
    generator = torch.Generator().manual_seed(rows)
    weight, scale_inv = quantize_fp8_blockwise(torch.randn(200, 300, generator=generator), block)  # partial blocks
    x, bias = torch.randn(rows, 300, generator=generator), torch.randn(200, generator=generator)
    expected = torch.nn.functional.linear(x, dequantize_fp8_blockwise(weight, scale_inv, block=block), bias)
    with torch.no_grad():
        output = fp8.fp8_linear(x, weight, scale_inv, bias, mode="dequantize", block=block)
    assert relative_error(output, expected) < 1e-6


def test_grouped_experts_with_gate_and_up_quantized_apart_and_empty_experts(decode_kernel):
    block, half = (16, 16), 40  # gate and up of 40 rows each: the second part starts inside a block row
    weight, scale_inv = quantize_stacked(torch.randn(6, 2 * half, 56), 2, block)
    counts = [2, 0, 5, 1, 0, 17]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    rows = torch.randn(sum(counts), 56)
    dense = dequantize_stacked(weight, scale_inv, 2, torch.float32, block)
    expert_of_row = torch.repeat_interleave(torch.arange(6), torch.tensor(counts))
    expected = torch.einsum("noi,ni->no", dense[expert_of_row], rows)
    with torch.no_grad():
        output = fp8.fp8_grouped_linear(weight, scale_inv, rows, offsets, 2, "dequantize", block)
    assert relative_error(output, expected) < 1e-6


@pytest.mark.parametrize("counts, kernel", [([40, 1, 0, 1, 2, 0], True), ([0, 40, 0, 0, 40, 0], False)])
def test_grouped_experts_go_to_the_kernel_by_their_mean_rows(decode_kernel, monkeypatch, counts, kernel):
    """One popular expert over MAX_ROWS rows no longer sends every expert to dequantizing: the kernel pays per row,
    dequantizing per expert with rows, so the mean over the experts with rows decides."""
    monkeypatch.setattr(fp8_cpu, "MAX_ROWS", 32)
    calls = []
    real = fp8_cpu.grouped_rows_product
    monkeypatch.setattr(fp8_cpu, "grouped_rows_product", lambda *a: calls.append(1) or real(*a))
    weight, scale_inv = quantize_stacked(torch.randn(6, 64, 64), 2, (16, 16))
    rows = torch.randn(sum(counts), 64)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    dense = dequantize_stacked(weight, scale_inv, 2, torch.float32, (16, 16))
    expected = torch.einsum("noi,ni->no", dense[torch.repeat_interleave(torch.arange(6), torch.tensor(counts))], rows)
    with torch.no_grad():
        output = fp8.fp8_grouped_linear(weight, scale_inv, rows, offsets, 2, "dequantize", (16, 16))
    assert bool(calls) == kernel and relative_error(output, expected) < 1e-6


@pytest.mark.parametrize("budget, reused", [(2**20, True), (1024, False)])
def test_dequantized_weights_of_a_prefill_are_written_into_the_threads_buffer(decode_kernel, monkeypatch, budget, reused):
    """Prefill-sized products dequantize into the thread's reused buffer (fresh pages per weight cost more than
    the dequantization); a weight over the budget that cannot be tiled gets a fresh tensor."""
    monkeypatch.setattr(fp8, "DEQUANTIZE_BUDGET_BYTES", budget)
    monkeypatch.setattr(frozen, "DEQUANTIZE_BUDGET_BYTES", budget)
    module, buffers = fp8_cpu._module(), []

    class Spy:
        def __getattr__(self, name):
            return getattr(module, name)

        def fp8_dequantize(self, *args):
            buffers.append(args[-1])
            return module.fp8_dequantize(*args)

    weight, scale_inv = quantize_fp8_blockwise(torch.randn(64, 128), (64, 128))  # one block: no row tiles
    x = torch.randn(fp8_cpu.MAX_ROWS + 8, 128)
    expected = x @ dequantize_fp8_blockwise(weight, scale_inv, block=(64, 128)).t()
    monkeypatch.setitem(fp8_cpu._KERNEL, "module", Spy())
    with torch.no_grad():
        output = fp8.fp8_linear(x, weight, scale_inv, mode="dequantize", block=(64, 128))
    assert relative_error(output, expected) < 1e-6
    (buffer,) = buffers
    assert (buffer is not None and buffer.data_ptr() == frozen.scratch(1, torch.float32, x.device).data_ptr()) == reused


def test_bf16_activations_within_bf16_rounding(decode_kernel):
    weight, scale_inv = quantize_fp8_blockwise(torch.randn(256, 384))
    x = torch.randn(4, 384).bfloat16()
    expected = x.float() @ dequantize_fp8_blockwise(weight, scale_inv).t()
    with torch.no_grad():
        output = fp8.fp8_linear(x, weight, scale_inv, mode="dequantize")
    assert output.dtype == torch.bfloat16
    assert relative_error(output, expected) < 2 ** -8  # the result rounded once to bf16


@pytest.mark.parametrize("block", [(128, 128), (16, 16), (16, 40), (64, 64)])
@pytest.mark.parametrize("rows", [1, 2, 5, 17])  # runs of 4, 2, 1 rows; two chunks
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 3e4])  # float16 products: x is brought into range first
@pytest.mark.parametrize("columns", [300, 320])  # 320 with blocks of 64 or 128: bf16 dot products (avx512_bf16)
def test_bf16_activations_equal_the_float64_product_within_bf16_rounding(decode_kernel, block, rows, magnitude, columns):
    generator = torch.Generator().manual_seed(rows)
    weight, scale_inv = quantize_fp8_blockwise(torch.randn(200, columns, generator=generator), block)  # partial blocks
    x = (torch.randn(rows, columns, generator=generator) * magnitude).bfloat16()
    x[0, 7] *= 100  # one outlier, as activations have
    expected = x.double() @ dequantize_fp8_blockwise(weight, scale_inv, block=block).double().t()
    with torch.no_grad():
        output = fp8.fp8_linear(x, weight, scale_inv, mode="dequantize", block=block)
    assert output.dtype == torch.bfloat16
    assert relative_error(output, expected) < 2 ** -8  # the result rounded once to bf16
    assert (output.double() - expected).abs().max() < 2 ** -7 * expected.abs().max()


def test_served_only_without_gradients_and_up_to_max_rows(kernel_calls):
    weight, scale_inv = quantize_fp8_blockwise(torch.randn(128, 128))
    x = torch.randn(2, 128, requires_grad=True)
    fp8.fp8_linear(x, weight, scale_inv, mode="dequantize").sum().backward()  # training: dequantize path
    assert "fp8_grouped_gemv" not in kernel_calls and x.grad is not None
    with torch.no_grad():
        fp8.fp8_linear(x, weight, scale_inv, mode="dequantize")
        assert kernel_calls.count("fp8_grouped_gemv") == 1
        fp8.fp8_linear(torch.randn(fp8_cpu.MAX_ROWS + 1, 128), weight, scale_inv, mode="dequantize")
    assert kernel_calls.count("fp8_grouped_gemv") == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_inputs_with_leading_dimensions_go_to_the_kernel_as_they_are(decode_kernel, monkeypatch, dtype):
    """FP8Linear's input [batch, seq, in] (contiguous or not) reaches the kernel without a reshape: the output has
    its leading dimensions and the numbers of the two-dimensional product."""
    module, shapes = fp8_cpu._module(), []

    class Spy:
        def fp8_grouped_gemv(self, weight, scale, rows, *settings):
            shapes.append(tuple(rows.shape))
            return module.fp8_grouped_gemv(weight, scale, rows, *settings)

        def __getattr__(self, name):
            return getattr(module, name)

    monkeypatch.setitem(fp8_cpu._KERNEL, "module", Spy())
    layer = FP8Linear(256, 384)
    layer.set_weight(torch.randn(384, 256))
    x = torch.randn(2, 3, 256).to(dtype)
    expected = x.float().reshape(6, 256) @ layer.dequantized_weight().t()
    with torch.no_grad():
        outputs = [layer(x), layer(x.transpose(0, 1)).transpose(0, 1)]
    assert shapes == [(2, 3, 256), (3, 2, 256)]
    for output in outputs:
        assert output.shape == (2, 3, 384) and output.dtype == dtype
        assert relative_error(output.reshape(6, 384), expected) < (2 ** -8 if dtype == torch.bfloat16 else 1e-6)


def test_model_logits_and_greedy_tokens_with_and_without_the_kernel(kernel_calls, tmp_path, monkeypatch):
    write_fp8_official_checkpoint(tmp_path, "v3")
    model = DeepseekMoEV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, fp8_compute="dequantize")
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))

    def decode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                              output_scores=True, return_dict_in_generate=True)

    with_kernel = decode()
    assert "fp8_grouped_gemv" in kernel_calls and "routed_mixture" in kernel_calls, "the decode steps went around the kernel"
    monkeypatch.setattr(fp8_cpu, "MAX_ROWS", 0)  # every product dequantizes its weight
    without = decode()
    assert torch.equal(with_kernel.sequences, without.sequences)
    for a, b in zip(with_kernel.scores, without.scores):
        assert relative_error(a, b) < 1e-5


def test_without_a_kernel_the_dequantize_path_serves(monkeypatch):
    monkeypatch.setitem(fp8_cpu._KERNEL, "module", None)  # as where it cannot be built
    weight, scale_inv = quantize_fp8_blockwise(torch.randn(128, 256))
    x = torch.randn(1, 256)
    with torch.no_grad():
        output = fp8.fp8_linear(x, weight, scale_inv, mode="dequantize")
    assert relative_error(output, x @ dequantize_fp8_blockwise(weight, scale_inv).t()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, block", [((200, 300), (16, 16)), ((3, 64, 48), (16, 32)), ((5, 700), (1, 128)),
                                          ((256, 384), (128, 128))])
def test_kernel_dequantization_is_bit_identical_to_the_torch_path(decode_kernel, monkeypatch, shape, block, dtype):
    weight, scale_inv = quantize_fp8_blockwise(torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3, block)
    by_kernel = dequantize_fp8_blockwise(weight, scale_inv, dtype, block)
    monkeypatch.setitem(fp8_cpu._KERNEL, "module", None)
    by_torch = dequantize_fp8_blockwise(weight, scale_inv, dtype, block)
    assert by_kernel.dtype == dtype and torch.equal(by_kernel, by_torch)


@pytest.mark.parametrize("heads, nope, v, latent, block", [(4, 128, 128, 512, (128, 128)), (3, 16, 32, 64, (16, 16)),
                                                           (2, 64, 64, 256, (128, 128)), (2, 32, 96, 128, (128, 128))])
@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 3)])
def test_kv_b_head_rows_read_in_place(decode_kernel, heads, nope, v, latent, block, batch, seq):
    weight, scale_inv = quantize_fp8_blockwise(torch.randn(heads * (nope + v), latent), block)
    dense = dequantize_fp8_blockwise(weight, scale_inv, block=block).view(heads, nope + v, latent)
    query, context = torch.randn(batch, heads, seq, nope), torch.randn(batch, heads, seq, latent)
    with torch.no_grad():
        query_latent = fp8_cpu.head_rows_product(weight, scale_inv, block, heads, 0, nope, query, transposed=True)
        values = fp8_cpu.head_rows_product(weight, scale_inv, block, heads, nope, v, context, transposed=False)
    assert relative_error(query_latent, torch.einsum("bhsd,hdc->bhsc", query, dense[:, :nope])) < 1e-6
    assert relative_error(values, torch.einsum("bhsc,hvc->bhsv", context, dense[:, nope:])) < 1e-6


@pytest.mark.parametrize("per_head, first, count", [(96, 0, 32), (256, 64, 128)])
def test_kv_b_head_rows_that_do_not_map_onto_scale_rows_are_refused(decode_kernel, per_head, first, count):
    """Heads that do not start a scale row, or a slice from inside one scale row into the next: the kernel would
    count the wrong scale rows, so the caller's batched products serve."""
    weight, scale_inv = quantize_fp8_blockwise(torch.randn(2 * per_head, 128), (128, 128))
    x = torch.randn(1, 2, 1, count)
    with torch.no_grad():
        assert fp8_cpu.head_rows_product(weight, scale_inv, (128, 128), 2, first, count, x, transposed=True) is None


@pytest.mark.parametrize("heads, nope, v, latent", [(4, 128, 128, 512), (3, 16, 32, 48)])
@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 3)])
def test_bf16_kv_b_head_rows_read_in_place(decode_kernel, heads, nope, v, latent, batch, seq):
    weight = torch.randn(heads * (nope + v), latent).bfloat16()
    dense = weight.double().view(heads, nope + v, latent)
    query, context = torch.randn(batch, heads, seq, nope).bfloat16(), torch.randn(batch, heads, seq, latent).bfloat16()
    with torch.no_grad():
        query_latent = fp8_cpu.head_rows_product(weight, None, None, heads, 0, nope, query, transposed=True)
        values = fp8_cpu.head_rows_product(weight, None, None, heads, nope, v, context, transposed=False)
    assert query_latent.dtype == values.dtype == torch.bfloat16
    assert relative_error(query_latent.double(), torch.einsum("bhsd,hdc->bhsc", query.double(), dense[:, :nope])) < 4e-3
    assert relative_error(values.double(), torch.einsum("bhsc,hvc->bhsv", context.double(), dense[:, nope:])) < 4e-3
    assert fp8_cpu.head_rows_product(weight.float(), None, None, heads, 0, nope, query.float(), transposed=True) is None


@pytest.mark.parametrize("batch, rows, total", [(1, 16, 65), (2, 3, 40), (1, 13, 300), (1, 128, 7)])
def test_shared_rows_product_reads_each_sequences_keys(decode_kernel, batch, rows, total):
    """Absorbed MLA's scores (every head's query row against its own sequence's cached keys) and attended values,
    the cache read in place with room beyond it (a static cache's buffer)."""
    generator = torch.Generator().manual_seed(rows)
    buffer = torch.randn(batch, total + 9, 64, generator=generator).bfloat16()
    keys, x = buffer[:, :total], torch.randn(batch, rows, 64, generator=generator).bfloat16()
    weights = torch.randn(batch, rows, total, generator=generator).softmax(-1).bfloat16()
    with torch.no_grad():
        scores = fp8_cpu.shared_rows_product(x, keys)
        attended = fp8_cpu.shared_rows_product(weights, keys, transposed=True)
    assert scores.shape == (batch, rows, total) and scores.dtype == torch.bfloat16
    assert relative_error(scores.double(), torch.einsum("bnk,btk->bnt", x.double(), keys.double())) < 4e-3
    if rows > fp8_cpu.SHARED_VALUES_MAX_ROWS:  # torch's GEMM is the faster there
        assert attended is None
    else:
        assert attended.shape == (batch, rows, 64) and attended.dtype == torch.bfloat16
        assert relative_error(attended.double(), torch.einsum("bnt,btk->bnk", weights.double(), keys.double())) < 4e-3
    long_keys = torch.zeros(1, fp8_cpu.SHARED_VALUES_MAX_SLOTS + 1, 64).bfloat16()  # and there
    assert fp8_cpu.shared_rows_product(torch.zeros(1, 1, long_keys.shape[1]).bfloat16(), long_keys, transposed=True) is None
    assert fp8_cpu.shared_rows_product(x.float(), keys.float()) is None  # float32 keys: torch's product
    assert fp8_cpu.shared_rows_product(x.requires_grad_(), keys) is None  # training: torch's product


@pytest.mark.parametrize("batch, heads, new, total, positioned", [(1, 16, 1, 65, False), (2, 4, 3, 40, False),
                                                                  (1, 16, 1, 48, True), (2, 3, 2, 33, True)])
def test_absorbed_scores_in_one_call_equal_the_unfused_steps(decode_kernel, batch, heads, new, total, positioned):
    """Absorbed MLA's scores for a decoding step in one kernel call: bit for bit the two in-place products, their bf16
    sum, the float32 scaling and the causal mask of the unfused steps; the cache read in place with room beyond it
    (a static cache's buffer), the queries placed by their positions or as the last slots."""
    generator = torch.Generator().manual_seed(total)
    latent = torch.randn(batch, 1, total + 7, 64, generator=generator).bfloat16()[:, :, :total]
    key_rope = torch.randn(batch, 1, total + 7, 16, generator=generator).bfloat16()[:, :, :total]
    query_latent = torch.randn(batch, heads, new, 64, generator=generator).bfloat16()
    query_rope = torch.randn(batch, heads, new, 16, generator=generator).bfloat16()
    positions = torch.tensor([[total - 9 + i for i in range(new)]] * batch) if positioned else None
    scaling = 0.1234567
    with torch.no_grad():
        fused = fp8_cpu.absorbed_scores(query_latent, query_rope, latent, key_rope, scaling, positions)
        rows = (batch, heads * new, -1)
        expected = (fp8_cpu.shared_rows_product(query_latent.reshape(rows), latent[:, 0])
                    + fp8_cpu.shared_rows_product(query_rope.reshape(rows), key_rope[:, 0])).view(batch, heads, new, total)
        expected = expected.float() * scaling
        last = positions if positioned else torch.arange(total - new, total)[None]
        expected = expected.masked_fill(~(torch.arange(total)[None, None, :] <= last[:, :, None])[:, None], float("-inf"))
    assert fused.dtype == torch.float32 and torch.equal(fused, expected)
    assert fp8_cpu.absorbed_scores(query_latent.float(), query_rope.float(), latent.float(), key_rope.float(), scaling,
                                   positions) is None  # float32: torch's products
    assert fp8_cpu.absorbed_scores(query_latent.requires_grad_(), query_rope, latent, key_rope, scaling, positions) is None


def test_compiled_bf16_absorbed_decoding_calls_the_kernel(decode_kernel, official_checkpoint, monkeypatch):
    """A compiled static-cache step takes the scores and values from the kernel's operators too, with the eager logits."""
    from torch._inductor.utils import run_and_get_code
    from transformers import StaticCache

    directory, _, _ = official_checkpoint("v3", kv_lora_rank=32)
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, mla_absorb="decode")
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=16)
    step = torch.tensor([[7]])
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        positions = torch.tensor([6])
        eager = model(step, cache=copy.deepcopy(cache), cache_position=positions, use_cache=True).logits
        torch._dynamo.reset()
        traced = []
        monkeypatch.setattr(attention, "shared_rows_product", lambda *args, **kw: traced.append(1) or fp8_cpu.shared_rows_product(*args, **kw))
        compiled, code = run_and_get_code(torch.compile(
            lambda: model(step, cache=cache, cache_position=positions, use_cache=True).logits, fullgraph=True))
    assert len(traced) == 3 * model.config.num_hidden_layers  # traced once: latent and RoPE keys, the values, every layer
    assert f"torch.ops.{fp8_cpu.kernel().__name__}.bf16_grouped_gemv.default(" in code[0]
    # Inductor's own fusion of the bf16 elementwise work moves these logits by 1.3%, with or without the kernel
    assert relative_error(compiled.float(), eager.float()) < 3e-2 and torch.equal(compiled.argmax(-1), eager.argmax(-1))


# per absorbed step and layer: kv_b_proj's head rows for the queries and the values; the scores against the cached
# latent and RoPE keys in one call; the latent for the attended values
@pytest.mark.parametrize("product, calls_per_step, batch", [("head_rows_product", 2, 1), ("shared_rows_product", 1, 2),
                                                            ("absorbed_scores", 1, 2)])
def test_bf16_absorbed_decoding_reads_kv_b_proj_and_the_cache_in_place(decode_kernel, official_checkpoint, monkeypatch,
                                                                        product, calls_per_step, batch):
    directory, _, _ = official_checkpoint("v3", kv_lora_rank=32)
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, mla_absorb="decode")
    ids = torch.randint(0, 256, (batch, 6), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
    calls = []
    real = getattr(fp8_cpu, product)
    monkeypatch.setattr(attention, product, lambda *args, **kw: calls.append(1) or real(*args, **kw))
    in_place = model.generate(ids, **kwargs)
    assert len(calls) == calls_per_step * 7 * model.config.num_hidden_layers  # 7 absorbed steps, every layer
    monkeypatch.setattr(attention, product, lambda *args, **kw: None)  # the batched torch products
    batched = model.generate(ids, **kwargs)
    assert torch.equal(in_place.sequences, batched.sequences)
    assert relative_error(torch.stack(in_place.logits).float(), torch.stack(batched.logits).float()) < 1e-2


def test_absorbed_decoding_reads_an_fp8_kv_b_proj_in_place(decode_kernel, tmp_path, monkeypatch):
    # heads of 128 + 128 rows: each head's key and value rows are whole 128 x 128 scale blocks, as in V3
    write_fp8_official_checkpoint(tmp_path, "v3", num_attention_heads=2, qk_nope_head_dim=128, v_head_dim=128,
                                  kv_lora_rank=128)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    calls = []
    real = fp8_cpu.head_rows_product
    monkeypatch.setattr(attention, "head_rows_product", lambda *a, **k: calls.append(1) or real(*a, **k))
    outputs = {}
    for mode in ("decode", "never"):
        model = DeepseekMoEV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, mla_absorb=mode)
        outputs[mode] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                       output_scores=True, return_dict_in_generate=True)
        if mode == "decode":  # no float copy of kv_b_proj kept
            assert calls and all("_dequantized" not in layer.self_attn.kv_b_proj.__dict__ for layer in model.model.layers)
    assert torch.equal(outputs["decode"].sequences, outputs["never"].sequences)
    for a, b in zip(outputs["decode"].scores, outputs["never"].scores):
        assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize("counts", [[1, 0, 1, 1, 0, 0, 1, 1], [0, 5, 0, 0, 2, 0, 0, 1], [0] * 7 + [3], [17, 0, 0, 0, 0, 0, 0, 0]])
def test_bf16_stacked_experts_equal_the_per_expert_products(decode_kernel, counts):
    """The bf16 decode kernel (every expert in one call) against torch, expert by expert: float32 sums of the
    same products, so equal up to the order of the sums, then the same bf16 rounding."""
    generator = torch.Generator().manual_seed(sum(counts))
    weight = (torch.randn(8, 200, 300, generator=generator) * 0.05).bfloat16()  # 300: a partial vector at the end
    ends = torch.tensor(counts).cumsum(0)
    rows = torch.randn(int(ends[-1]), 300, generator=generator).bfloat16()
    expected = grouped_mm._looped_rows_product(weight.double(), rows.double(), ends.to(torch.int32))
    output = fp8_cpu.kernel().bf16_grouped_gemv(weight, rows, ends)  # (17 rows: two chunks of one expert)
    assert output.dtype == torch.bfloat16
    assert relative_error(output.double(), expected) < 4e-3  # bf16 rounding of the results (2^-9)
    assert relative_error(output.float(), grouped_mm._looped_rows_product(weight, rows, ends.to(torch.int32)).float()) < 4e-3


def test_bf16_decode_sized_expert_products_go_through_the_kernel(decode_kernel, monkeypatch):
    calls = []
    monkeypatch.setattr(grouped_mm, "bf16_grouped_product", lambda *args: calls.append(args) or fp8_cpu.bf16_grouped_product(*args))
    weight = torch.randn(8, 64, 32).bfloat16()
    rows, offsets = torch.randn(3, 32).bfloat16(), torch.tensor([1, 1, 2, 3, 3, 3, 3, 3], dtype=torch.int32)
    with torch.no_grad():
        output = grouped_mm.grouped_linear(weight, rows, offsets)
    assert len(calls) == 1
    assert torch.equal(output, fp8_cpu.bf16_grouped_product(weight, rows, offsets))
    with torch.no_grad():  # compiled: the token-major operator (deepseek_moe::grouped_rows) runs it too
        compiled = torch.compile(grouped_mm.grouped_linear, fullgraph=True)(weight, rows, offsets)
    assert len(calls) == 2 and torch.equal(compiled, output)
    more = fp8_cpu.MAX_ROWS + 1
    assert fp8_cpu.bf16_grouped_product(weight, torch.randn(more, 32).bfloat16(), torch.full((8,), more)) is None


@pytest.mark.parametrize("rows", [1, 4])  # 4: the bf16 dot products where the CPU has them
def test_few_bf16_rows_go_through_the_kernel_eager_and_compiled(decode_kernel, monkeypatch, rows):
    from modeling_deepseek_moe import linear

    calls = []
    monkeypatch.setattr(linear, "bf16_grouped_product", lambda *args: calls.append(args) or fp8_cpu.bf16_grouped_product(*args))
    layer = linear.Linear(300, 200).to(torch.bfloat16)
    x = torch.randn(1, rows, 300, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = layer(x)
        assert len(calls) == 1
        compiled = torch.compile(layer, fullgraph=True)(x)  # (traced once: the kernel's operator in the graph)
        assert len(calls) == 2
    assert torch.equal(eager, compiled)
    assert relative_error(eager, torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())) < 2**-8


@pytest.mark.parametrize("batch", [4, 8])  # 4 and 8 rows per projection: the bf16 dot products
def test_bf16_batched_decoding_steps_go_through_the_kernel_and_equal_torchs_products(decode_kernel, official_checkpoint,
                                                                                      monkeypatch, batch):
    """A few sequences decoded together in bf16: every projection's rows and the routed mixture in one kernel call
    each, the step's logits within bf16's rounding of the same model through F.linear and the dispatcher (float32
    sums of the same products in another order), the same greedy tokens."""
    from modeling_deepseek_moe import experts, linear

    rows, mixtures = [], []
    monkeypatch.setattr(linear, "bf16_grouped_product", lambda weight, x, ends: rows.append(x.numel() // x.shape[-1])
                        or fp8_cpu.bf16_grouped_product(weight, x, ends))
    monkeypatch.setattr(experts, "routed_mixture", lambda *args: mixtures.append(len(args[0])) or fp8_cpu.routed_mixture(*args))
    directory, _, _ = official_checkpoint("v3")
    model = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    ids = torch.randint(3, 256, (batch, 6), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        prefill = model(ids, use_cache=True)
        step_ids = prefill.logits[:, -1:].argmax(-1)
        rows.clear(), mixtures.clear()
        fused = model(step_ids, past_key_values=copy.deepcopy(prefill.past_key_values)).logits[:, -1].float()
        assert rows and set(rows) == {batch}  # every bf16 projection of the step: one kernel call for the batch
        assert mixtures == [batch] * (model.config.num_hidden_layers - model.config.first_k_dense_replace)
        monkeypatch.setattr(linear, "FEW_ROWS", 0)  # F.linear
        monkeypatch.setattr(experts, "routed_mixture", lambda *args: None)  # the dispatcher's products
        stepwise = model(step_ids, past_key_values=prefill.past_key_values).logits[:, -1].float()
    assert relative_error(fused, stepwise) < 2e-2
    assert torch.equal(fused.argmax(-1), stepwise.argmax(-1))


@pytest.mark.parametrize("tokens", [1, 2, 12])  # tiny V3: 16 experts, top-4 (12 tokens: 48 rows, several per expert)
def test_decode_mixture_in_one_call_equals_the_dispatcher(decode_kernel, tmp_path, monkeypatch, tokens):
    """A decoding step's routed mixture in one kernel call (fp8_cpu.routed_mixture) against the dispatcher's
    steps: the same numbers for FP8 experts (the same products and aten operations in the same order); for bf16
    experts the dispatcher's products of more than MAX_ROWS rows in all run torch's, so within bf16 rounding."""
    from modeling_deepseek_moe import dispatch, experts

    calls = []
    monkeypatch.setattr(experts, "routed_mixture", lambda *a: calls.append(1) or fp8_cpu.routed_mixture(*a))
    write_fp8_official_checkpoint(tmp_path / "fp8", "v3")
    for dtype in (torch.float32, torch.bfloat16):
        moe = DeepseekMoEV3ForCausalLM.from_pretrained(tmp_path / "fp8", dtype=dtype, fp8_compute="dequantize").model.layers[1].mlp
        hidden = torch.randn(tokens, moe.config.hidden_size, generator=torch.Generator().manual_seed(tokens)).to(dtype)
        with torch.no_grad():
            routing = moe.gate(hidden)
            fused = moe.experts(hidden, routing.topk_indices, routing.topk_weights)
            stepwise = dispatch.sliced_mixture(moe.experts, hidden, routing.topk_indices, routing.topk_weights)
        assert len(calls) == 1 and torch.equal(fused, stepwise)
        calls.clear()
        chunk = moe.experts.chunks[0]
        bf16 = {name: chunk.dequantized(name, torch.bfloat16) for name in chunk.PARTS}
        with torch.no_grad():
            output = fp8_cpu.routed_mixture(hidden.bfloat16(), routing.topk_indices, routing.topk_weights,
                                            bf16["gate_up_proj"], None, bf16["down_proj"], None, None)
        expected = torch.zeros(tokens, hidden.shape[1], dtype=torch.float64)
        for token, (indices, weights) in enumerate(zip(routing.topk_indices, routing.topk_weights)):
            for expert, weight in zip(indices.tolist(), weights.tolist()):
                gate, up = (bf16["gate_up_proj"][expert].double() @ hidden[token].double()).chunk(2)
                expected[token] += bf16["down_proj"][expert].double() @ (torch.nn.functional.silu(gate) * up * weight)
        assert output.dtype == torch.bfloat16 and relative_error(output.double(), expected) < 2e-2  # bf16 steps


def test_decode_mixture_served_only_up_to_max_rows_tokens_without_gradients(decode_kernel, tmp_path):
    write_fp8_official_checkpoint(tmp_path, "v3")
    moe = DeepseekMoEV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, fp8_compute="dequantize").model.layers[1].mlp
    chunk = moe.experts.chunks[0]

    def served(tokens: int, grad: bool = False) -> bool:
        hidden = torch.randn(tokens, moe.config.hidden_size, requires_grad=grad)
        routing = moe.gate(hidden)
        return chunk.decode_mixture(hidden, routing.topk_indices, routing.topk_weights) is not None

    with torch.no_grad():
        assert served(2) and served(fp8_cpu.MAX_ROWS)  # (up to MAX_ROWS rows against an expert's weights)
        assert not served(fp8_cpu.MAX_ROWS + 1)  # the dispatcher's products
    assert not served(1, grad=True)
    chunk.fp8["mode"] = "scaled"  # FP8-emulated activations go through the dispatcher's products
    with torch.no_grad():
        assert not served(1)
    hidden, indices = torch.randn(1, moe.config.hidden_size), torch.tensor([[0, 1, 2, 99]])
    with torch.no_grad(), pytest.raises(RuntimeError, match="topk_indices"):
        fp8_cpu.routed_mixture(hidden, indices, torch.ones(1, 4), chunk.gate_up_proj, chunk.gate_up_proj_scale_inv,
                               chunk.down_proj, chunk.down_proj_scale_inv, chunk.fp8["block"])


def test_bf16_router_logits_read_the_weight_in_place_in_float32(decode_kernel, monkeypatch):
    """A bf16 router's float32 logits (DeepSeek's F.linear(x.float(), w.float())) through the kernel for a few
    rows: float32 sums of exact products, so float32 rounding apart; with gradients, the float copy."""
    from modeling_deepseek_moe import linear

    calls = []
    monkeypatch.setattr(linear, "bf16_grouped_product", lambda *args: calls.append(args) or fp8_cpu.bf16_grouped_product(*args))
    weight, x = torch.randn(64, 300).bfloat16(), torch.randn(3, 300).bfloat16()
    with torch.no_grad():
        logits = linear.float32_linear(x, weight)
    assert len(calls) == 1 and logits.dtype == torch.float32
    assert relative_error(logits.double(), x.double() @ weight.double().t()) < 1e-6
    trained = linear.float32_linear(x.requires_grad_(), weight)
    assert len(calls) == 2 and trained.grad_fn is not None  # (the kernel declined: F.linear ran)
    assert relative_error(trained.detach(), logits) < 1e-6


def test_compiled_fp8_decoding_calls_the_kernel_operators_directly(decode_kernel, tmp_path):
    """Compiled, a decoding step's FP8 products and routed mixture are the kernel's own torch operators (no
    Python custom operator in between, ~20 us each), with the eager step's logits."""
    from torch._inductor.utils import run_and_get_code

    write_fp8_official_checkpoint(tmp_path, "v3")
    model = DeepseekMoEV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, fp8_compute="dequantize")
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        compiled, code = run_and_get_code(torch.compile(lambda: model(ids, use_cache=False).logits, fullgraph=True))
    namespace = fp8_cpu.kernel().__name__
    assert f"torch.ops.{namespace}.routed_mixture" in code[0] and f"torch.ops.{namespace}.fp8_grouped_gemv" in code[0]
    assert "deepseek_moe.fp8_grouped_rows" not in code[0]
    assert relative_error(compiled, eager) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, heads, seq, dim, table_batch", [(1, 16, 1, 32, 1), (2, 4, 7, 64, 2), (3, 1, 5, 64, 1)])
def test_rotary_kernel_is_bit_identical_to_the_torch_operations(decode_kernel, monkeypatch, dtype, batch, heads, seq, dim,
                                                                table_batch):
    generator = torch.Generator().manual_seed(dim + seq)
    # the rope dims of MLA's queries: a strided view behind the nope dims
    x = torch.randn(batch, heads, seq, 96 + dim, generator=generator).to(dtype).split([96, dim], dim=-1)[1]
    cos, sin = (torch.randn(table_batch, seq, dim, generator=generator).to(dtype) for _ in range(2))
    with torch.no_grad():
        output = apply_rotary_interleaved(x, cos, sin)
        monkeypatch.setattr(fp8_cpu, "serves_eagerly", lambda *tensors: False)
        expected = apply_rotary_interleaved(x, cos, sin)
    assert output.dtype == dtype and output.is_contiguous()
    assert torch.equal(output, expected)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1024), (3, 5, 2048), (2, 7, 36)])  # 36: dims past whole vectors
def test_rms_norm_kernel_equals_llamas_within_a_rounding_of_the_mean(decode_kernel, weight_dtype, shape):
    generator = torch.Generator().manual_seed(shape[-1])
    norm = RMSNorm(shape[-1], eps=1e-6).to(weight_dtype)
    norm.weight.data.normal_(generator=generator)
    x = (torch.randn(shape, generator=generator) * 3).to(torch.bfloat16)
    with torch.no_grad():
        output = norm(x)
        expected = LlamaRMSNorm.forward(norm, x)
    assert output.dtype == expected.dtype == torch.promote_types(torch.bfloat16, weight_dtype)
    differing = output != expected  # only where the mean's float32 rounding moved a result across a bf16 rounding
    assert differing.float().mean() < 0.01
    assert torch.allclose(output[differing].float(), expected[differing].float(), rtol=2**-7, atol=0)


@pytest.fixture
def kernel_calls(decode_kernel, monkeypatch):
    """The names of the kernel module's functions called from now on."""
    module, calls = fp8_cpu._module(), []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(module, name)

    monkeypatch.setitem(fp8_cpu._KERNEL, "module", Spy())
    return calls


def test_eager_kernels_serve_without_gradients_only(kernel_calls):
    norm, router = RMSNorm(64).to(torch.bfloat16), TopKRouter(ROUTERS["v3 noaux_tc"])
    x, table = torch.randn(1, 2, 3, 64, dtype=torch.bfloat16, requires_grad=True), torch.randn(1, 3, 64, dtype=torch.bfloat16)
    tokens = torch.randn(3, 64)
    norm(x).sum().backward()  # training: torch's operations, with gradients
    apply_rotary_interleaved(x, table, table).sum().backward()
    router(tokens).topk_weights.sum().backward()
    assert kernel_calls == [] and x.grad is not None and router.weight.grad is not None
    with torch.no_grad():
        norm(x.float())  # a float32 model keeps torch's numbers
        norm(x)
        apply_rotary_interleaved(x, table, table)
        router(tokens)
    assert kernel_calls == ["rms_norm", "rotary_interleaved", "route"]


ROUTERS = {
    "v3 noaux_tc": DeepseekMoEV3Config(hidden_size=64, n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4),
    "v3 256 experts": DeepseekMoEV3Config(hidden_size=64, n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4),
    "v2 group_limited_greedy": DeepseekMoEV2Config(hidden_size=64, n_routed_experts=64, num_experts_per_tok=6,
                                                   topk_method="group_limited_greedy", n_group=8, topk_group=3),
    "v2 greedy, scaled": DeepseekMoEV2Config(hidden_size=64, n_routed_experts=64, num_experts_per_tok=6, norm_topk_prob=False,
                                             routed_scaling_factor=16.0),
    "v2 greedy, normalised": DeepseekMoEV2Config(hidden_size=64, n_routed_experts=64, num_experts_per_tok=6, norm_topk_prob=True),
    "v1 (float32 logits in a float32 model)": DeepseekMoEV1Config(hidden_size=64, n_routed_experts=16, num_experts_per_tok=2),
}


@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize("tokens", [1, 4, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights", ["random", "zero (every score tied)"])
def test_router_kernel_decides_bit_for_bit_as_the_torch_operations(kernel_calls, monkeypatch, name, tokens, dtype, weights):
    router = TopKRouter(ROUTERS[name])
    generator = torch.Generator().manual_seed(tokens)
    if weights == "random":
        router.weight.data.normal_(0, 0.5, generator=generator)
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias.normal_(0, 0.1, generator=generator)
    else:
        router.weight.data.zero_()
    router.to(dtype)
    x = torch.randn(tokens, 64, generator=generator).to(dtype)
    with torch.no_grad():
        decided = router(x)
        monkeypatch.setattr(fp8_cpu, "serves_eagerly", lambda *tensors: False)
        expected = router(x)
    v1_in_bf16 = dtype == torch.bfloat16 and name.startswith("v1")  # its logits stay bf16: torch's operations
    assert ("route" in kernel_calls) != v1_in_bf16
    for field in RouterOutput._fields:
        assert torch.equal(getattr(decided, field), getattr(expected, field)), field
