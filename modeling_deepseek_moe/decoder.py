"""Decoder layers: the pre-norm block (attention, then dense MLP or MoE) and V3's multi-token-prediction
module, which is one more such block with its own input projection and norms."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import MultiHeadAttention, MultiHeadLatentAttention
from .configuration import DeepseekMoEConfig
from .linear import linear_layer
from .mlp import DenseMLP
from .moe import MoEBlock
from .routing import RouterOutput
from .norm import RMSNorm


class DeepseekMoEDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: attention (MHA or MLA) then a dense MLP or an MoE block (``mlp``). Returns the hidden
    states and the MoE block's routing decision (None in a dense layer)."""

    def __init__(self, config: DeepseekMoEConfig, layer_idx: int) -> None:
        super().__init__()
        attention = MultiHeadLatentAttention if config.attention_type == "mla" else MultiHeadAttention
        self.self_attn = attention(config, layer_idx)
        self.mlp = MoEBlock(config) if config.is_moe_layer(layer_idx) else DenseMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, RouterOutput | None]:
        residual = hidden_states
        # (positional: transformers' attention modules name the cache `cache` from 5.24, `past_key_values` before)
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, **kwargs
        )
        # `.to(...)`: a device_map may place the attention, the MLP and the residual stream apart.
        hidden_states = residual + hidden_states.to(residual.device)
        output, routing = self.mlp(self.post_attention_layernorm(hidden_states)), None
        if isinstance(output, tuple):  # an MoE block
            output, routing = output
        return hidden_states + output.to(hidden_states.device), routing


class MultiTokenPredictionLayer(DeepseekMoEDecoderLayer):
    """DeepSeek-V3's MTP module: predicts token t+2 from the hidden state of token t and the embedding of
    token t+1: ``block(eh_proj(cat(enorm(embed(t+1)), hnorm(h_t))))``, then ``shared_head.norm`` and the
    model's shared output head. Stored in checkpoints as layer ``num_hidden_layers + depth``."""

    def __init__(self, config: DeepseekMoEConfig, depth: int) -> None:
        super().__init__(config, layer_idx=config.num_hidden_layers + depth)
        self.enorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = linear_layer(config, 2 * config.hidden_size, config.hidden_size)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        next_token_embeds: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``hidden_states`` of tokens t and ``next_token_embeds`` of tokens t+1, both ``[batch, seq, hidden]``
        -> normalised hidden states ``[batch, seq, hidden]`` to feed the shared output head."""
        merged = self.eh_proj(torch.cat((self.enorm(next_token_embeds), self.hnorm(hidden_states)), dim=-1))
        merged, _ = super().forward(merged, position_embeddings, attention_mask, cache, **kwargs)
        return self.shared_head.norm(merged)
