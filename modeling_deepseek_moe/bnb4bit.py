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
(:func:`.frozen.frozen_grouped_linear`), and on the CPU with gradients the ``Linear4bit`` layers' products
dequantize by row tiles the same way (:class:`TiledLinear4bit`). Tiles are dequantized into one reused
buffer per thread (:func:`.frozen.scratch`). bitsandbytes is imported only when 4-bit weights are used
(:func:`bitsandbytes`), so that the remote code of a saved checkpoint does not require it.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from .frozen import DEQUANTIZE_BUDGET_BYTES, frozen_grouped_linear, frozen_product, scratch, select_experts, tiled_linear

# bitsandbytes' block sizes: Linear4bit's default for the 4-bit codes, quantize_4bit's for the absmax
# codes of double quantization.
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
PACKED_DTYPE = torch.uint8


def bitsandbytes():
    """The ``bitsandbytes`` package, imported on first use (an optional dependency: transformers refuses
    remote code that imports a missing package outside a ``try``)."""
    try:
        import bitsandbytes
        import bitsandbytes.cextension
        import bitsandbytes.functional
    except ImportError as error:
        raise ImportError("bitsandbytes 4-bit weights need bitsandbytes: pip install 'bitsandbytes>=0.50'") from error
    return bitsandbytes


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
    packed, state = bitsandbytes().functional.quantize_4bit(values.contiguous(), blocksize=BLOCKSIZE, compress_statistics=settings["double_quant"],
                                    quant_type=settings["quant_type"], quant_storage=PACKED_DTYPE)
    tensors = {"": packed.view(-1), "_absmax": state.absmax}
    if settings["double_quant"]:
        tensors.update(_nested_absmax=state.state2.absmax, _offset=state.offset.view(1))
    return tensors


def dequantized_absmax(stack: dict[str, torch.Tensor], experts: list[int], settings: dict) -> torch.Tensor:
    """The float32 block scales of ``experts``, ``[len(experts), parts * blocks]``: with double quantization
    the absmax codes of every part dequantized in one ``dequantize_blockwise`` (parts padded to whole
    nested blocks), plus each part's offset, as ``dequantize_4bit`` does for one tensor."""
    absmax = select_experts(stack["_absmax"], experts)
    if settings["double_quant"]:
        nested = select_experts(stack["_nested_absmax"], experts)
        absmax = bitsandbytes().functional.dequantize_blockwise(absmax.reshape(-1), absmax=nested.reshape(-1), blocksize=NESTED_BLOCKSIZE)
        blocks = stack[""].shape[-1] * 2 // BLOCKSIZE
        absmax = absmax.view(len(experts), stack[""].shape[1], -1)[..., :blocks] + select_experts(stack["_offset"], experts)
    return absmax.reshape(len(experts), -1)


@functools.cache
def _native_cpu_dequantize(quant_type: str, dtype: torch.dtype):
    """The native CPU function behind bitsandbytes' ``dequantize_4bit`` for this type, which writes into a
    given buffer (0.50 implements the op's ``out=`` variant for CUDA, XPU and MPS only), or None."""
    name = f"cdequantize_blockwise_cpu_{quant_type}_" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return getattr(getattr(bitsandbytes().cextension.lib, "_lib", None), name, None)


def dequantize_codes(packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, dtype: torch.dtype,
                     blocksize: int = BLOCKSIZE, out: torch.Tensor | None = None) -> torch.Tensor:
    """4-bit codes (flat, whole blocks) and their float32 block scales -> ``dtype`` values, flat, by
    bitsandbytes' ``dequantize_4bit`` (into ``out`` if given). Given as rows of one block: bitsandbytes
    0.50's AVX512 CPU kernel misplaces block scales when the last dimension is not a multiple of the block
    size (e.g. [64, 32]); the values are flat either way."""
    F = bitsandbytes().functional
    blocks = absmax.numel()
    kernel = _native_cpu_dequantize(quant_type, dtype) if out is not None and out.device.type == "cpu" else None
    if kernel is not None:  # what the op's CPU implementation calls, with our buffer
        codes, scales = packed.reshape(-1).contiguous(), absmax.reshape(-1).float().contiguous()
        kernel(ctypes.c_void_p(codes.data_ptr()), ctypes.c_void_p(scales.data_ptr()), ctypes.c_void_p(out.data_ptr()),
               ctypes.c_longlong(blocksize), ctypes.c_longlong(blocks), ctypes.c_longlong(blocksize))
        return out
    state = F.QuantState(absmax=absmax.reshape(-1), shape=torch.Size((blocks, blocksize)), blocksize=blocksize,
                         quant_type=quant_type, dtype=dtype)
    if out is None or out.device.type == "cpu":  # (a CPU build without the native function: a copy)
        values = F.dequantize_4bit(packed.reshape(-1, 1), state).view(-1)
        return values if out is None else out.copy_(values)
    F.dequantize_4bit(packed.reshape(-1, 1), state, out=out.view(blocks, blocksize))
    return out


