"""The MoE block of a decoder layer: router -> routed experts, plus the always-on shared experts.

In training it also applies DeepSeek's load balancing (see load_balancing.py): token dropping when
``capacity_factor`` is set, and the balance losses, kept on the block (``aux_loss``, with its graph) for
the model to add to its loss.
"""

from __future__ import annotations

import torch
from torch import nn

from .load_balancing import (
    capacity_keep_mask,
    communication_balance_loss,
    device_balance_loss,
    expert_balance_loss,
)
from .configuration import DeepseekMoEConfig
from .experts import DenseMLP, RoutedExperts
from .routing import RouterOutput, TopKRouter


class MoEBlock(nn.Module):
    """``[batch, seq, hidden]`` -> ``[batch, seq, hidden]``: routed mixture + shared experts.

    ``aux_loss`` holds the last training forward's balance loss (None in eval or when all are off).
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
        self.aux_loss: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
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
        output = output.reshape(shape)
        self.aux_loss = self.balance_loss(routing, shape[0] if len(shape) == 3 else 1) if self.training else None
        return output

    def balance_loss(self, routing: RouterOutput, batch: int) -> torch.Tensor | None:
        """The sum of the enabled balance losses for this forward (None when all are off)."""
        config = self.config
        if not (config.aux_loss_alpha or config.device_aux_loss_alpha or config.comm_aux_loss_alpha):
            return None
        # Per sequence when `seq_aux` (then averaged), else all tokens as one sequence.
        sequences = batch if config.seq_aux else 1
        scores = routing.scores.float()
        if config.scoring_func == "sigmoid":  # V3: the loss sees normalised sigmoid affinities
            scores = scores / scores.sum(dim=-1, keepdim=True)
        probabilities = scores.view(sequences, -1, scores.shape[-1])
        chosen = routing.topk_indices.view(sequences, -1, routing.topk_indices.shape[-1])
        loss = scores.new_zeros(())
        if config.aux_loss_alpha:
            loss = loss + expert_balance_loss(probabilities, chosen, config.aux_loss_alpha)
        if config.device_aux_loss_alpha:
            loss = loss + device_balance_loss(
                probabilities, chosen, config.n_group, config.device_aux_loss_alpha
            )
        if config.comm_aux_loss_alpha:
            loss = loss + communication_balance_loss(
                probabilities, chosen, config.n_group, config.topk_group, config.comm_aux_loss_alpha
            )
        return loss
