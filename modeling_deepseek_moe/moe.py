"""The MoE block of a decoder layer: router -> routed experts, plus the always-on shared experts.

In training it drops tokens when ``capacity_factor`` is set (DeepSeek-V2, see load_balancing.py). It
returns its routing decision with its output; the balance losses are computed from it by the causal LM.
"""

from __future__ import annotations

import torch
from torch import nn

from .load_balancing import capacity_keep_mask
from .configuration import DeepseekMoEConfig
from .experts import DenseMLP, RoutedExperts
from .routing import RouterOutput, TopKRouter


class MoEBlock(nn.Module):
    """``[batch, seq, hidden]`` -> ``[batch, seq, hidden]``: routed mixture + shared experts, and the
    routing decision (which the causal LM's balance losses read)."""

    def __init__(self, config: DeepseekMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = TopKRouter(config)
        self.experts = RoutedExperts(config)
        if config.n_shared_experts:
            self.shared_experts = DenseMLP(config, config.moe_intermediate_size * config.n_shared_experts)
        else:
            self.shared_experts = None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])  # [tokens, hidden]
        routing = self.gate(tokens)  # may sit on another device than the tokens under a device_map
        topk_indices, topk_weights = routing.topk_indices.to(tokens.device), routing.topk_weights.to(tokens.device)
        if self.training and self.config.capacity_factor is not None:
            keep = capacity_keep_mask(topk_indices, topk_weights, self.gate.num_experts, self.config.capacity_factor)
            topk_weights = topk_weights * keep  # a dropped assignment contributes nothing
        output = self.experts(tokens, topk_indices, topk_weights)
        if self.shared_experts is not None:
            shared = self.shared_experts(tokens)  # added into in place: no new buffer
            output = shared.add_(output.to(shared.device)).to(tokens.device)
        return output.reshape(shape), routing