def equal_tile_height(rows: int, row_bytes: int) -> int:
    """Rows per tile of a ``[rows, *]`` weight dequantized at ``row_bytes`` per row, within
    ``DEQUANTIZE_BUDGET_BYTES``: tiles of one height where up to twice the fewest tiles divide the rows
    (2816 rows in 4 tiles of 704, not 3 of 939 and 938), else of nearly equal heights. Equal tiles reuse each
    other's memory, and one shape is one oneDNN primitive per product (~0.7 MB each) instead of two."""
    fewest = -(-rows * row_bytes // DEQUANTIZE_BUDGET_BYTES)
    tiles = next((count for count in range(fewest, min(2 * fewest, rows) + 1) if rows % count == 0), fewest)
    return -(-rows // tiles)


def row_tiles(packed: torch.Tensor, scales: torch.Tensor, weight_shape: tuple[int, int], quant_type: str,
              blocksize: int, dtype: torch.dtype, height: int):
    """``(top, bottom, rows top:bottom of the weight as dtype)`` of a 4-bit weight ``weight_shape``
    (``packed`` codes and float32 block ``scales``, flat, row-major), ``height`` rows at a time into the
    thread's :func:`.frozen.scratch` (``cols`` a multiple of ``blocksize``)."""
    rows, cols = weight_shape
    for top in range(0, rows, height):
        bottom = min(top + height, rows)
        buffer = scratch((bottom - top) * cols, dtype, packed.device)
        tile = dequantize_codes(packed[top * cols // 2 : bottom * cols // 2], scales[top * cols // blocksize : bottom * cols // blocksize],
                                quant_type, dtype, blocksize, out=buffer)
        yield top, bottom, tile.view(bottom - top, cols)


def dequantize_experts(stack: dict[str, torch.Tensor], experts: list[int], weight_shape: tuple[int, int],
                       settings: dict, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The stacked 4-bit weights ``stack`` (``{suffix: tensor}``) of ``experts`` -> ``dtype``
    ``[len(experts), out, in]`` (into ``out`` if given), in one ``dequantize_4bit`` (parts are whole blocks,
    so their concatenation is what bitsandbytes lays out for the stack)."""
    values = dequantize_codes(select_experts(stack[""], experts), dequantized_absmax(stack, experts, settings),
                              settings["quant_type"], dtype, out=out)
    return values.view(len(experts), *weight_shape)


def bnb4bit_grouped_linear(stack: dict[str, torch.Tensor], rows: torch.Tensor, offsets: torch.Tensor,
                           weight_shape: tuple[int, int], settings: dict) -> torch.Tensor:
    """:func:`.grouped_mm.grouped_linear` with frozen 4-bit stacked weights (``stack``, of
    ``weight_shape`` ``(out, in)`` per expert): rows ``[n, in]`` -> ``[n, out]``, in the rows' dtype (the
    experts cast their input to ``settings["compute_dtype"]``, :meth:`.experts.ExpertChunk.forward`). Only
    experts with rows are dequantized, at most ``DEQUANTIZE_BUDGET_BYTES`` of them at a time (an expert over
    it by row tiles), in the forward and again in the backward."""
    out_features, in_features = weight_shape
    row_bytes = in_features * rows.element_size()
    # Transient buffers over the budget are what glibc keeps as heap between activations (a QLoRA step's
    # peak RSS +70% measured on bench_qlora.py's experts of 11.5 MB): tiles keep them within it.
    tiled = out_features * row_bytes > DEQUANTIZE_BUDGET_BYTES and in_features % BLOCKSIZE == 0
    height = equal_tile_height(out_features, row_bytes)

    def dequantize(experts: list[int], dtype: torch.dtype) -> torch.Tensor:
        buffer = scratch(len(experts) * out_features * in_features, dtype, rows.device)
        return dequantize_experts(stack, experts, weight_shape, settings, dtype, out=buffer)

    def row_tiled(expert: int, expert_rows: torch.Tensor, transposed: bool) -> torch.Tensor:
        scales = dequantized_absmax(stack, [expert], settings)[0]  # [out * in / BLOCKSIZE], parts one after the other
        tiles = row_tiles(stack[""][expert].reshape(-1), scales, weight_shape, settings["quant_type"], BLOCKSIZE,
                          expert_rows.dtype, height)
        return tiled_linear(expert_rows, tiles, transposed)

    return frozen_grouped_linear(rows, offsets, weight_shape, dequantize, DEQUANTIZE_BUDGET_BYTES,
                                 row_tiled if tiled else None)


def dequantize_linear_4bit(weight: torch.Tensor) -> torch.Tensor:
    """A ``Linear4bit`` weight (``Params4bit``) ``[out, in]`` in the dtype it was quantized from."""
    return bitsandbytes().functional.dequantize_4bit(weight.data, weight.quant_state)


# ---------------------------------------------------------------------- Linear4bit layers
def linear4bit_block_scales(state) -> torch.Tensor:
    """The float32 block scales of a ``Linear4bit`` weight's quantization state (its absmax, dequantized
    and offset under double quantization, as ``dequantize_4bit`` does)."""
    if not state.nested:
        return state.absmax.float()
    return (bitsandbytes().functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def tiled_linear4bit_product(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a ``Linear4bit`` ``layer`` (input features whole blocks) through
    :func:`.frozen.frozen_product`: the weight dequantized by equal row tiles into the thread's
    :func:`.frozen.scratch`, in the forward and again in the backward, computed in the layer's compute dtype."""
    state = layer.weight.quant_state
    compute = layer.compute_dtype or x.dtype
    out_features, in_features = state.shape
    height = equal_tile_height(out_features, in_features * torch.empty((), dtype=compute).element_size())
    packed = layer.weight.data.reshape(-1)

    def product(inputs: torch.Tensor, transposed: bool) -> torch.Tensor:
        tiles = row_tiles(packed, linear4bit_block_scales(state), (out_features, in_features), state.quant_type,
                          state.blocksize, compute, height)
        return tiled_linear(inputs, tiles, transposed)

    output = frozen_product(x.reshape(-1, in_features).to(compute), product)
    if layer.bias is not None:
        output = output + layer.bias.to(compute)
    return output.view(*x.shape[:-1], out_features).to(x.dtype)


@functools.cache
def tiled_linear4bit_class() -> type:
    """:class:`TiledLinear4bit`, defined on first use (it subclasses bitsandbytes' ``Linear4bit``)."""

    class TiledLinear4bit(bitsandbytes().nn.Linear4bit):
        """bitsandbytes' ``Linear4bit`` (what transformers' quantizer makes, PEFT wraps and merges) whose
        products with gradients on the CPU run :func:`tiled_linear4bit_product`: bitsandbytes dequantizes the
        whole weight, forward and backward (4-45 MB per V2-Lite projection), and glibc kept those buffers as
        heap between the activations (a QLoRA step's peak RSS 105 MB higher on bench_qlora.py's model).
        Elsewhere, and for inputs that are not whole blocks, bitsandbytes' own forward."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            state = self.weight.quant_state
            if x.device.type == "cpu" and torch.is_grad_enabled() and state is not None \
                    and self.in_features % state.blocksize == 0:
                return tiled_linear4bit_product(self, x)
            return super().forward(x)

    TiledLinear4bit.__module__, TiledLinear4bit.__qualname__ = __name__, "TiledLinear4bit"  # found by pickle
    return TiledLinear4bit


def __getattr__(name: str):
    if name == "TiledLinear4bit":
        return tiled_linear4bit_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        from .experts import ExpertChunk

        return (isinstance(module, bitsandbytes().nn.Linear4bit) and attr == "weight") or (
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
        if part is None:
            old = module.weight
            module._parameters["weight"] = bitsandbytes().nn.Params4bit(tensor, requires_grad=False, **old.__dict__).to(tensor.device)
            # bitsandbytes' AVX512-BF16 CPU inference path rewrites the weight in place, at the first forward
            # in eval mode, into a layout with bf16 block scales (ignoring a float32 compute dtype) that
            # needs out_features % 32 == 0 and that dequantize_4bit, training and merging cannot read: off.
            module.support_avx512bf16_for_cpu = False
            module.__class__ = tiled_linear4bit_class()
            return
        module.set_part(attr, *part, tensor)
