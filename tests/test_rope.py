"""RoPE and YaRN against a transcription of DeepSeek's released rotary code (modeling_deepseek.py)."""

from __future__ import annotations

import math

import pytest
import torch

from modeling_deepseek_moe import DeepseekMoEV2Config, DeepseekMoEV3Config
from transformers.models.llama.modeling_llama import rotate_half

from modeling_deepseek_moe.rope import RotaryEmbedding, apply_rotary_interleaved, softmax_scale


def deepseek_yarn(dim, base, factor, original_max, beta_fast, beta_slow, mscale, mscale_all_dim, positions):
    """DeepseekV2YarnRotaryEmbedding, as released: (cos, sin) tables for `positions`."""

    def correction_dim(rotations):
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    freq_extra = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freq_inter = 1.0 / (factor * base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    mask = 1 - ramp
    inv_freq = freq_inter * (1 - mask) + freq_extra * mask

    def get_mscale(scale, m):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scale = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


@pytest.mark.parametrize("config_class, mscale", [(DeepseekMoEV2Config, 0.707), (DeepseekMoEV3Config, 1.0)])
def test_yarn_tables_equal_deepseeks(config_class, mscale):
    config = config_class(qk_rope_head_dim=64)
    positions = torch.tensor([[0, 1, 5, 4095, 4096, 50000, 163839]])
    cos, sin = RotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    expected_cos, expected_sin = deepseek_yarn(64, 10000, 40, 4096, 32, 1, mscale, mscale, positions[0])
    torch.testing.assert_close(cos[0], expected_cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin[0], expected_sin, rtol=1e-5, atol=1e-5)


def test_yarn_softmax_scale_is_mscale_all_dim_squared():
    config = DeepseekMoEV2Config()
    expected = 192**-0.5 * (0.1 * 0.707 * math.log(40) + 1.0) ** 2
    assert softmax_scale(config, 192) == pytest.approx(expected, rel=1e-12)
    assert softmax_scale(DeepseekMoEV2Config(rope_scaling=None), 192) == pytest.approx(192**-0.5)


def test_yarn_with_only_mscale_follows_deepseeks_defaults():
    # DeepSeek's class defaults mscale_all_dim to 0, so the cos/sin scale is mscale(factor, mscale) / 1.
    config = DeepseekMoEV3Config(rope_scaling={"type": "yarn", "factor": 40, "mscale": 1.0, "original_max_position_embeddings": 4096})
    assert RotaryEmbedding(config).attention_scaling == pytest.approx(0.1 * math.log(40) + 1.0)


def test_interleaved_rotation_equals_deinterleave_then_rotate_half():
    x = torch.randn(2, 3, 5, 8)
    angles = torch.randn(2, 5, 4)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    deinterleaved = x.view(2, 3, 5, 4, 2).transpose(-1, -2).reshape(2, 3, 5, 8)  # DeepSeek's HF code
    llama_rotated = deinterleaved * cos[:, None] + rotate_half(deinterleaved) * sin[:, None]
    torch.testing.assert_close(apply_rotary_interleaved(x, cos, sin), llama_rotated)
