"""The dense SwiGLU MLP of DeepSeek's dense layers and shared experts: ``down(act(gate(x)) * up(x))``."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .configuration import DeepseekMoEConfig
from .fp8 import projection


class DenseMLP(nn.Module):
    """SwiGLU MLP of width ``intermediate_size`` (the config's dense width by default); its projections are
    FP8 under an FP8 ``quantization_config``, as DeepSeek stores them."""

    def __init__(self, config: DeepseekMoEConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = projection(config, config.hidden_size, intermediate_size)
        self.up_proj = projection(config, config.hidden_size, intermediate_size)
        self.down_proj = projection(config, intermediate_size, config.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
