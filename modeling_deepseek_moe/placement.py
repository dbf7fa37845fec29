"""Expert placement: ``device_map`` dicts that spread each MoE layer's routed experts over devices
(expert parallelism inside one process) or keep them in CPU memory while the rest runs on GPUs.

Sizes come from the config alone (no model is built), so mapping DeepSeek-V3's 671B parameters takes
milliseconds. FP8 configs count quantized weights at one byte per parameter plus their block scales.

    device_map = expert_device_map(config, ["cuda:0", "cuda:1", ...])
    model = DeepseekMoEV3ForCausalLM.from_pretrained(path, device_map=device_map)
    print(placement_summary(device_map, config))
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from .configuration import DeepseekMoEConfig
from .fp8 import BLOCK


@dataclass
class Unit:
    """A module a device map places as a whole."""

    name: str
    parameters: int
    bytes: int
    experts: int = 0  # routed experts it holds


def _weight_bytes(shape: tuple[int, int], quantized: bool, element_size: int) -> int:
    if quantized:  # FP8: one byte per value plus a float32 scale per block
        return shape[0] * shape[1] + 4 * math.ceil(shape[0] / BLOCK[0]) * math.ceil(shape[1] / BLOCK[1])
    return shape[0] * shape[1] * element_size


def _unit(name: str, shapes: list[tuple[int, ...]], quantized: bool, element_size: int, experts: int = 0,
          repeat: int = 1) -> Unit:
    """``repeat`` copies of weights of ``shapes`` (1-D shapes are norms: never quantized)."""
    parameters = sum(math.prod(shape) for shape in shapes) * repeat
    size = sum(
        _weight_bytes(shape, quantized, element_size) if len(shape) == 2 else math.prod(shape) * element_size
        for shape in shapes
    ) * repeat
    return Unit(name, parameters, size, experts)


def _attention_shapes(config: DeepseekMoEConfig) -> list[tuple[int, ...]]:
    hidden, heads = config.hidden_size, config.num_attention_heads
    if config.attention_type == "mha":
        kv = config.num_key_value_heads * config.head_dim
        return [(heads * config.head_dim, hidden), (kv, hidden), (kv, hidden), (hidden, heads * config.head_dim)]
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    shapes = [(config.q_lora_rank, hidden), (config.q_lora_rank,), (heads * qk, config.q_lora_rank)] if config.q_lora_rank else [(heads * qk, hidden)]
    return shapes + [
        (config.kv_lora_rank + config.qk_rope_head_dim, hidden),
        (config.kv_lora_rank,),
        (heads * (config.qk_nope_head_dim + config.v_head_dim), config.kv_lora_rank),
        (hidden, heads * config.v_head_dim),
    ]


def _mlp_shapes(hidden: int, width: int) -> list[tuple[int, int]]:
    return [(width, hidden), (width, hidden), (hidden, width)]


def placement_units(config: DeepseekMoEConfig, chunks: int, dtype: torch.dtype = torch.bfloat16) -> list[Unit]:
    """Every module a causal-LM ``device_map`` names, in forward order, with routed experts as ``chunks``
    chunks per MoE layer."""
    element = torch.empty((), dtype=dtype).element_size()
    fp8 = bool(config.quantization_config) and config.quantization_config.get("quant_method") == "fp8"
    hidden = config.hidden_size
    units = [_unit("model.embed_tokens", [(config.vocab_size, hidden)], False, element), Unit("model.rotary_emb", 0, 0)]
    layers = [f"model.layers.{i}" for i in range(config.num_hidden_layers)]
    layers += [f"model.mtp.{d}" for d in range(config.num_nextn_predict_layers)]
    for index, prefix in enumerate(layers):
        if prefix.startswith("model.mtp"):
            units.append(_unit(f"{prefix}.enorm", [(hidden,)], False, element))
            units.append(_unit(f"{prefix}.hnorm", [(hidden,)], False, element))
            units.append(_unit(f"{prefix}.eh_proj", [(hidden, 2 * hidden)], False, element))
        units.append(_unit(f"{prefix}.input_layernorm", [(hidden,)], False, element))
        units.append(_unit(f"{prefix}.self_attn", _attention_shapes(config), fp8, element))
        units.append(_unit(f"{prefix}.post_attention_layernorm", [(hidden,)], False, element))
        if not config.is_moe_layer(index):
            units.append(_unit(f"{prefix}.mlp", _mlp_shapes(hidden, config.intermediate_size), fp8, element))
            continue
        experts = config.n_routed_experts
        gate = _unit(f"{prefix}.mlp.gate", [(experts, hidden)], False, element)
        if config.topk_method == "noaux_tc":
            gate.parameters += experts
            gate.bytes += 4 * experts  # e_score_correction_bias: float32
        units.append(gate)
        if config.n_shared_experts:
            width = config.moe_intermediate_size * config.n_shared_experts
            units.append(_unit(f"{prefix}.mlp.shared_experts", _mlp_shapes(hidden, width), fp8, element))
        per_chunk = experts // chunks
        for chunk in range(chunks):
            units.append(_unit(f"{prefix}.mlp.experts.chunks.{chunk}", _mlp_shapes(hidden, config.moe_intermediate_size),
                               fp8, element, experts=per_chunk, repeat=per_chunk))
        if prefix.startswith("model.mtp"):
            units.append(_unit(f"{prefix}.shared_head", [(hidden,)], False, element))
    units.append(_unit("model.norm", [(hidden,)], False, element))
    units.append(_unit("lm_head", [(config.vocab_size, hidden)], False, element))
    return units


def chunks_for(config: DeepseekMoEConfig, devices: int) -> int:
    """Chunks per layer for ``devices``: the routing groups when there are at least as many as devices (a
    device then holds whole groups, so group-limited routing is device-limited routing, and device loads
    differ by at most one group), else the smallest divisor of the expert count that is >= ``devices``."""
    if config.n_group and config.n_group > 1 and config.n_group >= devices:
        return config.n_group
    experts = config.n_routed_experts
    return next(c for c in range(devices, experts + 1) if experts % c == 0)


def _balanced_segments(units: list[Unit], devices: list) -> dict[str, object]:
    """Contiguous runs of ``units`` (forward order) with about equal bytes on each device."""
    total = sum(unit.bytes for unit in units)
    placement, seen = {}, 0
    for unit in units:
        index = min(int(seen * len(devices) / total), len(devices) - 1) if total else 0
        placement[unit.name] = devices[index]
        seen += unit.bytes
    return placement


def expert_device_map(
    config: DeepseekMoEConfig,
    devices: list[str | int],
    max_memory: dict[str | int, int | str] | None = None,
    offload_experts: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, str | int]:
    """A ``device_map`` for ``from_pretrained`` of a causal LM.

    Expert-parallel (default): each MoE layer's routed experts in contiguous chunks over ``devices``
    (aligned with ``n_group`` groups when they divide evenly: a token's experts then sit on at most
    ``topk_group`` devices); everything else balanced over the same devices in forward order.
    ``offload_experts="cpu"``: routed experts in CPU memory, the rest on ``devices``.
    ``max_memory`` (bytes or "80GiB" per device): chunks that do not fit go to ``"cpu"`` when it is listed,
    otherwise ``ValueError`` naming the device. The map names every chunk; ``from_pretrained`` reads the
    chunk count from it.
    """
    if not devices:
        raise ValueError("expert_device_map needs at least one device")
    if config.n_routed_experts is None:
        return _balanced_segments(placement_units(config, 1, dtype), list(devices))
    chunks = 1 if offload_experts else chunks_for(config, len(devices))
    units = placement_units(config, chunks, dtype)
    experts = [unit for unit in units if unit.experts]
    others = [unit for unit in units if not unit.experts]
    device_map = _balanced_segments(others, list(devices))
    for unit in experts:
        chunk = int(unit.name.rsplit(".", 1)[1])
        device_map[unit.name] = offload_experts or devices[chunk * len(devices) // chunks]
    if max_memory:
        _fit(device_map, units, {_key(d): _bytes(v) for d, v in max_memory.items()})
    return {unit.name: device_map[unit.name] for unit in units}


def _key(device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def _bytes(value: int | str) -> int:
    if isinstance(value, int):
        return value
    from .safetensors_io import parse_size

    return parse_size(value)


def _fit(device_map: dict, units: list[Unit], limits: dict[str, int]) -> None:
    """Move expert chunks off devices over their limit to "cpu" (when allowed), else fail naming the device."""
    used = defaultdict(int)
    for unit in units:
        used[_key(device_map[unit.name])] += unit.bytes
    for unit in reversed(units):  # offload the last layers' experts first
        device = _key(device_map[unit.name])
        if unit.experts and device in limits and used[device] > limits[device] and "cpu" in limits:
            device_map[unit.name] = "cpu"
            used[device] -= unit.bytes
            used["cpu"] += unit.bytes
    for device, size in used.items():
        if device in limits and size > limits[device]:
            raise ValueError(f"device {device} needs {size / 2**30:.2f} GiB, max_memory allows {limits[device] / 2**30:.2f} GiB")


def placement_summary(device_map: dict, config: DeepseekMoEConfig, dtype: torch.dtype = torch.bfloat16) -> str:
    """A table: per device, parameters, bytes and routed experts of ``device_map``."""
    chunks = 1 + max((int(name.rsplit(".", 1)[1]) for name in device_map if ".experts.chunks." in name), default=0)
    rows = defaultdict(lambda: [0, 0, 0])
    for unit in placement_units(config, chunks, dtype):
        row = rows[_key(device_map[unit.name])]
        row[0] += unit.parameters
        row[1] += unit.bytes
        row[2] += unit.experts
    lines = [f"{'device':<10}{'parameters':>18}{'GiB':>10}{'routed experts':>16}"]
    for device, (parameters, size, experts) in sorted(rows.items()):
        lines.append(f"{device:<10}{parameters:>18,}{size / 2**30:>10.2f}{experts:>16,}")
    return "\n".join(lines)
