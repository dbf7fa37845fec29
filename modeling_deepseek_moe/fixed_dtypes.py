"""Tensors whose dtype never follows the model's: ``.to(torch.bfloat16)``, ``.half()`` and friends move them
between devices like the others but keep FP8 weights in FP8, and block scales, V3's router bias and the
router statistics in float32 (where a bf16 copy would lose V3's ~1e-3 bias updates)."""

from __future__ import annotations

from torch import nn


def keep_dtypes_apply(module: nn.Module, apply, fn, recurse: bool, names: tuple[str, ...]) -> nn.Module:
    """``module._apply`` (``apply``: the parent class's) that moves the tensors ``names`` between devices
    like the others but never changes their dtype: ``.to(torch.bfloat16)`` must not turn FP8 weights or
    float32 scales and router statistics into bf16."""
    # detach(): a view of the current storage (``_apply`` swaps a parameter's ``.data`` in place).
    kept = {name: tensor.detach() for name in names if (tensor := getattr(module, name, None)) is not None and not tensor.is_meta}
    apply(fn, recurse)
    for name, original in kept.items():
        now = getattr(module, name)
        if now.dtype != original.dtype:
            moved = original.to(now.device)
            if name in module._parameters:
                module._parameters[name] = nn.Parameter(moved, requires_grad=now.requires_grad)
            else:
                module._buffers[name] = moved
    return module
