"""DeepSeek-V3's block-wise FP8 weight format.

A quantized weight ``[..., out, in]`` is stored as ``float8_e4m3fn`` with ``weight_scale_inv`` float32
``[..., ceil(out / 128), ceil(in / 128)]``; ``dequantized = fp8 * scale_inv`` per 128 x 128 block, edge
blocks partial. ``scale_fmt="ue8m0"`` (DeepSeek-V3.1) rounds every scale up to a power of two.
"""

from __future__ import annotations

import re

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = (128, 128)
SCALE_FORMATS = ("float", "ue8m0")
# The weights DeepSeek-V3 stores in FP8: attention projections and every MLP projection (dense, shared,
# routed). Embeddings, heads, norms, the router and MTP's eh_proj stay in bf16.
QUANTIZED_KEY = re.compile(
    r"\.(self_attn\.(q_proj|k_proj|v_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$"
)
SCALE_SUFFIX = ".weight_scale_inv"
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> tuple[int, ...]:
    """The ``weight_scale_inv`` shape of a weight of ``shape``: ``[..., ceil(out/b0), ceil(in/b1)]``."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def _expand_blocks(scales: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """One scale per element: ``[..., r_blocks, c_blocks]`` -> ``[..., rows, cols]`` (edge blocks cropped)."""
    expanded = scales.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return expanded[..., :rows, :cols]


def quantize_fp8_blockwise(
    weight: torch.Tensor, block: tuple[int, int] = BLOCK, scale_fmt: str = "float"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``[..., out, in]`` -> ``(fp8 weight, weight_scale_inv float32 [..., ceil(out/b0), ceil(in/b1)])``,
    each block scaled so that its largest magnitude maps to 448 (``ue8m0``: scale rounded up to 2^k)."""
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FORMATS}, got {scale_fmt!r}")
    *lead, rows, cols = weight.shape
    padded_rows, padded_cols = -(-rows // block[0]) * block[0], -(-cols // block[1]) * block[1]
    values = weight.float()
    if (padded_rows, padded_cols) != (rows, cols):
        values = torch.nn.functional.pad(values, (0, padded_cols - cols, 0, padded_rows - rows))
    blocks = values.reshape(*lead, padded_rows // block[0], block[0], padded_cols // block[1], block[1])
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12)  # [..., r_blocks, c_blocks]
    scales = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        scales = torch.exp2(torch.ceil(torch.log2(scales)))
    quantized = (values.reshape(blocks.shape) / scales[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    quantized = quantized.reshape(*lead, padded_rows, padded_cols)[..., :rows, :cols].to(FP8_DTYPE)
    return quantized.contiguous(), scales.float().contiguous()


def dequantize_fp8_blockwise(
    weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32, block: tuple[int, int] = BLOCK
) -> torch.Tensor:
    """``fp8 weight [..., out, in] * scale_inv`` per block -> ``dtype``. Raises ValueError when the scale's
    shape is not the block grid of the weight (instead of guessing the block size from the ratio)."""
    *lead, rows, cols = weight.shape
    expected = scale_shape(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {list(scale_inv.shape)}, expected {list(expected)} for a weight "
            f"{list(weight.shape)} in {block[0]}x{block[1]} blocks"
        )
    values = weight.to(torch.float32) * _expand_blocks(scale_inv.float(), rows, cols, block)
    return values.to(dtype)


def quantize_tensors(tensors: dict[str, torch.Tensor], scale_fmt: str = "float") -> dict[str, torch.Tensor]:
    """Official-layout ``tensors``: the weights DeepSeek quantizes (``QUANTIZED_KEY``) -> FP8 + their
    ``weight_scale_inv``; everything else unchanged."""
    out = {}
    for key, tensor in tensors.items():
        if QUANTIZED_KEY.search(key) and tensor.dtype != FP8_DTYPE:
            out[key], out[key.removesuffix(".weight") + SCALE_SUFFIX] = quantize_fp8_blockwise(tensor, scale_fmt=scale_fmt)
        else:
            out[key] = tensor
    return out
