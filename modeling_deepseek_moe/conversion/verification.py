"""``verify``: two checkpoint folders compared tensor by tensor, FP8 weights dequantized, so that an FP8
folder compares with its BF16 copy; the largest absolute and relative differences and where they are.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..fp8 import FP8_DTYPE, SCALE_SUFFIX, dequantize_fp8_blockwise
from ..safetensors_io import CheckpointError, SafetensorsReader
from .engine import Progress, Source, describe_mtp, is_mtp_key, open_source


def verify(a: str, b: str, quiet: bool = False, ignore_mtp: bool = False) -> dict:
    """Compare two checkpoints tensor by tensor (FP8 weights dequantized, so an FP8 folder compares with its
    BF16 copy): ``{"tensors", "max_abs_diff", "max_rel_diff", "worst_key"}``. Different tensor names or
    shapes are a CheckpointError naming the first one; when the only difference is V3's multi-token-
    prediction layer (DeepSeek's inference format has none), the error says so, and ``ignore_mtp``
    compares the other tensors (the result then says what was left out in ``"left_out"``)."""
    left, right = open_source(a, expect_layout=False), open_source(b, expect_layout=False)
    weights = lambda s: {k for k in s.keys if not k.endswith(SCALE_SUFFIX)}  # noqa: E731
    result = {"tensors": 0, "max_abs_diff": 0.0, "max_rel_diff": 0.0, "worst_key": None}
    only = sorted(weights(left) ^ weights(right))
    layers = left.config.get("num_hidden_layers")
    one_side = [(path, source) for path, source in ((a, left), (b, right)) if set(only) <= weights(source)]
    if only and layers is not None and one_side and all(is_mtp_key(key, layers) for key in only):
        holder = one_side[0][0]
        left_out = f"{describe_mtp(only, layers)} in {holder} only"
        if not ignore_mtp:
            raise CheckpointError(f"{a} and {b} differ only in V3's multi-token-prediction layer: {left_out} (DeepSeek's "
                                  "inference format has none: to-mp --drop-mtp leaves it out); pass --ignore-mtp to compare the rest")
        result["left_out"] = left_out
    elif only:
        raise CheckpointError(f"{a} and {b} hold different tensors: {only[0]!r} is in one only ({len(only)} such)")
    progress = Progress(left.size(), "verify", quiet)
    with contextlib.ExitStack() as stack:
        stack.callback(progress.close)
        readers = [WeightReader(source, stack) for source in (left, right)]
        for file, entries in left.files.items():
            for key in entries:
                if key.endswith(SCALE_SUFFIX) or key in only:
                    continue
                x, y = (reader.weight(key) for reader in readers)
                if x.shape != y.shape:
                    raise CheckpointError(f"{key!r}: shape {list(x.shape)} in {a}, {list(y.shape)} in {b}")
                diff, magnitude = max_difference(x, y)
                relative = diff / max(magnitude, 1e-30) if diff else 0.0
                if diff > result["max_abs_diff"]:
                    result.update(max_abs_diff=diff, worst_key=key)
                result["max_rel_diff"] = max(result["max_rel_diff"], relative)
                result["tensors"] += 1
            progress.advance(left.size(file))
    return result


def max_difference(x: torch.Tensor, y: torch.Tensor, piece: int = 2**22) -> tuple[float, float]:
    """``(max |x - y|, max |y|)`` in float64, a piece at a time (never a float64 copy of a whole tensor)."""
    x, y = x.reshape(-1), y.reshape(-1)
    diff = magnitude = 0.0
    for start in range(0, x.numel(), piece):
        a, b = x[start : start + piece].double(), y[start : start + piece].double()
        diff = max(diff, (a - b).abs().max().item())
        magnitude = max(magnitude, b.abs().max().item())
    return diff, magnitude


class WeightReader:
    """Tensors of a :class:`Source` by key, FP8 weights dequantized to fp32 (files opened once)."""

    def __init__(self, source: Source, stack: contextlib.ExitStack) -> None:
        self.source, self.stack, self.keys, self.handles = source, stack, source.keys, {}

    def read(self, key: str) -> torch.Tensor:
        file = self.keys[key]
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(SafetensorsReader(os.path.join(self.source.directory, file)))
        return self.handles[file].get_tensor(key)

    def weight(self, key: str) -> torch.Tensor:
        tensor = self.read(key)
        scale = key.removesuffix(".weight") + SCALE_SUFFIX
        if tensor.dtype == FP8_DTYPE and scale in self.keys:
            tensor = dequantize_fp8_blockwise(tensor, self.read(scale))
        return tensor
