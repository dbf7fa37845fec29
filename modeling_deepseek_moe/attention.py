"""Attention: Llama-style multi-head attention (V1) and Multi-head Latent Attention (V2, V3).

Both run through transformers' attention interface (``eager``, ``sdpa``, ...) and its caches. MLA caches
the compressed latent (``kv_lora_rank`` normalised dims as the cache's keys, ``qk_rope_head_dim`` rotated
dims as its values), never the per-head keys and values it expands from them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, eager_attention_forward

from .bnb4bit import PACKED_DTYPE, dequantize_linear_4bit
from .configuration import DeepseekMoEConfig
from .fp8 import FP8Linear, fp8_settings, projection
from .fp8_cpu import absorbed_scores, head_rows_product, shared_rows_product
from .grouped_mm import bucketed_width
from .linear import HALF_PRECISION
from .norm import RMSNorm
from .rope import apply_rotary_interleaved, softmax_scale


# Decoding steps of at most this many new tokens attend in the latent space (mla_absorb="decode").
MLA_ABSORB_MAX_QUERY = 8


def attention_function(config: DeepseekMoEConfig) -> Callable:
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)


def cache_with_room(cached: torch.Tensor) -> torch.Tensor:
    """A cached ``[batch, 1, total, dim]`` padded with zeros to :func:`.grouped_mm.bucketed_width` slots where
    oneDNN runs the products over it (half precision on the CPU): each new length made new compiled
    primitives, every decoding step (+2 MB of RSS and ~1.5 ms per step, measured; bucketed, a new set
    every 1/8 octave). The extra slots are never attended (their scores are dropped)."""
    total = cached.shape[2]
    if cached.device.type != "cpu" or cached.dtype not in HALF_PRECISION or bucketed_width(total) == total:
        return cached
    return F.pad(cached, (0, 0, 0, bucketed_width(total) - total))


class MultiHeadAttention(LlamaAttention):
    """DeepSeekMoE (V1) attention: transformers' Llama attention (``rotate_half`` RoPE on whole heads), with
    DeepSeek's softmax scale and projections that stay FP8 under an FP8 ``quantization_config``."""

    def __init__(self, config: DeepseekMoEConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.scaling = softmax_scale(config, self.head_dim)
        if fp8_settings(config) is not None:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                linear = getattr(self, name)
                setattr(self, name, projection(config, linear.in_features, linear.out_features, linear.bias is not None))


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 MLA: queries through an optional low-rank ``q_a``/``q_b`` pair, keys and values
    expanded by ``kv_b_proj`` from a cached ``kv_lora_rank`` latent plus one shared rotary key."""

    def __init__(self, config: DeepseekMoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = 1
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.scaling = softmax_scale(config, self.qk_head_dim)
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        hidden = config.hidden_size
        if self.q_lora_rank is None:
            self.q_proj = projection(config, hidden, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = projection(config, hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = projection(config, self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = projection(config, hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = projection(
            config, self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = projection(config, self.num_heads * self.v_head_dim, hidden, bias=bias)

    def project_queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, hidden]`` -> ``[batch, heads, seq, qk_head_dim]`` (rope dims still unrotated)."""
        if self.q_lora_rank is None:
            query = self.q_proj(hidden_states)
        else:
            query = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        batch, seq = hidden_states.shape[:-1]
        return query.view(batch, seq, self.num_heads, self.qk_head_dim).transpose(1, 2)

    def expand_latent(self, latent: torch.Tensor, key_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent ``[batch, 1, seq, kv_lora_rank]`` and rotary key ``[batch, 1, seq, rope]`` -> per-head
        keys ``[batch, heads, seq, qk_head_dim]`` and values ``[batch, heads, seq, v_head_dim]``."""
        batch, _, seq, _ = latent.shape
        kv = self.kv_b_proj(latent).view(batch, seq, self.num_heads, -1).transpose(1, 2)
        key_nope, value = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat((key_nope, key_rope.expand(-1, self.num_heads, -1, -1)), dim=-1)
        return key, value

    def absorbs(self, new_tokens: int, total_tokens: int) -> bool:
        """Attend in the latent space? Only with a plain ``kv_b_proj`` (an adapter-wrapped one changes the
        weight the absorption would read) and eager/sdpa masks."""
        mode = self.config.mla_absorb
        if mode == "never" or hasattr(self.kv_b_proj, "base_layer"):  # PEFT's adapter layers wrap a base_layer
            return False
        if self.config._attn_implementation not in ("eager", "sdpa"):
            return False
        if mode == "always":
            return True
        return not self.training and new_tokens <= MLA_ABSORB_MAX_QUERY and total_tokens > new_tokens

    def absorbed_attention(
        self,
        query_nope: torch.Tensor,
        query_rope: torch.Tensor,
        latent: torch.Tensor,
        key_rope: torch.Tensor,
        attention_mask: torch.Tensor | None,
        query_positions: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over the cached latent without expanding it (DeepSeek's ``attn_impl="absorb"``):
        ``kv_b_proj``'s key part is folded into the queries, its value part applied after attending.
        ``query_*`` ``[batch, heads, new, dim]``, ``latent`` ``[batch, 1, total, kv_lora_rank]``, ``key_rope``
        ``[batch, 1, total, rope]`` -> ``[batch, new, heads * v_head_dim]`` and the attention map
        ``[batch, heads, new, total]`` (what the expanded form's eager attention returns).
        ``query_positions`` ``[batch or 1, new]`` place the queries in the cache where no mask says it (sdpa's
        causal shortcut; a pre-allocated static cache holds slots beyond them)."""
        batch, _, new, _ = query_nope.shape
        total = latent.shape[2]
        query_latent = self.through_kv_b_heads(query_nope, values=False)  # [batch, heads, new, kv_lora_rank]
        padded: list[torch.Tensor] = []  # the latent with room for torch's products, where they serve: padded once

        def latent_with_room() -> torch.Tensor:
            if not padded:
                padded.append(cache_with_room(latent))
            return padded[0]

        # [batch, heads, new, total], masked: on the CPU without a mask, one kernel call for the steps below
        scores = None if attention_mask is not None else \
            absorbed_scores(query_latent, query_rope, latent, key_rope, self.scaling, query_positions)
        if scores is None:
            scores = self.against_shared_keys(query_latent, latent, latent_with_room) + self.against_shared_keys(query_rope, key_rope)
            scores = scores.float() * self.scaling
            if attention_mask is None:  # sdpa's causal shortcut (no padding): slot k is visible from position >= k
                if query_positions is None:  # the new tokens are the last `new` slots
                    query_positions = torch.arange(total - new, total, device=scores.device)[None]
                slots = torch.arange(total, device=scores.device)
                visible = slots[None, None, :] <= query_positions.to(scores.device)[:, :, None]  # [batch or 1, new, total]
                scores = scores.masked_fill(~visible[:, None], float("-inf"))
            elif attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask[..., :total], float("-inf"))
            else:
                scores = scores + attention_mask[..., :total]
        probabilities = scores.softmax(dim=-1).to(latent.dtype)
        context = self.over_shared_values(probabilities, latent, latent_with_room)  # [batch, heads, new, kv_lora_rank]
        output = self.through_kv_b_heads(context, values=True).transpose(1, 2)  # [batch, new, heads, v_head_dim]
        return output.reshape(batch, new, self.num_heads * self.v_head_dim), probabilities

    def through_kv_b_heads(self, x: torch.Tensor, values: bool) -> torch.Tensor:
        """``kv_b_proj`` applied head by head in the latent space: queries ``[batch, heads, new, qk_nope]``
        through each head's key rows -> ``[batch, heads, new, kv_lora_rank]``, or (``values``) attended
        latents ``[batch, heads, new, kv_lora_rank]`` through its value rows -> ``[batch, heads, new, v_head]``.
        An FP8 or bf16 ``kv_b_proj`` is read in place on the CPU (:func:`.fp8_cpu.head_rows_product`); elsewhere an FP8 one is
        dequantized at the first step and kept for the next ones. A 4-bit one is dequantized at every step."""
        first, count = (self.qk_nope_head_dim, self.v_head_dim) if values else (0, self.qk_nope_head_dim)
        weight = self.kv_b_proj.weight
        if isinstance(self.kv_b_proj, FP8Linear):
            output = head_rows_product(weight, self.kv_b_proj.weight_scale_inv, self.kv_b_proj.block, self.num_heads,
                                       first, count, x, transposed=not values)
            if output is not None:
                return output
            weight = self.kv_b_proj.dequantized_weight(x.dtype, keep=True)
        elif weight.dtype == PACKED_DTYPE:  # bitsandbytes 4-bit (Linear4bit), dequantized for this step
            weight = dequantize_linear_4bit(weight).to(x.dtype)
        elif weight.dtype == torch.bfloat16:  # read in place on the CPU: the products below read twice the rows they use
            output = head_rows_product(weight, None, None, self.num_heads, first, count, x, transposed=not values)
            if output is not None:
                return output
        # Products with each head's whole block of rows [heads, qk_nope + v_head, c], contiguous: a slice of it
        # is a strided batch that the batched product first copies (0.46 ms per step and layer, V2-Lite).
        head_rows = weight.view(self.num_heads, -1, self.kv_lora_rank)
        batch, heads, new, _ = x.shape
        per_head = x.transpose(0, 1).reshape(heads, batch * new, -1)
        if values:
            output = (head_rows @ per_head.transpose(-1, -2))[:, first : first + count].transpose(-1, -2)
        else:  # the queries padded with zeros over the value rows
            output = F.pad(per_head, (0, head_rows.shape[1] - count)) @ head_rows
        return output.reshape(heads, batch, new, -1).transpose(0, 1)

    @classmethod
    def against_shared_keys(cls, x: torch.Tensor, keys: torch.Tensor,
                            keys_with_room: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """``x`` ``[batch, heads, new, k]`` against the cached ``keys`` ``[batch, 1, total, k]`` that every head
        reads -> scores ``[batch, heads, new, total]``: by the decode kernel where it serves
        (:func:`.fp8_cpu.shared_rows_product`, the keys read in place), else one product per sequence over the
        keys with room (``keys_with_room()``, by default :func:`cache_with_room` of them)."""
        batch, heads, new, _ = x.shape
        total = keys.shape[2]
        scores = shared_rows_product(x.reshape(batch, heads * new, -1), keys[:, 0])
        if scores is not None:
            return scores.view(batch, heads, new, total)
        padded = cache_with_room(keys) if keys_with_room is None else keys_with_room()
        return cls.over_shared_keys(x, padded.transpose(-1, -2))[..., :total]

    @classmethod
    def over_shared_values(cls, weights: torch.Tensor, values: torch.Tensor,
                           values_with_room: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Attention ``weights`` ``[batch, heads, new, total]`` over the cached ``values`` ``[batch, 1, total, m]``
        that every head reads -> ``[batch, heads, new, m]``: by the decode kernel where it serves
        (:func:`.fp8_cpu.shared_rows_product`), else one product per sequence over ``values_with_room()``."""
        batch, heads, new, total = weights.shape
        output = shared_rows_product(weights.reshape(batch, heads * new, total), values[:, 0], transposed=True)
        if output is not None:
            return output.view(batch, heads, new, -1)
        values = values_with_room()
        return cls.over_shared_keys(F.pad(weights, (0, values.shape[2] - total)), values)

    @staticmethod
    def over_shared_keys(x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """``x`` ``[batch, heads, new, k]`` @ ``shared`` ``[batch, 1, k, m]`` (the one latent every head reads)
        -> ``[batch, heads, new, m]``, as one product per sequence: broadcasting over the heads copied the
        latent once per head at every step."""
        batch, heads, new, _ = x.shape
        return (x.reshape(batch, heads * new, -1) @ shared[:, 0]).view(batch, heads, new, -1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[batch, seq, hidden]`` -> output ``[batch, seq, hidden]`` and the attention map (or None where
        the attention backend computes none, e.g. sdpa)."""
        batch, seq = hidden_states.shape[:-1]
        query = self.project_queries(hidden_states)
        query_nope, query_rope = query.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        compressed = self.kv_a_proj_with_mqa(hidden_states)
        latent, key_rope = compressed.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        # Single-head 4-D views, so every transformers cache layer stores them as they are.
        latent = self.kv_a_layernorm(latent).view(batch, 1, seq, self.kv_lora_rank)
        key_rope = key_rope.view(batch, 1, seq, self.qk_rope_head_dim)

        cos, sin = position_embeddings
        query_rope = apply_rotary_interleaved(query_rope, cos, sin)
        key_rope = apply_rotary_interleaved(key_rope, cos, sin)
        if cache is not None:
            latent, key_rope = cache.update(latent, key_rope, self.layer_idx)

        if self.absorbs(seq, latent.shape[2]):
            output, weights = self.absorbed_attention(
                query_nope, query_rope, latent, key_rope, attention_mask, kwargs.get("position_ids")
            )
            return self.o_proj(output), weights
        key, value = self.expand_latent(latent, key_rope)
        query = torch.cat((query_nope, query_rope), dim=-1)
        # sdpa's fused kernels (flash on the CPU and on GPUs) need the values as wide as the keys; otherwise it
        # falls back to its unfused math (512 tokens of V2-Lite's heads on the CPU in bf16: 30 ms against 19).
        padded_values = self.config._attn_implementation == "sdpa" and self.v_head_dim < self.qk_head_dim
        if padded_values:
            value = F.pad(value, (0, self.qk_head_dim - self.v_head_dim))
        output, weights = attention_function(self.config)(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        if padded_values:
            output = output[..., : self.v_head_dim]
        return self.o_proj(output.reshape(batch, seq, -1).contiguous()), weights
