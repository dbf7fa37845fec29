"""Rotary position embeddings: plain RoPE (V1) and DeepSeek's YaRN (V2, V3).

The inverse frequencies come from transformers' RoPE initialisers (``ROPE_INIT_FUNCTIONS``), whose YaRN is
DeepSeek's: the cos/sin scale is ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``. The softmax
scale correction ``mscale(factor, mscale_all_dim) ** 2`` is applied by the attention (``softmax_scale``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration import DeepseekMoEConfig


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


def default_inverse_frequencies(config: DeepseekMoEConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Plain RoPE: ``theta ** (-2i / dim)`` over ``config.head_dim``; no cos/sin scaling."""
    dim = config.head_dim
    base = config.rope_parameters["rope_theta"]
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (base**exponents), 1.0


class RotaryEmbedding(nn.Module):
    """Returns ``(cos, sin)`` of shape ``[batch, seq, dim]`` (``cat(freqs, freqs)``) for given positions."""

    def __init__(self, config: DeepseekMoEConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        inv_freq, self.attention_scaling = self.compute_inverse_frequencies(device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def compute_inverse_frequencies(self, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
        if self.rope_type == "default":
            return default_inverse_frequencies(self.config, device)
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.config, device)
        if self.rope_type == "yarn":
            # DeepSeek's defaults (mscale 1, mscale_all_dim 0) also where a config leaves one of them out.
            rope = self.config.rope_parameters
            attention_scaling = yarn_get_mscale(rope["factor"], rope.get("mscale") or 1.0) / yarn_get_mscale(
                rope["factor"], rope.get("mscale_all_dim") or 0.0
            )
        return inv_freq, attention_scaling

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute ``inv_freq`` on ``device`` (after the model was built on the meta device)."""
        self.inv_freq = self.compute_inverse_frequencies(device)[0]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)  # [batch, seq, dim]
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-style RoPE on ``x`` ``[batch, heads, seq, dim]`` (halves rotated together), as V1 does."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on dims stored in interleaved pairs ``(x0, x1), (x2, x3), ...``, as MLA checkpoints store them.

    Equal to DeepSeek's de-interleave (``view(d/2, 2).transpose``) followed by :func:`apply_rotary`; the
    output is in that de-interleaved layout ``[evens rotated, odds rotated]``.
    """
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
