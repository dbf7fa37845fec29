"""The MoE block of a decoder layer: router -> routed experts, plus the always-on shared experts."""

from __future__ import annotations

import torch
from torch import nn

from .configuration import DeepseekMoEConfig
from .experts import DenseMLP, RoutedExperts
from .routing import TopKRouter


class MoEBlock(nn.Module):
    """``[batch, seq, hidden]`` -> ``[batch, seq, hidden]``: routed mixture + shared experts.

    ``router_output`` keeps the last forward's routing decision, for statistics and losses.
    """

    def __init__(self, config: DeepseekMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = TopKRouter(config)
        self.experts = RoutedExperts(config)
        if config.n_shared_experts:
            self.shared_experts = DenseMLP(config, config.moe_intermediate_size * config.n_shared_experts)
        else:
            self.shared_experts = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])  # [tokens, hidden]
        routing = self.gate(tokens)
        output = self.experts(tokens, routing.topk_indices, routing.topk_weights)  # a transposed view
        if self.shared_experts is not None:
            # Into the shared experts' fresh contiguous output: no new buffer, a contiguous result.
            output = self.shared_experts(tokens).add_(output)
        return output.reshape(shape)
