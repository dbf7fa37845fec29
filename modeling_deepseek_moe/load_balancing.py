"""DeepSeek's load-balancing machinery, as formulas on one layer's routing decision.

* Expert-level balance loss (V1, V2; official code): ``alpha * sum_i f_i * P_i``, ``f_i = N/(K T) count_i``,
  ``P_i`` the mean routing probability; with ``seq_aux`` per sequence, then averaged.
* Device-level (V2 paper): experts split in ``n_group`` devices; ``a2 * sum_d f'_d * P'_d`` with
  ``f'_d`` the mean of ``f_i`` and ``P'_d`` the sum of ``P_i`` over device d's experts.
* Communication (V2 paper): ``a3 * sum_d f''_d * P''_d`` with ``f''_d = D/(M T) * (tokens sent to d)``.
* V3's complementary sequence-wise loss: the expert-level formula on ``s_i / sum_j s_j`` (normalised sigmoid).
* Token dropping (V2 training): per-expert capacity ``ceil(capacity_factor * T * K / E)``; the lowest
  affinity assignments beyond it are dropped (the token keeps its residual path).

:func:`balance_loss` sums the losses a config enables; the causal LM adds it over its MoE layers' routing
decisions. The V3 auxiliary-loss-free bias update lives in :mod:`.training` (it runs after optimizer steps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .routing import RouterOutput, tokens_per_expert


def expert_load_fractions(topk_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``f_i = N / (K T) * count_i`` per sequence: ``topk_indices`` ``[batch, T, K]`` -> ``[batch, N]``."""
    batch, tokens, top_k = topk_indices.shape
    counts = torch.zeros(batch, num_experts, device=topk_indices.device, dtype=torch.float32)
    counts.scatter_add_(1, topk_indices.reshape(batch, -1), torch.ones(batch, tokens * top_k, device=counts.device))
    return counts * (num_experts / (tokens * top_k))


def expert_balance_loss(probabilities: torch.Tensor, topk_indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * mean_b sum_i f_i P_i``. ``probabilities`` ``[batch, T, N]``, ``topk_indices`` ``[batch, T, K]``:
    pass ``batch = 1`` (all tokens as one sequence) for the batch-level loss."""
    fractions = expert_load_fractions(topk_indices, probabilities.shape[-1])
    return alpha * (fractions * probabilities.float().mean(dim=1)).sum(dim=1).mean()


def device_balance_loss(
    probabilities: torch.Tensor, topk_indices: torch.Tensor, num_devices: int, alpha: float
) -> torch.Tensor:
    """V2's device-level loss: ``alpha * mean_b sum_d mean_{i in d}(f_i) * sum_{i in d}(P_i)``."""
    batch, _, experts = probabilities.shape
    fractions = expert_load_fractions(topk_indices, experts).view(batch, num_devices, -1).mean(dim=-1)
    device_probability = probabilities.float().mean(dim=1).view(batch, num_devices, -1).sum(dim=-1)
    return alpha * (fractions * device_probability).sum(dim=1).mean()


def communication_balance_loss(
    probabilities: torch.Tensor, topk_indices: torch.Tensor, num_devices: int, devices_per_token: int, alpha: float
) -> torch.Tensor:
    """V2's communication loss: ``alpha * mean_b sum_d f''_d P''_d``, ``f''_d = D/(M T) * #tokens sent to d``."""
    batch, tokens, experts = probabilities.shape
    device_of_choice = topk_indices // (experts // num_devices)  # [batch, T, K]
    sent = F.one_hot(device_of_choice, num_devices).amax(dim=2).float()  # [batch, T, D]: token visits d
    fractions = sent.sum(dim=1) * (num_devices / (devices_per_token * tokens))
    device_probability = probabilities.float().mean(dim=1).view(batch, num_devices, -1).sum(dim=-1)
    return alpha * (fractions * device_probability).sum(dim=1).mean()


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return math.ceil(capacity_factor * tokens * top_k / num_experts)


def capacity_keep_mask(
    topk_indices: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, capacity_factor: float
) -> torch.Tensor:
    """``[tokens, K]`` bool: the assignments each expert keeps, its ``capacity`` highest-affinity ones."""
    tokens, top_k = topk_indices.shape
    capacity = expert_capacity(tokens, top_k, num_experts, capacity_factor)
    flat_experts, flat_weights = topk_indices.reshape(-1), topk_weights.reshape(-1).float()
    # Sort by affinity (descending), then stably by expert: the rank inside an expert's run decides who stays.
    by_affinity = torch.argsort(flat_weights, descending=True, stable=True)
    order = by_affinity[torch.argsort(flat_experts[by_affinity], stable=True)]
    sorted_experts = flat_experts[order]
    counts = tokens_per_expert(flat_experts, num_experts)
    rank = torch.arange(flat_experts.numel(), device=flat_experts.device) - (counts.cumsum(0) - counts)[sorted_experts]
    keep = torch.empty_like(flat_experts, dtype=torch.bool)
    keep[order] = rank < capacity
    return keep.view(tokens, top_k)


def balance_loss(routing: RouterOutput, config, batch: int) -> torch.Tensor | None:
    """The sum of the balance losses ``config`` enables for one MoE layer's routing of ``batch`` sequences
    (None when all are off). Per sequence when ``seq_aux`` (then averaged), else all tokens as one."""
    if not (config.aux_loss_alpha or config.device_aux_loss_alpha or config.comm_aux_loss_alpha):
        return None
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
        loss = loss + device_balance_loss(probabilities, chosen, config.n_group, config.device_aux_loss_alpha)
    if config.comm_aux_loss_alpha:
        loss = loss + communication_balance_loss(
            probabilities, chosen, config.n_group, config.topk_group, config.comm_aux_loss_alpha
        )
    return loss
