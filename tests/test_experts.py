"""Grouped routed experts against a per-expert loop, forward and backward, and chunked storage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_deepseek_moe import DeepseekMoEV3Config
from modeling_deepseek_moe import dispatch, grouped_mm
from modeling_deepseek_moe.experts import RoutedExperts
from modeling_deepseek_moe.grouped_mm import _looped_group_mm, grouped_linear

from conftest import relative_error, rss_growth_mb


def config(chunks=1):
    return DeepseekMoEV3Config(
        hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, num_expert_chunks=chunks,
    )


def random_experts(config, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    experts = RoutedExperts(config).to(dtype)
    for chunk in experts.chunks:
        chunk.gate_up_proj.data.normal_(0, 0.3)
        chunk.down_proj.data.normal_(0, 0.3)
    return experts


def stacked(experts, name):
    return torch.cat([getattr(chunk, name) for chunk in experts.chunks])


def loop_reference(experts, hidden, indices, weights):
    """Token by token, expert by expert: sum_k w_k * down_e(silu(gate_e x) * up_e x)."""
    gate_up, down = stacked(experts, "gate_up_proj"), stacked(experts, "down_proj")
    inter = down.shape[-1]
    rows = []
    for token in range(hidden.shape[0]):
        total = torch.zeros_like(hidden[token])
        for slot in range(indices.shape[1]):
            e = indices[token, slot]
            projected = gate_up[e] @ hidden[token]
            total = total + weights[token, slot] * (down[e] @ (F.silu(projected[:inter]) * projected[inter:]))
        rows.append(total)
    return torch.stack(rows)


def routing(tokens, experts=16, top_k=4, seed=1, skip=()):
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(experts) if e not in skip])
    scores = torch.rand(tokens, len(allowed), generator=generator)
    indices = allowed[scores.topk(top_k, dim=-1).indices]
    weights = torch.rand(tokens, top_k, generator=generator, dtype=torch.float64)
    return indices, weights


# Slices of experts run one after the other (SLICE_BYTES of input columns each): the default (one slice
# here) and ~12 slots per slice.
SLICINGS = [None, 12 * 32 * 8]


# 40 tokens: wide, padded column groups; 2 tokens: a decode-sized batch (unpadded, mostly one column).
@pytest.mark.parametrize("tokens", [40, 2])
@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("slice_bytes", SLICINGS)
def test_forward_matches_loop(tokens, chunks, slice_bytes, monkeypatch):
    if slice_bytes:
        monkeypatch.setattr(dispatch, "SLICE_BYTES", slice_bytes)
    experts = random_experts(config(chunks))
    hidden = torch.randn(tokens, 32, dtype=torch.float64)
    indices, weights = routing(tokens, skip=(3, 9))  # experts 3 and 9 receive no token
    assert relative_error(experts(hidden, indices, weights), loop_reference(experts, hidden, indices, weights)) < 1e-12


@pytest.mark.parametrize("tokens", [40, 2])
@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("slice_bytes", SLICINGS)
def test_backward_matches_loop(tokens, chunks, slice_bytes, monkeypatch):
    if slice_bytes:
        monkeypatch.setattr(dispatch, "SLICE_BYTES", slice_bytes)
    experts = random_experts(config(chunks))
    hidden = torch.randn(tokens, 32, dtype=torch.float64, requires_grad=True)
    indices, weights = routing(tokens, skip=(5,))
    weights.requires_grad_(True)
    upstream = torch.randn(tokens, 32, dtype=torch.float64)
    (experts(hidden, indices, weights) * upstream).sum().backward()
    grads = [hidden.grad, weights.grad] + [p.grad for p in experts.parameters()]
    for tensor in [hidden, weights, *experts.parameters()]:
        tensor.grad = None
    (loop_reference(experts, hidden, indices, weights) * upstream).sum().backward()
    expected = [hidden.grad, weights.grad] + [p.grad for p in experts.parameters()]
    for actual, reference in zip(grads, expected):
        assert relative_error(actual, reference) < 1e-12


def test_group_widths_by_count():
    counts = torch.tensor([0, 1, 2, 4, 5, 9, 16, 17, 30, 96, 97])
    assert dispatch.padded_widths(counts).tolist() == [0, 1, 4, 4, 16, 16, 16, 24, 32, 96, 104]


def test_groups_of_every_width_class_match_the_loop():
    """Experts given 0, 1, 3, 5, 8, 16, 17, 30 and 40 assignments (every padding rule), forward and
    gradients against the loop; padding slots carry weight 0."""
    counts = [0, 1, 3, 5, 8, 16, 17, 30, 40, 40]  # 160 = 40 tokens x top-4; expert e gets counts[e]
    flat = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    indices = flat.view(4, 40).t().contiguous()  # a run of <= 40 positions never gives a token one expert twice
    weights = torch.rand(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    slots = dispatch.ExpertSlots.of(indices, weights, 16)
    assert slots.per_expert.tolist()[: len(counts)] == [0, 1, 4, 16, 16, 16, 24, 32, 40, 40]
    assert (slots.weight != 0).sum() == 160
    experts = random_experts(config())
    hidden = torch.randn(40, 32, dtype=torch.float64, requires_grad=True)
    output = experts(hidden, indices, weights)
    reference = loop_reference(experts, hidden, indices, weights)
    assert relative_error(output, reference) < 1e-12
    upstream = torch.randn(40, 32, dtype=torch.float64)
    grads = torch.autograd.grad((output * upstream).sum(), [hidden, weights, *experts.parameters()])
    expected = torch.autograd.grad((reference * upstream).sum(), [hidden, weights, *experts.parameters()])
    for actual, wanted in zip(grads, expected):
        assert relative_error(actual, wanted) < 1e-12


def test_expert_slices_hold_at_most_the_budget_unless_one_expert_exceeds_it():
    assert dispatch.expert_slices([3, 0, 4, 2, 9, 1, 0], 7) == [(0, 3), (3, 4), (4, 5), (5, 7)]
    assert dispatch.expert_slices([0, 0, 0], 7) == [(0, 3)]  # a chunk without tokens: one empty slice


@pytest.mark.parametrize("tokens", [64, 2])
def test_loop_fallback_equals_grouped_kernel(tokens, monkeypatch):
    experts = random_experts(config(), dtype=torch.float32)
    hidden = torch.randn(tokens, 32, requires_grad=True)
    indices, weights = routing(tokens)
    weights = weights.float()
    grouped = experts(hidden, indices, weights)
    grouped.square().sum().backward()
    grouped_grads = [hidden.grad.clone()] + [p.grad.clone() for p in experts.parameters()]
    hidden.grad = None
    experts.zero_grad()
    monkeypatch.setattr(grouped_mm, "_GROUPED_MM", None)
    looped = experts(hidden, indices, weights)
    looped.square().sum().backward()
    assert relative_error(looped, grouped) < 1e-6
    for actual, reference in zip([hidden.grad] + [p.grad for p in experts.parameters()], grouped_grads):
        assert relative_error(actual, reference) < 1e-6


def test_inference_mode_matches_training_path():
    experts = random_experts(config(), dtype=torch.float32)
    hidden = torch.randn(64, 32)
    indices, weights = routing(64)
    with torch.inference_mode():
        fast = experts(hidden, indices, weights.float())
    assert relative_error(fast, experts(hidden, indices, weights.float())) < 1e-7


@pytest.mark.parametrize("tokens", [64, 2])
def test_bfloat16_runs_grouped(tokens):
    experts = random_experts(config(), dtype=torch.bfloat16)
    hidden = torch.randn(tokens, 32, dtype=torch.bfloat16)
    indices, weights = routing(tokens)
    out = experts(hidden, indices, weights.bfloat16())
    reference = loop_reference(experts.double(), hidden.double(), indices, weights)
    assert out.dtype == torch.bfloat16 and relative_error(out, reference) < 2e-2


@pytest.mark.parametrize("columns", [0, 1, 5, 30])
def test_products_over_unaligned_column_counts_match_the_loop(columns):
    """CPU grouped_mm needs 16-byte aligned leading strides (1, 5 or 30 float32 columns are not) and
    rejects empty operands (a chunk that received no tokens)."""
    torch.manual_seed(0)
    weight = torch.randn(4, 64, 32)
    rows = torch.randn(columns, 32)  # feature-major view of row-major rows, as the experts build them
    offsets = torch.tensor([columns] * 4, dtype=torch.int32)
    offsets[:3] = torch.tensor([0, columns // 3, columns // 2])
    grad = torch.randn(64, columns)
    results = []
    products = (lambda w, columns: grouped_linear(w, columns.t(), offsets).t(),  # rows in, rows out
                lambda w, columns: _looped_group_mm(w, columns, offsets))
    for product in products:
        w, columns = weight.clone().requires_grad_(), rows.clone().requires_grad_()
        product(w, columns.t()).backward(grad)
        results.append((w.grad, columns.grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5) and torch.allclose(results[0][1], results[1][1], atol=1e-5)


@pytest.mark.parametrize("out_features, in_features", [(96, 64), (20, 64), (96, 12)])
def test_half_precision_gradients_of_every_expert_are_right_whatever_the_allocator_left(out_features, in_features):
    """bf16 on the CPU: the kernel reads the element after a group's last row as the partner of an odd one
    (times zero); padding left uninitialized made the last expert's weight gradient NaN when it held NaN.
    Freed NaN buffers of every operand's size come before each product here."""
    generator = torch.Generator().manual_seed(0)
    groups = 8
    for trial in range(12):
        counts = torch.randint(0, 24, (groups,), generator=generator)
        counts[trial % groups] = 0  # an empty expert somewhere
        offsets = counts.cumsum(0).to(torch.int32)
        total = int(offsets[-1])
        weight = (torch.randn(groups, out_features, in_features, generator=generator) * 0.1).bfloat16()
        rows = torch.randn(total, in_features, generator=generator).bfloat16()
        grad = torch.randn(total, out_features, generator=generator).bfloat16()
        for size in (out_features * (total + 8), in_features * (total + 8), groups * out_features * in_features):
            torch.full((size,), float("nan"), dtype=torch.bfloat16)  # freed at once: what the allocator hands out next
        w, r = weight.clone().requires_grad_(), rows.clone().requires_grad_()
        grouped_linear(w, r, offsets).backward(grad)
        starts = [0, *offsets[:-1].tolist()]
        expected_w = torch.stack([grad[s:e].double().t() @ rows[s:e].double() for s, e in zip(starts, offsets.tolist())])
        expected_r = torch.cat([grad[s:e].double() @ weight[g].double() for g, (s, e) in enumerate(zip(starts, offsets.tolist()))])
        assert torch.isfinite(w.grad).all() and torch.isfinite(r.grad).all()
        assert relative_error(w.grad, expected_w) < 1e-2 and relative_error(r.grad, expected_r) < 1e-2


