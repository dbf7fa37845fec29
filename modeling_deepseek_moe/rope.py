"""Rotary position embeddings: plain RoPE (V1) and DeepSeek's YaRN (V2, V3).

The inverse frequencies come from transformers' RoPE initialisers (``ROPE_INIT_FUNCTIONS``), whose YaRN is
DeepSeek's: the cos/sin scale is ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``. The softmax
scale correction ``mscale(factor, mscale_all_dim) ** 2`` is applied by the attention (``softmax_scale``).
"""

from __future__ import annotations

import math

import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .configuration import DeepseekMoEConfig
from .fp8_cpu import rotary_interleaved


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """DeepSeek's YaRN magnitude correction: ``0.1 * mscale * ln(scale) + 1`` for scale > 1, else 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(config: DeepseekMoEConfig, head_dim: int) -> float:
    """``head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` under YaRN (DeepSeek's rule)."""
    scale = head_dim**-0.5
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") == "yarn" and rope.get("mscale_all_dim"):
        scale *= yarn_get_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2
    return scale


class RotaryEmbedding(LlamaRotaryEmbedding):
    """transformers' rotary embedding (every ``rope_type`` its RoPE utilities know: default, linear, dynamic,
    yarn, longrope, llama3; dynamic types update their frequencies in the forward) with DeepSeek's YaRN
    defaults: ``mscale`` 1 and ``mscale_all_dim`` 0 where a config leaves one of them out. Returns
    ``(cos, sin)`` of shape ``[batch, seq, dim]`` (``cat(freqs, freqs)``) for given positions."""

    def __init__(self, config: DeepseekMoEConfig, device: torch.device | None = None) -> None:
        super().__init__(config)
        if self.rope_type == "yarn":
            rope = config.rope_parameters
            self.attention_scaling = yarn_get_mscale(rope["factor"], rope.get("mscale") or 1.0) / yarn_get_mscale(
                rope["factor"], rope.get("mscale_all_dim") or 0.0
            )


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on dims stored in interleaved pairs ``(x0, x1), (x2, x3), ...``, as MLA checkpoints store them.

    Equal to DeepSeek's de-interleave (``view(d/2, 2).transpose``) followed by Llama's ``rotate_half`` RoPE;
    the output is in that de-interleaved layout ``[evens rotated, odds rotated]``. On the CPU without gradients,
    one kernel call (:func:`.fp8_cpu.rotary_interleaved`, the same numbers).
    """
    fused = rotary_interleaved(x, cos, sin)
    if fused is not None:
        return fused
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
