"""bitsandbytes 4-bit (nf4 / fp4) weights for QLoRA: transformers' ``BitsAndBytesConfig(load_in_4bit=True)``
on this package's models, the routed experts included.

Attention, dense MLPs and shared experts become ``bnb.nn.Linear4bit`` through transformers' own
bitsandbytes quantizer. The routed experts' stacks are stored the way bitsandbytes stores each of DeepSeek's
per-expert tensors (``experts.E.{gate,up,down}_proj.weight``, a "part" here): ``quantize_4bit`` per part, in
blocks of ``BLOCKSIZE`` values, with double quantization when asked. A stacked projection of a chunk holds,
for ``[experts, parts]``:

- ``{projection}``: uint8 ``[experts, parts, part_numel / 2]``, two 4-bit codes per byte (frozen);
- ``{projection}_absmax``: ``[experts, parts, blocks]`` float32, or with double quantization uint8
  (padded to whole nested blocks, so that a slice of experts dequantizes them in one call);
- with double quantization ``{projection}_nested_absmax`` float32 ``[experts, parts, nested blocks]`` and
  ``{projection}_offset`` float32 ``[experts, parts, 1]``.

Only bitsandbytes quantizes and dequantizes (``quantize_4bit``, ``dequantize_blockwise``,
``dequantize_4bit``); the grouped product dequantizes the experts with rows a budget at a time
(:func:`.frozen.frozen_grouped_linear`). bitsandbytes is imported only when 4-bit weights are used.
"""

from __future__ import annotations

import torch

from .frozen import DEQUANTIZE_BUDGET_BYTES, frozen_grouped_linear, select_experts, tiled_linear

# bitsandbytes' block sizes: Linear4bit's default for the 4-bit codes, quantize_4bit's for the absmax
# codes of double quantization.
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
PACKED_DTYPE = torch.uint8


def is_bitsandbytes_config(quantization_config) -> bool:
    """Whether a ``quantization_config`` (transformers' config object or its dict) is a bitsandbytes one."""
    if quantization_config is None:
        return False
    method = quantization_config.get("quant_method") if isinstance(quantization_config, dict) \
        else getattr(quantization_config, "quant_method", None)
    return method == "bitsandbytes"


def bnb4bit_settings(config) -> dict | None:
    """``{"quant_type", "double_quant", "compute_dtype"}`` of a config whose ``quantization_config`` is
    bitsandbytes 4-bit, else None."""
    quantization = getattr(config, "quantization_config", None)
    if not is_bitsandbytes_config(quantization):
        return None
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    compute_dtype = quantization.get("bnb_4bit_compute_dtype") or "float32"
    return {"quant_type": quantization.get("bnb_4bit_quant_type", "fp4"),
            "double_quant": bool(quantization.get("bnb_4bit_use_double_quant")),
            "compute_dtype": getattr(torch, compute_dtype) if isinstance(compute_dtype, str) else compute_dtype}


