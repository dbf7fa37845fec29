"""RMSNorm: transformers' Llama RMSNorm, which computes exactly what DeepSeek's code does (normalise in
float32, scale in the input dtype), with its hub-kernel hook."""

from __future__ import annotations

from transformers.models.llama.modeling_llama import LlamaRMSNorm


class RMSNorm(LlamaRMSNorm):
    """``weight * x / rms(x)``, normalised in float32. (Named for ``_no_split_modules`` and device maps.)"""
