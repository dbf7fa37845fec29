"""The router (gate) of every DeepSeek MoE layer: one class, parameterised by the config.

* V1: softmax over logits in the model dtype, greedy top-k.
* V2: float32 softmax, ``greedy`` or ``group_limited_greedy`` (group score = best expert of the group).
* V3: float32 sigmoid, ``noaux_tc``: experts are *chosen* on ``scores + e_score_correction_bias`` (group
  score = sum of the group's two best), but *weighted* with the unbiased scores.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import DeepseekMoEConfig
from .fixed_dtypes import keep_dtypes_apply
from .fp8_cpu import route
from .linear import float32_linear

NORMALISATION_EPSILON = 1e-20  # added to the sum of a token's top-k weights before dividing by it


def tokens_per_expert(topk_indices: torch.Tensor, num_experts: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[num_experts]`` counts of the assignments ``topk_indices`` ``[tokens, top_k]``: int64, or counted in place
    into ``out`` (any dtype and device; the router statistics' float32 buffers). (A scatter-add, not ``bincount``,
    whose output size depends on the values: compile and export need a static shape.)"""
    counts = topk_indices.new_zeros(num_experts) if out is None else out.zero_()
    flat = topk_indices.reshape(-1).to(counts.device)
    return counts.index_add_(0, flat, torch.ones(flat.shape, dtype=counts.dtype, device=counts.device))


class RouterOutput(NamedTuple):
    logits: torch.Tensor  # [tokens, experts], the gate's raw output
    scores: torch.Tensor  # [tokens, experts], softmax or sigmoid of the logits
    topk_indices: torch.Tensor  # [tokens, top_k], chosen experts
    topk_weights: torch.Tensor  # [tokens, top_k], their mixing weights


class TopKRouter(nn.Module):
    """Scores every token against every routed expert and picks ``num_experts_per_tok`` of them."""

    # Router statistics (float32 buffers, not saved), see training.py.
    LOAD_COUNTERS = ("last_forward_load", "step_load", "last_step_load")
    # How a group of experts is scored for the group-limited methods (mask_dropped_groups).
    GROUP_SCORES = {"group_limited_greedy": "max", "noaux_tc": "top2_sum"}

    def __init__(self, config: DeepseekMoEConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.topk_method = config.topk_method
        self.scoring_func = config.scoring_func
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.logits_in_fp32 = config.router_logits_in_fp32
        self.uses_routed_scaling = config.uses_routed_scaling
        self.bias_update_speed = config.bias_update_speed
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        if self.topk_method == "noaux_tc":
            # Float32 always (never cast with the model): its updates are ~1e-3 steps that bf16 would lose.
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        # Router statistics (not saved; counted by training.py's hook): tokens per expert in the last
        # forward, accumulated over the current optimizer step (training forwards only), and over the last
        # finished step.
        for name in self.LOAD_COUNTERS:
            self.register_buffer(name, torch.zeros(self.num_experts, dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        """``.to(dtype)``, ``.half()``, ... move the correction bias and the load counters but never cast
        them down from float32."""
        return keep_dtypes_apply(self, super()._apply, fn, recurse, tuple(self._buffers))

    def forward(self, hidden_states: torch.Tensor) -> RouterOutput:
        """``hidden_states`` ``[tokens, hidden]`` -> routing decision for each token."""
        if self.logits_in_fp32:
            logits = float32_linear(hidden_states, self.weight)
        else:
            logits = F.linear(hidden_states, self.weight)
        normalised = self.top_k > 1 and self.norm_topk_prob
        decided = route(logits, self.e_score_correction_bias, self.scoring_func == "sigmoid",
                        None if self.topk_method == "greedy" else self.GROUP_SCORES[self.topk_method], self.n_group,
                        self.topk_group, self.top_k, normalised, NORMALISATION_EPSILON,
                        self.routed_scaling_factor if self.scales_weights(normalised) else 1.0)
        if decided is not None:  # the CPU kernel, one call (a decoded token's router took ~20 aten calls)
            return RouterOutput(logits, *decided)
        if self.scoring_func == "softmax":
            scores = logits.softmax(dim=-1, dtype=logits.dtype)
        else:
            scores = logits.sigmoid()

        choice_scores = scores
        if self.e_score_correction_bias is not None:
            # The bias only decides which experts are chosen; the weights below use the unbiased scores.
            choice_scores = scores + self.e_score_correction_bias.to(scores.device)
        if self.topk_method != "greedy":
            choice_scores = self.mask_dropped_groups(choice_scores)
        topk_indices = choice_scores.topk(self.top_k, dim=-1, sorted=False).indices  # [tokens, top_k]
        topk_weights = scores.gather(1, topk_indices)

        if normalised:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + NORMALISATION_EPSILON)
        if self.scales_weights(normalised):
            topk_weights = topk_weights * self.routed_scaling_factor
        return RouterOutput(logits, scores, topk_indices, topk_weights)

    def scales_weights(self, normalised: bool) -> bool:
        """V3 always multiplies by ``routed_scaling_factor``; V2 only when it did not normalise; V1 never."""
        if self.topk_method == "noaux_tc":
            return True
        return self.uses_routed_scaling and not normalised

    def mask_dropped_groups(self, choice_scores: torch.Tensor) -> torch.Tensor:
        """Keep the ``topk_group`` best expert groups of each token; the others get -inf (not 0: with
        negative biases a 0 fill would still pick experts of dropped groups)."""
        tokens = choice_scores.shape[0]
        grouped = choice_scores.view(tokens, self.n_group, -1)  # [tokens, groups, experts_per_group]
        if self.GROUP_SCORES[self.topk_method] == "top2_sum":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        kept = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # [tokens, topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        return grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(tokens, -1)
