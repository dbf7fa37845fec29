"""RMSNorm: transformers' Llama RMSNorm, which computes exactly what DeepSeek's code does (normalise in
float32, scale in the input dtype), with its hub-kernel hook."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .fp8_cpu import rms_norm


class RMSNorm(LlamaRMSNorm):
    """``weight * x / rms(x)``, normalised in float32. (Named for ``_no_split_modules`` and device maps.) On the
    CPU without gradients, one kernel call instead of eight aten calls (a decoded token runs two per layer and
    one per low-rank projection)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fused = rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return super().forward(hidden_states) if fused is None else fused
