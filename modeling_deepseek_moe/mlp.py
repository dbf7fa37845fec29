"""The dense SwiGLU MLP of DeepSeek's dense layers and shared experts: ``down(act(gate(x)) * up(x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN, SiLUActivation

from .configuration import DeepseekMoEConfig
from .fp8 import projection


class _SiluTimes(torch.autograd.Function):
    """``silu(gate) * up`` keeping ``gate`` and ``up`` for the backward, not also ``silu(gate)`` as autograd's
    composition does (one intermediate-sized tensor less per MLP in training); the same values and
    gradients (silu recomputed, its backward as aten's)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad * F.silu(gate) if ctx.needs_input_grad[1] else None


def gated(act_fn: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``act_fn(gate) * up``, through :class:`_SiluTimes` for SiLU (DeepSeek's activation) when autograd
    records it."""
    if isinstance(act_fn, (nn.SiLU, SiLUActivation)) and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiluTimes.apply(gate, up)
    return act_fn(gate) * up


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
        return self.down_proj(gated(self.act_fn, self.gate_proj(x), self.up_proj(x)))
