"""CUDA checks (skipped without a GPU): grouped experts and whole models on the GPU against the CPU,
a layer's expert chunks split between cuda:0 and the CPU against the all-GPU model, decoding with FP8 experts
offloaded to CPU memory against the all-GPU model, and Trainer with
accelerate's FSDP2 plugin (which accelerate applies on accelerators only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from modeling_deepseek_moe import DeepseekMoEV2ForCausalLM, DeepseekMoEV3ForCausalLM
from modeling_deepseek_moe.fp8 import fp8_linear, quantize_fp8_blockwise
from modeling_deepseek_moe.synthetic import write_fp8_official_checkpoint

from conftest import relative_error
from test_experts import config, loop_reference, random_experts, routing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_experts_on_cuda_match_loop(dtype, bound):
    experts = random_experts(config(), dtype=torch.float64)
    hidden = torch.randn(200, 32, dtype=torch.float64)
    indices, weights = routing(200, skip=(2,))
    reference = loop_reference(experts, hidden, indices, weights)
    cuda = experts.to("cuda", dtype)
    hidden_cuda = hidden.to("cuda", dtype).requires_grad_(True)
    out = cuda(hidden_cuda, indices.cuda(), weights.to("cuda", dtype))
    assert out.device.type == "cuda" and relative_error(out.float().cpu(), reference) < bound
    out.float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cuda.parameters())


@pytest.mark.parametrize("family, model_class", [("v2", DeepseekMoEV2ForCausalLM), ("v3", DeepseekMoEV3ForCausalLM)])
def test_model_on_cuda_matches_cpu(official_checkpoint, family, model_class):
    directory, _, _ = official_checkpoint(family)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cpu = model_class.from_pretrained(directory, dtype=torch.float32)
    gpu = model_class.from_pretrained(directory, dtype=torch.float32, device_map="cuda")
    with torch.no_grad():
        assert relative_error(gpu(ids.cuda()).logits.cpu(), cpu(ids).logits) < 1e-4
    generated = gpu.generate(ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), max_new_tokens=6, do_sample=False)
    assert generated.shape == (2, 22)


def test_expert_chunks_split_between_cuda_and_cpu(official_checkpoint):
    directory, config_dict, _ = official_checkpoint("v3")
    device_map = {"": "cuda:0"}
    for layer in range(1, config_dict["num_hidden_layers"]):
        device_map[f"model.layers.{layer}.mlp.experts.chunks.1"] = "cpu"
    device_map["model.mtp.0.mlp.experts.chunks.1"] = "cpu"
    all_gpu = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32, device_map="cuda", num_expert_chunks=2)
    mixed = DeepseekMoEV3ForCausalLM.from_pretrained(directory, dtype=torch.float32, device_map=device_map, num_expert_chunks=2)
    assert mixed.model.layers[1].mlp.experts.chunks[1].gate_up_proj.device.type == "cpu"
    assert mixed.model.layers[1].mlp.experts.chunks[0].gate_up_proj.device.type == "cuda"
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        assert relative_error(mixed(ids).logits, all_gpu(ids).logits) < 1e-5
    loss = mixed(ids, labels=ids).loss
    loss.backward()
    assert mixed.model.layers[1].mlp.experts.chunks[1].gate_up_proj.grad.device.type == "cpu"


def test_decoding_with_fp8_experts_offloaded_to_cpu_memory(tmp_path):
    """The README's headline placement: routed experts in CPU memory (FP8), the rest on the GPU. Decoding steps
    send their few rows to the CPU's one-call mixture and back: the all-GPU model's tokens and logits."""
    from modeling_deepseek_moe.placement import expert_device_map

    write_fp8_official_checkpoint(tmp_path / "fp8", "v3")
    load = lambda **kw: DeepseekMoEV3ForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32, fp8_compute="dequantize", **kw)  # noqa: E731
    gpu = load(device_map="cuda")
    offloaded = load(device_map=expert_device_map(gpu.config, ["cuda:0"], offload_experts="cpu"))
    assert offloaded.model.layers[1].mlp.experts.chunks[0].gate_up_proj.device.type == "cpu"
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0)).cuda()
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, output_scores=True,
                  return_dict_in_generate=True)
    expected, output = gpu.generate(ids, **kwargs), offloaded.generate(ids, **kwargs)
    assert torch.equal(output.sequences, expected.sequences)
    for a, b in zip(output.scores, expected.scores):
        assert relative_error(a, b) < 1e-4


def test_fp8_model_on_cuda_matches_cpu(tmp_path):
    write_fp8_official_checkpoint(tmp_path / "fp8", "v3")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cpu = DeepseekMoEV3ForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32, fp8_compute="dequantize")
    gpu = DeepseekMoEV3ForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32, fp8_compute="dequantize", device_map="cuda")
    assert gpu.model.layers[1].mlp.experts.chunks[0].gate_up_proj.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        assert relative_error(gpu(ids.cuda()).logits.cpu(), cpu(ids).logits) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs FP8 matmuls (compute capability >= 8.9)")
def test_fp8_scaled_mm_matches_the_emulated_fp8_activation_path():
    torch.manual_seed(0)
    x = torch.randn(64, 1024)
    quantized, scale_inv = quantize_fp8_blockwise(torch.randn(512, 1024) / 32)
    kernel = fp8_linear(x.cuda().bfloat16(), quantized.cuda(), scale_inv.cuda(), mode="scaled")
    emulated = fp8_linear(x, quantized, scale_inv, mode="scaled")
    exact = fp8_linear(x, quantized, scale_inv, mode="dequantize")
    assert relative_error(kernel.float().cpu(), emulated) < 1e-2
    assert relative_error(kernel.float().cpu(), exact) < 3e-2


def test_trainer_with_accelerate_fsdp2_plugin(tmp_path):
    """examples/finetune.py --fsdp under torchrun on up to 2 GPUs: accelerate runs FSDP (not DDP), the loss
    falls and every rank ends with the same V3 correction biases."""
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "finetune.py")
    processes = min(2, torch.cuda.device_count())
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}", example,
                           "--fsdp", "--steps", "30", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "distributed type: DistributedType.FSDP" in done.stdout
    assert f"identical on all {processes} ranks: True" in done.stdout
    losses = [float(line.split()[2]) for line in done.stdout.splitlines() if line.startswith(("first log", "last log"))]
    assert len(losses) == 2 and losses[1] < losses[0]
