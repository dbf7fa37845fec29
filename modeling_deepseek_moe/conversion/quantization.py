"""FP8 <-> BF16 on the CPU: ``dequantize`` (DeepSeek-V3's block-wise FP8 -> bf16, scales dropped) and
``quantize`` (bf16 -> FP8 with exactly the tensors DeepSeek quantizes, in either scale format).
"""

from __future__ import annotations

import os

import torch

from ..fp8 import FP8_DTYPE, FP8_QUANTIZATION_CONFIG, SCALE_FORMATS, SCALE_SUFFIX, dequantize_fp8_blockwise, quantize_tensors
from ..safetensors_io import CheckpointError
from .engine import Destination, Summary, convert, open_source, shard_units


def scale_of(key: str, tensors: dict[str, torch.Tensor], companions: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ``weight_scale_inv`` of FP8 weight ``key``, from its shard or the companion scales."""
    scale = key.removesuffix(".weight") + SCALE_SUFFIX
    found = tensors.get(scale, companions.get(scale))
    if found is None:
        raise CheckpointError(f"FP8 tensor {key!r} has no {scale!r}")
    return found


def bf16_unless_fp32_buffer(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Floating tensors to bf16, except V3's router bias, which DeepSeek keeps in fp32."""
    if tensor.is_floating_point() and not key.endswith("e_score_correction_bias"):
        return tensor.to(torch.bfloat16)
    return tensor


def dequantize_tensors(tensors: dict[str, torch.Tensor], companions: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """FP8 weights (scales from ``tensors`` or ``companions``) -> bf16, scales dropped; the others as
    :func:`bf16_unless_fp32_buffer` makes them."""
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if tensor.dtype == FP8_DTYPE:
            out[key] = dequantize_fp8_blockwise(tensor, scale_of(key, tensors, companions or {}), torch.bfloat16)
        else:
            out[key] = bf16_unless_fp32_buffer(key, tensor)
    return out


def dequantize(src: str, dst: str, overwrite: bool = False, resume: bool = False, quiet: bool = False) -> Summary:
    """FP8 -> BF16 on the CPU; scales and quantization_config removed, index rewritten."""
    destination = Destination(dst, "dequantize", {"source": os.path.abspath(src)}, overwrite, resume)
    source = open_source(src)
    if not source.is_fp8:
        raise CheckpointError(f"{os.path.join(src, 'config.json')}: no FP8 quantization_config (quant_method 'fp8'): "
                              "nothing to dequantize")
    config = dict(source.config, torch_dtype="bfloat16")
    config.pop("quantization_config")
    return convert(destination, shard_units(source, dequantize_tensors), config, src, quiet=quiet)


def quantize(src: str, dst: str, scale_fmt: str = "float", overwrite: bool = False, resume: bool = False,
             quiet: bool = False) -> Summary:
    """BF16 -> block-wise FP8 with DeepSeek's layout and quantization_config (``scale_fmt`` "ue8m0": scales
    rounded up to powers of two, as DeepSeek-V3.1)."""
    destination = Destination(dst, "quantize", {"source": os.path.abspath(src), "scale_fmt": scale_fmt}, overwrite, resume)
    if scale_fmt not in SCALE_FORMATS:
        raise CheckpointError(f"scale_fmt must be one of {list(SCALE_FORMATS)}, got {scale_fmt!r}")
    source = open_source(src)
    if source.is_fp8:
        raise CheckpointError(f"{os.path.join(src, 'config.json')}: quantization_config says the weights are FP8 already "
                              "(dequantize them first to quantize them again)")
    quantization = dict(FP8_QUANTIZATION_CONFIG, **({"scale_fmt": "ue8m0"} if scale_fmt == "ue8m0" else {}))
    config = dict(source.config, quantization_config=quantization)
    units = shard_units(source, lambda shard, _: quantize_tensors(shard, scale_fmt))
    return convert(destination, units, config, src, quiet=quiet)