def stack_tensor_shapes(experts: int, rows: int, cols: int, parts: int, settings: dict) -> dict[str, tuple[tuple, torch.dtype]]:
    """``{suffix: (shape, dtype)}`` of the tensors that hold ``experts`` stacked weights ``[rows, cols]`` made
    of ``parts`` row blocks quantized apart (suffix "" is the packed codes). Raises ValueError when a part
    is not whole blocks (its blocks would run into the next part)."""
    numel = rows // parts * cols
    if numel % BLOCKSIZE:
        raise ValueError(f"bitsandbytes 4-bit experts need each expert's [{rows // parts}, {cols}] weight to be whole "
                         f"blocks of {BLOCKSIZE} values, got {numel} values")
    blocks = numel // BLOCKSIZE
    if not settings["double_quant"]:
        return {"": ((experts, parts, numel // 2), PACKED_DTYPE), "_absmax": ((experts, parts, blocks), torch.float32)}
    nested_blocks = -(-blocks // NESTED_BLOCKSIZE)
    return {"": ((experts, parts, numel // 2), PACKED_DTYPE),
            "_absmax": ((experts, parts, nested_blocks * NESTED_BLOCKSIZE), torch.uint8),
            "_nested_absmax": ((experts, parts, nested_blocks), torch.float32),
            "_offset": ((experts, parts, 1), torch.float32)}


@torch.no_grad()
def quantize_part(values: torch.Tensor, settings: dict) -> dict[str, torch.Tensor]:
    """One expert's part ``[out, in]`` (quantized from its own dtype, as ``Linear4bit`` does) -> its
    ``{suffix: tensor}`` of :func:`stack_tensor_shapes`, flat."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(values.contiguous(), blocksize=BLOCKSIZE, compress_statistics=settings["double_quant"],
                                    quant_type=settings["quant_type"], quant_storage=PACKED_DTYPE)
    tensors = {"": packed.view(-1), "_absmax": state.absmax}
    if settings["double_quant"]:
        tensors.update(_nested_absmax=state.state2.absmax, _offset=state.offset.view(1))
    return tensors


def dequantized_absmax(stack: dict[str, torch.Tensor], experts: list[int], settings: dict) -> torch.Tensor:
    """The float32 block scales of ``experts``, ``[len(experts), parts * blocks]``: with double quantization
    the absmax codes of every part dequantized in one ``dequantize_blockwise`` (parts padded to whole
    nested blocks), plus each part's offset, as ``dequantize_4bit`` does for one tensor."""
    import bitsandbytes.functional as F

    absmax = select_experts(stack["_absmax"], experts)
    if settings["double_quant"]:
        nested = select_experts(stack["_nested_absmax"], experts)
        absmax = F.dequantize_blockwise(absmax.reshape(-1), absmax=nested.reshape(-1), blocksize=NESTED_BLOCKSIZE)
        blocks = stack[""].shape[-1] * 2 // BLOCKSIZE
        absmax = absmax.view(len(experts), stack[""].shape[1], -1)[..., :blocks] + select_experts(stack["_offset"], experts)
    return absmax.reshape(len(experts), -1)


def dequantize_codes(packed: torch.Tensor, absmax: torch.Tensor, settings: dict, dtype: torch.dtype) -> torch.Tensor:
    """4-bit codes (flat, whole blocks) and their float32 block scales -> ``dtype`` values, flat, by
    ``dequantize_4bit``. Given as rows of one block: bitsandbytes 0.50's AVX512 CPU kernel misplaces block
    scales when the last dimension is not a multiple of the block size (e.g. [64, 32]); the values are flat
    either way."""
    import bitsandbytes.functional as F

    state = F.QuantState(absmax=absmax.reshape(-1), shape=torch.Size((absmax.numel(), BLOCKSIZE)), blocksize=BLOCKSIZE,
                         quant_type=settings["quant_type"], dtype=dtype)
    return F.dequantize_4bit(packed.reshape(-1, 1), state).view(-1)


def dequantize_experts(stack: dict[str, torch.Tensor], experts: list[int], weight_shape: tuple[int, int],
                       settings: dict, dtype: torch.dtype) -> torch.Tensor:
    """The stacked 4-bit weights ``stack`` (``{suffix: tensor}``) of ``experts`` -> ``dtype``
    ``[len(experts), out, in]``, in one ``dequantize_4bit`` (parts are whole blocks, so their concatenation
    is what bitsandbytes lays out for the stack)."""
    values = dequantize_codes(select_experts(stack[""], experts), dequantized_absmax(stack, experts, settings), settings, dtype)
    return values.view(len(experts), *weight_shape)


def dequantized_row_tiles(stack: dict[str, torch.Tensor], expert: int, weight_shape: tuple[int, int], settings: dict,
                          dtype: torch.dtype, height: int):
    """``(top, bottom, rows top:bottom of the expert's weight as dtype)`` in tiles of ``height`` rows (rows
    of whole blocks: ``in`` a multiple of ``BLOCKSIZE``)."""
    rows, cols = weight_shape
    packed = stack[""][expert].reshape(-1)  # [rows * cols / 2], parts one after the other
    absmax = dequantized_absmax(stack, [expert], settings)[0]  # [rows * cols / BLOCKSIZE]
    for top in range(0, rows, height):
        bottom = min(top + height, rows)
        codes = packed[top * cols // 2 : bottom * cols // 2]
        scales = absmax[top * cols // BLOCKSIZE : bottom * cols // BLOCKSIZE]
        yield top, bottom, dequantize_codes(codes, scales, settings, dtype).view(bottom - top, cols)


def bnb4bit_grouped_linear(stack: dict[str, torch.Tensor], rows: torch.Tensor, offsets: torch.Tensor,
                           weight_shape: tuple[int, int], settings: dict) -> torch.Tensor:
    """:func:`.grouped_mm.grouped_linear` with frozen 4-bit stacked weights (``stack``, of
    ``weight_shape`` ``(out, in)`` per expert): rows ``[n, in]`` -> ``[n, out]`` in the rows' dtype,
    computed in ``settings["compute_dtype"]``. Only experts with rows are dequantized, at most
    ``DEQUANTIZE_BUDGET_BYTES`` of them at a time (an expert over it by row tiles), in the forward and
    again in the backward."""
    compute = rows.to(settings["compute_dtype"])
    out_features, in_features = weight_shape
    row_bytes = in_features * compute.element_size()
    # Transient buffers over the budget are what glibc keeps as heap between activations (a QLoRA step's
    # peak RSS +70% measured on bench_qlora.py's experts of 11.5 MB): tiles keep them within it.
    tiled = out_features * row_bytes > DEQUANTIZE_BUDGET_BYTES and in_features % BLOCKSIZE == 0
    height = max(1, DEQUANTIZE_BUDGET_BYTES // row_bytes)

    def dequantize(experts: list[int], dtype: torch.dtype) -> torch.Tensor:
        return dequantize_experts(stack, experts, weight_shape, settings, dtype)

    def row_tiled(expert: int, expert_rows: torch.Tensor, transposed: bool) -> torch.Tensor:
        tiles = dequantized_row_tiles(stack, expert, weight_shape, settings, expert_rows.dtype, height)
        return tiled_linear(expert_rows, tiles, transposed)

    output = frozen_grouped_linear(compute, offsets, weight_shape, dequantize, DEQUANTIZE_BUDGET_BYTES,
                                   row_tiled if tiled else None)
    return output.to(rows.dtype)


def dequantize_linear_4bit(weight: torch.Tensor) -> torch.Tensor:
    """A ``Linear4bit`` weight (``Params4bit``) ``[out, in]`` in the dtype it was quantized from."""
    import bitsandbytes.functional as F

    return F.dequantize_4bit(weight.data, weight.quant_state)


# ---------------------------------------------------------------------- loading
def quantizer_for(quantization_config):
    """transformers' bitsandbytes quantizer of ``quantization_config`` (checked against this machine)."""
    from transformers.quantizers.auto import AutoHfQuantizer

    return AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)


class Bnb4bitFiller:
    """What the loader does differently for a 4-bit model: ``Linear4bit`` weights are quantized by
    bitsandbytes as they are assigned (transformers' way), routed experts' parts one expert at a time into
    their chunk's stacks; ``expected_shape`` gives the float shape a checkpoint tensor must have."""

    @staticmethod
    def claims(module: torch.nn.Module, attr: str) -> bool:
        import bitsandbytes as bnb

        from .experts import ExpertChunk

        return (isinstance(module, bnb.nn.Linear4bit) and attr == "weight") or (
            isinstance(module, ExpertChunk) and module.bnb4bit is not None and attr in module.PARTS)

    @staticmethod
    def expected_shape(module: torch.nn.Module, attr: str) -> tuple[int, ...]:
        """The checkpoint shape of one tensor of a claimed ``module.attr``: the weight's, or an expert part's."""
        if attr == "weight":
            return (module.out_features, module.in_features)
        return module.part_shape(attr)

    @staticmethod
    def fill(module: torch.nn.Module, attr: str, part: tuple[int, int] | None, tensor: torch.Tensor) -> None:
        """Quantize ``tensor`` (on its device, in the model dtype) into ``module.attr``; ``part`` is
        ``(expert, part)`` for expert stacks."""
        import bitsandbytes as bnb

        if part is None:
            old = module.weight
            module._parameters["weight"] = bnb.nn.Params4bit(tensor, requires_grad=False, **old.__dict__).to(tensor.device)
            # bitsandbytes' AVX512-BF16 CPU inference path rewrites the weight in place, at the first forward
            # in eval mode, into a layout with bf16 block scales (ignoring a float32 compute dtype) that
            # needs out_features % 32 == 0 and that dequantize_4bit, training and merging cannot read: off.
            module.support_avx512bf16_for_cpu = False
            return
        module.set_part(attr, *part, tensor)
