"""``merge-lora``: a PEFT LoRA adapter (linear LoRA and this package's expert LoRA) merged into a base
checkpoint folder, ``W + scaling * B @ A`` in fp32, FP8 weights dequantized, merged and re-quantized.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..fp8 import FP8_DTYPE, SCALE_SUFFIX, dequantize_fp8_blockwise, quantize_fp8_blockwise
from ..layout import OfficialLayout
from ..safetensors_io import CheckpointError, SafetensorsReader
from .engine import Destination, Summary, convert, model_config, open_source, require_folder, shard_units
from .quantization import scale_of

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LINEAR_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
EXPERT_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<projection>gate_up|down)_(?P<factor>[AB])$")


@dataclass
class LoraFactors:
    """One weight's low-rank update ``scaling * B @ A``."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float

    def delta(self) -> torch.Tensor:
        return (self.b.float() @ self.a.float()) * self.scaling


def _adapter_scaling(adapter: dict, module: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key  # PEFT's own rule for rank_pattern / alpha_pattern keys

    patterns = adapter.get("alpha_pattern") or {}
    alpha = patterns.get(get_pattern_key(patterns.keys(), module), adapter["lora_alpha"])
    return alpha / math.sqrt(rank) if adapter.get("use_rslora") else alpha / rank


def read_lora_adapter(adapter_directory: str, config: dict) -> dict[str, LoraFactors]:
    """A PEFT LoRA adapter folder (linear LoRA and this package's expert LoRA) -> ``{official key: factors}``
    for a base model with official ``config``; anything a merge cannot express is an error naming it."""
    require_folder(adapter_directory, "a PEFT adapter folder")
    config_path = os.path.join(adapter_directory, "adapter_config.json")
    weights_path = os.path.join(adapter_directory, ADAPTER_WEIGHTS)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise CheckpointError(f"{adapter_directory}: no {os.path.basename(path)} (not a PEFT adapter folder)")
    with open(config_path) as handle:
        adapter = json.load(handle)
    if adapter.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_path}: peft_type {adapter.get('peft_type')!r}, only LORA merges here")
    for unsupported in ("use_dora", "lora_bias", "modules_to_save", "target_parameters"):
        if adapter.get(unsupported):
            raise CheckpointError(f"{config_path}: {unsupported} is set; merge such an adapter with PEFT's merge_and_unload")
    factors: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    modules: dict[str, str] = {}  # parameter -> the PEFT-wrapped module (what rank/alpha patterns match)
    with SafetensorsReader(weights_path) as handle:
        for key in handle.keys():
            name = key.removeprefix(PEFT_PREFIX)
            match = LINEAR_LORA_KEY.match(name) or EXPERT_LORA_KEY.match(name)
            if match is None:
                raise CheckpointError(f"{weights_path}: tensor {key!r} is not a LoRA factor this merge knows")
            projection = match.groupdict().get("projection")
            param = match["module"] + (f".{projection}_proj" if projection else ".weight")
            factors[param][match["factor"]] = handle.get_tensor(key)
            modules[param] = match["module"]
    # The adapter's expert factors are stacked per chunk of experts, as the model that trained it held them.
    chunk_sizes = {pair["A"].shape[0] for param, pair in factors.items() if "A" in pair and pair["A"].dim() == 3}
    experts = config.get("n_routed_experts") or 0
    chunks = experts // chunk_sizes.pop() if chunk_sizes else 1
    layout = OfficialLayout(model_config(config, f"{weights_path} (experts in {chunks} chunks)", num_expert_chunks=chunks))
    official: dict[str, LoraFactors] = {}
    for param, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{weights_path}: {param} has lora_A or lora_B but not both")
        a, b = pair["A"], pair["B"]
        scaling = _adapter_scaling(adapter, modules[param], a.shape[-2])
        if a.dim() == 2:
            ((key, _),) = layout.official_items(param, b)
            official[key] = LoraFactors(a, b, scaling)
        else:  # stacked experts: official_items yields gate, up (or down) per expert, in order
            per_expert = len(list(layout.official_items(param, b[:1])))
            for index, (key, b_rows) in enumerate(layout.official_items(param, b)):
                official[key] = LoraFactors(a[index // per_expert], b_rows, scaling)
    return official


def merge_lora(base: str, adapter_directory: str, dst: str, overwrite: bool = False, resume: bool = False,
               quiet: bool = False) -> Summary:
    """Merge a PEFT LoRA adapter into a base folder (official or this package's): ``W + scaling * B @ A``
    computed in fp32, cast back to the weight's dtype; FP8 weights are dequantized, merged and re-quantized
    (with the base's scale format); every other tensor is copied unchanged."""
    destination = Destination(dst, "merge-lora", {"source": os.path.abspath(base), "adapter": os.path.abspath(adapter_directory)},
                              overwrite, resume)
    source = open_source(base)
    factors = read_lora_adapter(adapter_directory, source.config)
    entries = {key: entry for shard in source.files.values() for key, entry in shard.items()}
    for key, update in factors.items():
        if key not in entries:
            raise CheckpointError(f"{adapter_directory}: the adapter updates {key!r}, which {base} does not hold")
        expected = [update.b.shape[0], update.a.shape[1]]
        if list(entries[key]["shape"]) != expected:
            raise CheckpointError(f"{adapter_directory}: the update of {key!r} is {expected}, the weight {entries[key]['shape']}")
    scale_fmt = (source.config.get("quantization_config") or {}).get("scale_fmt") or "float"

    def tensors(shard, companions):
        out = {}
        for key, tensor in shard.items():
            if key.endswith(SCALE_SUFFIX) and key.removesuffix(SCALE_SUFFIX) + ".weight" in factors:
                continue  # written anew beside its merged weight
            if key not in factors:
                out[key] = tensor
            elif tensor.dtype == FP8_DTYPE:
                merged = dequantize_fp8_blockwise(tensor, scale_of(key, shard, companions)) + factors[key].delta()
                out[key], out[key.removesuffix(".weight") + SCALE_SUFFIX] = quantize_fp8_blockwise(merged, scale_fmt=scale_fmt)
            else:
                out[key] = (tensor.float() + factors[key].delta()).to(tensor.dtype)
        return out

    return convert(destination, shard_units(source, tensors), source.config, base, quiet=quiet)