def test_bucketed_widths_are_few_and_tight():
    widths = [grouped_mm.bucketed_width(n) for n in range(1, 4097)]
    assert all(n <= width <= n + n // 8 + 1 for n, width in zip(range(1, 4097), widths))
    assert all(len({grouped_mm.bucketed_width(n) for n in range(2**k, 2 ** (k + 1))}) <= 9 for k in range(12))


def test_half_precision_products_over_new_batch_sizes_keep_memory_flat():
    """oneDNN keeps a compiled primitive per operand layout (~0.7 MB each on an AMX CPU): leading dimensions
    that followed the batch size grew RSS by ~90 MB over these 96 sizes, step after step of a training run."""
    script = """
import torch
from modeling_deepseek_moe.dispatch import padded_widths
from modeling_deepseek_moe.grouped_mm import grouped_linear
weight = (torch.randn(8, 512, 512) * 0.05).bfloat16().requires_grad_()
def step(tokens):
    counts = torch.bincount(torch.randint(0, 8, (tokens,), generator=torch.Generator().manual_seed(tokens)), minlength=8)
    offsets = padded_widths(counts).cumsum(0).to(torch.int32)
    rows = torch.randn(int(offsets[-1]), 512, dtype=torch.bfloat16, requires_grad=True)
    grouped_linear(weight, rows, offsets).sum().backward()
"""
    assert rss_growth_mb(script, warm=range(256, 264), measured=range(264, 360)) < 40


@pytest.mark.parametrize("tokens", [40, 2])
def test_combining_expert_outputs_keeps_no_copy_of_them_for_the_backward(tokens):
    """index_add_'s derivative saves its source (every expert output of the layer); the combine's keeps
    only the token indices, with the same gradients."""
    experts = random_experts(config(), dtype=torch.float32).requires_grad_(False)  # frozen: rows not saved
    hidden = torch.randn(tokens, 32, requires_grad=True)
    indices, weights = routing(tokens)
    weights = weights.float().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        output = experts(hidden, indices, weights)
    slots = indices.numel()
    assert not [t for t in saved if t.is_floating_point() and t.dim() == 2 and 32 in t.shape and t.numel() >= 32 * slots]
    output.square().sum().backward()
    reference = loop_reference(experts.double(), hidden.detach().double().requires_grad_(), indices, weights.detach().double())
    assert relative_error(output, reference) < 1e-5
    hidden_ref = hidden.detach().double().requires_grad_()
    loop_reference(experts.double(), hidden_ref, indices, weights.detach().double()).square().sum().backward()
    assert relative_error(hidden.grad, hidden_ref.grad) < 1e-5


def test_swiglu_keeps_no_activation_copy_and_gives_the_same_gradients():
    """silu(gate) * up through mlp.gated: autograd keeps gate and up only, and values and gradients equal
    autograd's composition bit for bit (float32 and bf16)."""
    from modeling_deepseek_moe.mlp import gated
    from transformers.activations import ACT2FN

    for dtype in (torch.float32, torch.bfloat16):
        gate, up, grad = (torch.randn(24, 40, generator=torch.Generator().manual_seed(seed)).to(dtype) for seed in range(3))
        results, kept = [], []
        for fused in (True, False):
            g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                output = gated(ACT2FN["silu"], g, u) if fused else F.silu(g) * u
            output.backward(grad)
            results.append((output.detach(), g.grad, u.grad))
            kept.append(len({t.untyped_storage().data_ptr() for t in saved}))
        assert all(torch.equal(a, b) for a, b in zip(*results))
        assert kept == [2, 3]  # gate and up; autograd's composition also silu(gate)
