"""Expert placement: ``device_map`` dicts that spread each MoE layer's routed experts over devices
(expert parallelism inside one process) or keep them in CPU memory while the rest runs on GPUs.

Sizes come from the config alone (the checkpoint's tensor list, no model is built), so mapping
DeepSeek-V3's 671B parameters takes about 0.1 s. FP8 configs count quantized weights at one byte per
parameter plus their block scales.

    device_map = expert_device_map(config, ["cuda:0", "cuda:1", ...])
    model = DeepseekMoEV3ForCausalLM.from_pretrained(path, device_map=device_map)
    print(placement_summary(device_map, config))
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

import torch

from .configuration import DeepseekMoEConfig
from .fp8 import QUANTIZED_KEY, scale_shape
from .layout import OfficialLayout, official_tensor_shapes


@dataclass
class Unit:
    """A module a device map places as a whole."""

    name: str
    parameters: int
    bytes: int
    experts: int = 0  # routed experts it holds


# The module a device map places each parameter with (placement granularity): a decoder layer's norms,
# attention, dense MLP or router / shared experts / expert chunks, V3's MTP extras, and the model's ends.
_UNIT = re.compile(r"^(?P<unit>model\.(?:layers|mtp)\.\d+\.(?:mlp\.(?:gate|shared_experts|experts\.chunks\.\d+)|\w+)"
                   r"|model\.\w+|lm_head)\.")
# Forward order of a decoder layer's units (by the last component of the unit's name).
_LAYER_ORDER = ("enorm", "hnorm", "eh_proj", "input_layernorm", "self_attn", "post_attention_layernorm", "mlp",
                "gate", "shared_experts", "chunks", "shared_head")


def _forward_position(name: str) -> tuple:
    parts = name.split(".")
    if len(parts) < 4:  # model.embed_tokens, model.rotary_emb, model.norm, lm_head
        return ({"embed_tokens": 0, "rotary_emb": 1}.get(parts[-1], 4),)
    block = (2, int(parts[2])) if parts[1] == "layers" else (3, int(parts[2]))
    component = "chunks" if "chunks" in parts else parts[-1]
    return (*block, _LAYER_ORDER.index(component), int(parts[-1]) if component == "chunks" else 0)


def placement_units(config: DeepseekMoEConfig, chunks: int, dtype: torch.dtype = torch.bfloat16) -> list[Unit]:
    """Every module a causal-LM ``device_map`` names, in forward order, with routed experts as ``chunks``
    chunks per MoE layer; sizes from the checkpoint's tensor list (:func:`.layout.official_tensor_shapes`,
    the one place that knows the shapes), FP8-quantized weights at one byte plus their float32 block scales,
    V3's router bias in float32."""
    element = torch.empty((), dtype=dtype).element_size()
    fp8 = bool(config.quantization_config) and config.quantization_config.get("quant_method") == "fp8"
    layout_config = config.to_dict() | {"num_expert_chunks": chunks}
    layout = OfficialLayout(type(config).from_dict(layout_config) if chunks != config.num_expert_chunks else config)
    units = {"model.rotary_emb": Unit("model.rotary_emb", 0, 0)}
    for key, shape in official_tensor_shapes(layout_config).items():
        slot = layout.slot(key)
        if slot is None:  # the MTP layer's copies of the embedding and the head
            continue
        name = _UNIT.match(slot.param)["unit"]
        unit = units.setdefault(name, Unit(name, 0, 0))
        unit.parameters += math.prod(shape)
        if fp8 and QUANTIZED_KEY.search(key):  # FP8: one byte per value plus a float32 scale per block
            unit.bytes += math.prod(shape) + 4 * math.prod(scale_shape(shape))
        else:
            unit.bytes += math.prod(shape) * (4 if key.endswith("e_score_correction_bias") else element)
        if "experts.chunks." in name and key.endswith("down_proj.weight"):
            unit.experts += 1
    return sorted(units.values(), key=lambda unit: _forward_position(unit.name))


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
