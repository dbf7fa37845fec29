"""Checkpoint conversion, streaming shard by shard: DeepSeek's official folders <-> this package's,
FP8 <-> BF16 on the CPU, DeepSeek's inference ("mp") format, LoRA merges, and tensor-by-tensor checks.

Every conversion validates the source before writing (index against files, every expected tensor with
its shape and dtype, files not truncated), writes into ``DST.partial`` with a journal of finished shards
(``--resume`` continues from it), and renames to ``DST`` at the end. At most one source shard and its
converted copy are in memory at a time. The console script is ``deepseek-moe-convert`` (see :func:`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from tqdm.auto import tqdm

from .layout import OFFICIAL_MODEL_TYPES, OfficialLayout, official_architecture, official_tensor_shapes
from .safetensors_io import (
    SAFE_WEIGHTS_INDEX_NAME,
    CheckpointError,
    SafetensorsReader,
    SafetensorsWriter,
    checkpoint_files,
    create_safetensors,
    data_offsets,
    header_bytes_for,
    safetensors_header,
    write_tensor,
)
from .saving import auto_map, remote_code_files
from .configuration import DeepseekMoEV1Config, DeepseekMoEV2Config, DeepseekMoEV3Config
from .fp8 import (
    FP8_DTYPE,
    FP8_QUANTIZATION_CONFIG,
    QUANTIZED_KEY,
    SCALE_SUFFIX,
    dequantize_fp8_blockwise,
    quantize_fp8_blockwise,
    quantize_tensors,
    scale_shape,
)

CONFIG_CLASSES = {c.model_type: c for c in (DeepseekMoEV1Config, DeepseekMoEV2Config, DeepseekMoEV3Config)}
OFFICIAL_TO_OURS = {official: ours for ours, official in OFFICIAL_MODEL_TYPES.items()}
# Files of a model folder that are not weights: copied as they are.
EXTRA_FILES = re.compile(r"(tokenizer.*|special_tokens_map\.json|generation_config\.json|.*\.model|.*\.tiktoken|README\.md|LICENSE.*)")
JOURNAL = ".conversion.json"


# ---------------------------------------------------------------------- reading sources
@dataclass
class Source:
    """A checkpoint folder: config.json (as a dict) and ``{file: {key: header entry}}``."""

    directory: str
    config: dict
    files: dict[str, dict[str, dict]]

    @cached_property
    def keys(self) -> dict[str, str]:
        """``{key: file}``, built once (conversions look scales up once per weight)."""
        return {key: file for file, entries in self.files.items() for key in entries}

    def size(self) -> int:
        return sum(os.path.getsize(os.path.join(self.directory, f)) for f in self.files)


def open_source(directory: str, expect_layout: bool = True) -> Source:
    """Read and validate a source folder; with ``expect_layout``, every tensor DeepSeek's layout has for its
    config must be there with its shape (FP8 weights with their scales and dtype)."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{directory}: no config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    files = {}
    for file, keys in checkpoint_files(directory).items():
        header = safetensors_header(os.path.join(directory, file))
        files[file] = {key: header[key] for key in keys}
    source = Source(directory, config, files)
    if expect_layout:
        validate_layout(source)
    return source


def validate_layout(source: Source) -> None:
    keys = source.keys
    fp8 = (source.config.get("quantization_config") or {}).get("quant_method") == "fp8"
    for key, shape in official_tensor_shapes(source.config).items():
        file = keys.get(key)
        if file is None:
            raise CheckpointError(f"{source.directory}: tensor {key!r} is missing")
        entry = source.files[file][key]
        if tuple(entry["shape"]) != shape:
            raise CheckpointError(f"{file}: tensor {key!r} has shape {entry['shape']}, expected {list(shape)}")
        if fp8 and QUANTIZED_KEY.search(key):
            if entry["dtype"] != "F8_E4M3":
                raise CheckpointError(f"{file}: tensor {key!r} has dtype {entry['dtype']}, expected F8_E4M3")
            scale = key.removesuffix(".weight") + SCALE_SUFFIX
            if scale not in keys:
                raise CheckpointError(f"{source.directory}: FP8 scale {scale!r} is missing")
            scale_entry = source.files[keys[scale]][scale]
            if tuple(scale_entry["shape"]) != scale_shape(shape):
                raise CheckpointError(f"{keys[scale]}: tensor {scale!r} has shape {scale_entry['shape']}, expected {list(scale_shape(shape))}")


# ---------------------------------------------------------------------- the streaming engine
@dataclass
class Plan:
    """One conversion: how the config changes, and how each source shard's tensors become output tensors.
    ``tensors(shard, companions)`` gets the shard's tensors and, in ``companions``, the FP8 scales of its
    weights that DeepSeek's index placed in another shard."""

    name: str
    config: Callable[[dict], dict]
    tensors: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    copy_code: bool = False
    arguments: dict = field(default_factory=dict)


@dataclass
class Summary:
    tensors_in: int = 0
    tensors_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        return (f"{self.tensors_in} tensors ({self.bytes_in / 2**30:.2f} GiB) -> {self.tensors_out} tensors "
                f"({self.bytes_out / 2**30:.2f} GiB) in {self.seconds:.1f} s"
                + (f", {self.shards_skipped} finished shards reused" if self.shards_skipped else ""))


def prepare_destination(destination: str, overwrite: bool, resume: bool, plan: Plan) -> tuple[str, list[str]]:
    """The work folder ``DST.partial`` and the shards a resumed run already finished."""
    if os.path.exists(destination) and os.listdir(destination) and not overwrite:
        raise CheckpointError(f"{destination} exists and is not empty (pass --overwrite to replace it)")
    work = destination.rstrip("/") + ".partial"
    journal_path = os.path.join(work, JOURNAL)
    if resume and os.path.isfile(journal_path):
        with open(journal_path) as handle:
            journal = json.load(handle)
        if journal.get("plan") != plan.name or journal.get("arguments") != plan.arguments:
            raise CheckpointError(f"{work} holds a different conversion ({journal.get('plan')}); drop --resume")
        return work, list(journal["finished"])  # the units (shards) each subcommand recorded as done
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    return work, []


def record(work: str, plan: Plan, finished: list[str]) -> None:
    temporary = os.path.join(work, JOURNAL + ".tmp")
    with open(temporary, "w") as handle:
        json.dump({"plan": plan.name, "arguments": plan.arguments, "finished": finished}, handle)
    os.replace(temporary, os.path.join(work, JOURNAL))


def convert(source: Source, destination: str, plan: Plan, overwrite: bool = False, resume: bool = False,
            quiet: bool = False) -> Summary:
    """Run ``plan`` over ``source`` shard by shard into ``destination`` (see the module doc)."""
    start = time.time()
    work, finished = prepare_destination(destination, overwrite, resume, plan)
    summary = Summary(shards_skipped=len(finished))
    weight_map: dict[str, str] = {}
    progress = tqdm(total=source.size(), unit="B", unit_scale=True, desc=plan.name, disable=quiet)
    for file, entries in source.files.items():
        path = os.path.join(source.directory, file)
        if file in finished:
            if os.path.isfile(os.path.join(work, file)):  # a shard whose tensors all were dropped has no file
                weight_map.update(dict.fromkeys(safetensors_header(os.path.join(work, file)), file))
            progress.update(os.path.getsize(path))
            continue
        target = os.path.join(work, file)
        with SafetensorsReader(path) as reader, SafetensorsWriter(target, header_bytes_for(entries, 2)) as writer:
            for group in weight_groups(entries):
                tensors = {key: reader.get_tensor(key) for key in group}
                summary.tensors_in += len(tensors)
                summary.bytes_in += sum(t.numel() * t.element_size() for t in tensors.values())
                for key, tensor in plan.tensors(tensors, read_companion_scales(source, file, tensors)).items():
                    writer.add(key, tensor)
                    weight_map[key] = file
                    summary.tensors_out += 1
                    summary.bytes_out += tensor.numel() * tensor.element_size()
        if not writer.header:  # every tensor of this shard was dropped
            os.remove(target)
        finished.append(file)
        record(work, plan, finished)
        progress.update(os.path.getsize(path))
    progress.close()
    write_folder_files(source.directory, work, plan.config(dict(source.config)), weight_map, plan.copy_code)
    publish(work, destination)
    summary.seconds = time.time() - start
    return summary


def weight_groups(keys: Iterable[str]) -> list[list[str]]:
    """A shard's keys in conversion units: each weight with its ``weight_scale_inv`` when both are here."""
    keys = list(keys)
    present = set(keys)
    groups = []
    for key in keys:
        if key.endswith(SCALE_SUFFIX) and key.removesuffix(SCALE_SUFFIX) + ".weight" in present:
            continue  # goes with its weight
        scale = key.removesuffix(".weight") + SCALE_SUFFIX
        groups.append([key, scale] if key.endswith(".weight") and scale in present else [key])
    return groups


def read_companion_scales(source: Source, file: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``weight_scale_inv`` of this shard's FP8 weights that are stored in other shards."""
    keys = source.keys
    elsewhere = defaultdict(list)
    for key, tensor in tensors.items():
        scale = key.removesuffix(".weight") + SCALE_SUFFIX
        if tensor.dtype == FP8_DTYPE and keys.get(scale, file) != file:
            elsewhere[keys[scale]].append(scale)
    companions = {}
    for other, scales in elsewhere.items():
        with SafetensorsReader(os.path.join(source.directory, other)) as reader:
            companions.update({scale: reader.get_tensor(scale) for scale in scales})
    return companions


def write_folder_files(source_directory: str, work: str, config: dict | None, weight_map: dict[str, str],
                       copy_code: bool = False) -> None:
    """Index (when ``weight_map``), config.json (when ``config``), the tokenizer and generation files of the
    source and, for this package's format, the modeling code."""
    if weight_map:
        total = sum(
            entry["data_offsets"][1] - entry["data_offsets"][0]
            for file in set(weight_map.values())
            for entry in safetensors_header(os.path.join(work, file)).values()
        )
        with open(os.path.join(work, SAFE_WEIGHTS_INDEX_NAME), "w") as handle:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, handle, indent=2)
    if config is not None:
        with open(os.path.join(work, "config.json"), "w") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
    for name in os.listdir(source_directory):
        if EXTRA_FILES.fullmatch(name):
            shutil.copy(os.path.join(source_directory, name), work)
    for path in remote_code_files() if copy_code else ():
        shutil.copy(path, work)


def publish(work: str, destination: str) -> None:
    os.remove(os.path.join(work, JOURNAL))
    if os.path.exists(destination):
        shutil.rmtree(destination)
    os.replace(work, destination)


# ---------------------------------------------------------------------- configs
# Fields this package writes into config.json that DeepSeek's schema does not have.
PACKAGE_ONLY_FIELDS = {
    "auto_map", "head_dim", "qk_head_dim", "num_expert_chunks", "device_aux_loss_alpha", "comm_aux_loss_alpha",
    "bias_update_speed", "capacity_factor", "mla_absorb", "mtp_loss_weight", "fp8_compute", "output_router_logits",
    "rope_parameters", "transformers_version", "dtype",
}


def _apply(config: dict, changes: dict) -> dict:
    """``changes`` applied to ``config``; a None value removes the field."""
    config = dict(config)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def to_our_config(config: dict, **changes) -> dict:
    """DeepSeek's config.json -> this package's: same fields, our model_type, ``auto_map`` and architecture
    (validated by building the config: a bad combination is an error naming the field)."""
    model_type = OFFICIAL_TO_OURS.get(config["model_type"], config["model_type"])
    if model_type not in CONFIG_CLASSES:
        raise CheckpointError(f"config.json: model_type {config['model_type']!r} is not a DeepSeek MoE family")
    config = _apply(config, changes)
    config_class = CONFIG_CLASSES[model_type]
    try:
        fields = json.loads(json.dumps(config))  # the config class edits rope_scaling in place
        config_class(**{k: v for k, v in fields.items() if k not in ("model_type", "auto_map", "architectures")})
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"config.json: {error}") from error
    family = config_class.__name__.removeprefix("DeepseekMoE").removesuffix("Config")
    return {**config, "model_type": model_type, "auto_map": auto_map(config_class),
            "architectures": [official_architecture(f"DeepseekMoE{family}ForCausalLM")]}


def to_official_config(config: dict, **changes) -> dict:
    """This package's config.json -> DeepSeek's schema: DeepSeek's model_type and architecture, RoPE as
    ``rope_theta`` + ``rope_scaling``, this package's own fields dropped."""
    official_type = OFFICIAL_MODEL_TYPES.get(config["model_type"], config["model_type"])
    if official_type not in OFFICIAL_TO_OURS:
        raise CheckpointError(f"config.json: model_type {config['model_type']!r} is not a DeepSeek MoE family")
    official = {k: v for k, v in config.items() if k not in PACKAGE_ONLY_FIELDS}
    rope = dict(config.get("rope_parameters") or {})
    if rope:  # written by save_pretrained: transformers' rope_parameters
        official["rope_theta"] = rope.pop("rope_theta", 10000.0)
        rope_type = rope.pop("rope_type", "default")
        rope.pop("type", None)
        official["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    if "dtype" in config and "torch_dtype" not in official:
        official["torch_dtype"] = str(config["dtype"]).removeprefix("torch.")
    family = CONFIG_CLASSES[OFFICIAL_TO_OURS[official_type]].__name__.removesuffix("Config")
    official.update(model_type=official_type, architectures=[official_architecture(f"{family}ForCausalLM")])
    return _apply(official, changes)


# ---------------------------------------------------------------------- tensor transforms
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


def is_mtp_key(key: str, num_layers: int) -> bool:
    match = re.match(r"model\.layers\.(\d+)\.", key)
    return bool(match) and int(match[1]) >= num_layers


# ---------------------------------------------------------------------- subcommands (library functions)
def from_official(src: str, dst: str, dtype: str = "keep", drop_mtp: bool = False, **options) -> Summary:
    """Official folder -> this package's format (config with our model_type and auto_map, modeling code)."""
    source = open_source(src)
    fp8_source = (source.config.get("quantization_config") or {}).get("quant_method") == "fp8"
    layers = source.config["num_hidden_layers"]

    def tensors(shard, companions):
        if drop_mtp:
            shard = {k: v for k, v in shard.items() if not is_mtp_key(k, layers)}
        if dtype == "bf16":
            shard = dequantize_tensors(shard, companions)
        elif dtype == "fp8":
            shard = quantize_tensors(shard)
        return shard

    def config(official):
        changes = {"num_nextn_predict_layers": 0} if drop_mtp else {}
        if dtype == "bf16":
            changes.update(quantization_config=None, torch_dtype="bfloat16")
        elif dtype == "fp8" and not fp8_source:
            changes["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        return to_our_config(official, **changes)

    plan = Plan("from-official", config, tensors, copy_code=True, arguments={"dtype": dtype, "drop_mtp": drop_mtp})
    return convert(source, dst, plan, **options)


def to_official(src: str, dst: str, **options) -> Summary:
    """This package's folder -> DeepSeek's config schema; tensors unchanged (they are already official)."""
    source = open_source(src)
    return convert(source, dst, Plan("to-official", to_official_config, lambda shard, _: shard), **options)


def dequantize(src: str, dst: str, **options) -> Summary:
    """FP8 -> BF16 on the CPU; scales and quantization_config removed, index rewritten."""
    source = open_source(src)
    if (source.config.get("quantization_config") or {}).get("quant_method") != "fp8":
        raise CheckpointError(f"{src}: config.json has no FP8 quantization_config")

    plan = Plan("dequantize", lambda c: _apply(c, {"quantization_config": None, "torch_dtype": "bfloat16"}), dequantize_tensors)
    return convert(source, dst, plan, **options)


def quantize(src: str, dst: str, scale_fmt: str = "float", **options) -> Summary:
    """BF16 -> block-wise FP8 with DeepSeek's layout and quantization_config."""
    source = open_source(src)

    quantization = dict(FP8_QUANTIZATION_CONFIG, **({"scale_fmt": "ue8m0"} if scale_fmt == "ue8m0" else {}))
    plan = Plan("quantize", lambda c: _apply(c, {"quantization_config": quantization}), lambda shard, _: quantize_tensors(shard, scale_fmt), arguments={"scale_fmt": scale_fmt})
    return convert(source, dst, plan, **options)


# ---------------------------------------------------------------------- LoRA merge
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
    chunk_sizes = {pair["A"].shape[0] for param, pair in factors.items() if "A" in pair and pair["A"].dim() == 3}
    experts = config.get("n_routed_experts") or 0
    layout = OfficialLayout(argparse.Namespace(
        num_hidden_layers=config["num_hidden_layers"], num_nextn_predict_layers=config.get("num_nextn_predict_layers", 0),
        n_routed_experts=experts, num_expert_chunks=experts // chunk_sizes.pop() if chunk_sizes else 1,
        moe_intermediate_size=config.get("moe_intermediate_size")))
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


def merge_lora(base: str, adapter_directory: str, dst: str, **options) -> Summary:
    """Merge a PEFT LoRA adapter into a base folder (official or this package's): ``W + scaling * B @ A``
    computed in fp32, cast back to the weight's dtype; FP8 weights are dequantized, merged and re-quantized
    (with the base's scale format); every other tensor is copied unchanged."""
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

    plan = Plan("merge-lora", lambda c: c, tensors, arguments={"adapter": os.path.abspath(adapter_directory)})
    return convert(source, dst, plan, **options)


def verify(a: str, b: str, quiet: bool = False) -> dict[str, float]:
    """Compare two checkpoints tensor by tensor (FP8 weights dequantized, so an FP8 folder compares with its
    BF16 copy): ``{"tensors", "max_abs_diff", "max_rel_diff", "worst_key"}``; different tensor names or
    shapes are a CheckpointError naming the first one."""
    left, right = open_source(a, expect_layout=False), open_source(b, expect_layout=False)
    weights = lambda s: {k for k in s.keys if not k.endswith(SCALE_SUFFIX)}  # noqa: E731
    if weights(left) != weights(right):
        only = sorted(weights(left) ^ weights(right))
        raise CheckpointError(f"{a} and {b} hold different tensors: {only[0]!r} is in one only ({len(only)} such)")
    result = {"tensors": 0, "max_abs_diff": 0.0, "max_rel_diff": 0.0, "worst_key": None}
    progress = tqdm(total=left.size(), unit="B", unit_scale=True, desc="verify", disable=quiet)
    with contextlib.ExitStack() as stack:
        readers = [WeightReader(source, stack) for source in (left, right)]
        for file, entries in left.files.items():
            for key in entries:
                if key.endswith(SCALE_SUFFIX):
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
            progress.update(os.path.getsize(os.path.join(left.directory, file)))
    progress.close()
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


# ---------------------------------------------------------------------- DeepSeek's inference ("mp") format
# DeepSeek-V3's inference/convert.py: per name part, the new name and the dim split across ranks.
MP_NAMES = {
    "embed_tokens": ("embed", 0), "input_layernorm": ("attn_norm", None), "post_attention_layernorm": ("ffn_norm", None),
    "q_proj": ("wq", 0), "q_a_proj": ("wq_a", None), "q_a_layernorm": ("q_norm", None), "q_b_proj": ("wq_b", 0),
    "kv_a_proj_with_mqa": ("wkv_a", None), "kv_a_layernorm": ("kv_norm", None), "kv_b_proj": ("wkv_b", 0),
    "o_proj": ("wo", 1), "gate": ("gate", None), "gate_proj": ("w1", 0), "down_proj": ("w2", 1),
    "up_proj": ("w3", 0), "norm": ("norm", None), "lm_head": ("head", 0),
}
MP_FROM_NAMES = {new: old for old, (new, _) in MP_NAMES.items()}
MP_PARTS = {"self_attn": "attn", "mlp": "ffn", "weight_scale_inv": "scale", "e_score_correction_bias": "bias"}
MP_FROM_PARTS = {new: old for old, new in MP_PARTS.items()}


def mp_name(key: str) -> tuple[str, int | None, int | None]:
    """Official key -> (mp name, split dim or None, routed expert index or None)."""
    parts = key.removeprefix("model.").split(".")
    parts = [MP_PARTS.get(p, p) for p in parts]
    new, dim = MP_NAMES[parts[-2]]
    parts[-2] = new
    expert = int(parts[-3]) if "experts" in parts and "shared_experts" not in parts else None
    return ".".join(parts), dim, expert


def official_name(name: str) -> str:
    """mp name -> official key (the inverse of :func:`mp_name`)."""
    parts = name.split(".")
    parts[-2] = MP_FROM_NAMES[parts[-2]]
    parts = [MP_FROM_PARTS.get(p, p) for p in parts]
    key = ".".join(parts)
    return key if key.startswith("lm_head") else "model." + key


def mp_file(rank: int, ranks: int) -> str:
    return f"model{rank}-mp{ranks}.safetensors"


def _rank_parts(key: str, entry: dict, ranks: int, experts: int) -> list[tuple[int, str, list[int], int | None]]:
    """Where an official tensor goes: ``[(rank, mp name, shape, split dim)]``."""
    name, dim, expert = mp_name(key)
    shape = list(entry["shape"])
    if expert is not None:
        return [(expert // (experts // ranks), name, shape, None)]
    if dim is None:
        return [(rank, name, shape, None) for rank in range(ranks)]
    if shape[dim] % ranks:
        raise CheckpointError(f"{key!r}: dim {dim} of {shape} does not split over {ranks} ranks")
    part = list(shape)
    part[dim] //= ranks
    return [(rank, name, part, dim) for rank in range(ranks)]


def to_mp(src: str, dst: str, model_parallel: int, overwrite: bool = False, resume: bool = False,
          quiet: bool = False) -> Summary:
    """Official (or this package's) folder -> DeepSeek-V3's inference format: ``model{i}-mp{N}.safetensors``,
    routed experts whole on their rank, other weights split on DeepSeek's dims, MTP layers skipped.
    Each rank file's layout is fixed from the source headers first, then filled shard by shard."""
    start = time.time()
    source = open_source(src)
    layers, experts = source.config["num_hidden_layers"], source.config.get("n_routed_experts") or 1
    if experts % model_parallel:
        raise CheckpointError(f"n_routed_experts ({experts}) does not split over {model_parallel} ranks")
    plan = Plan("to-mp", lambda c: c, lambda shard, _: shard, arguments={"model_parallel": model_parallel})
    work, finished = prepare_destination(dst, overwrite, resume, plan)
    layout = [dict() for _ in range(model_parallel)]
    for file, entries in source.files.items():
        for key, entry in entries.items():
            if not is_mtp_key(key, layers):
                for rank, name, shape, _ in _rank_parts(key, entry, model_parallel, experts):
                    layout[rank][name] = (entry["dtype"], shape)
    if finished:
        offsets = [data_offsets(os.path.join(work, mp_file(r, model_parallel))) for r in range(model_parallel)]
    else:
        offsets = [create_safetensors(os.path.join(work, mp_file(r, model_parallel)), layout[r]) for r in range(model_parallel)]
    summary = Summary(shards_skipped=len(finished))
    progress = tqdm(total=source.size(), unit="B", unit_scale=True, desc="to-mp", disable=quiet)
    handles = [open(os.path.join(work, mp_file(r, model_parallel)), "r+b") for r in range(model_parallel)]
    try:
        for file, entries in source.files.items():
            path = os.path.join(source.directory, file)
            if file not in finished:
                with SafetensorsReader(path) as handle:
                    for key in entries:
                        if is_mtp_key(key, layers):
                            continue
                        tensor = handle.get_tensor(key)
                        summary.tensors_in += 1
                        summary.bytes_in += tensor.numel() * tensor.element_size()
                        for rank, name, shape, dim in _rank_parts(key, entries[key], model_parallel, experts):
                            part = tensor if dim is None else tensor.narrow(dim, rank * shape[dim], shape[dim])
                            write_tensor(handles[rank], offsets[rank][name], part)
                            summary.tensors_out += 1
                            summary.bytes_out += part.numel() * part.element_size()
                for open_handle in handles:
                    open_handle.flush()
                finished.append(file)
                record(work, plan, finished)
            progress.update(os.path.getsize(path))
    finally:
        for open_handle in handles:
            open_handle.close()
        progress.close()
    write_folder_files(source.directory, work, None, {})
    publish(work, dst)
    summary.seconds = time.time() - start
    return summary


def from_mp(src: str, dst: str, config_path: str, overwrite: bool = False, resume: bool = False,
            quiet: bool = False, max_shard_size: int = 5 * 10**9) -> Summary:
    """DeepSeek-V3's inference format -> official folder (with the official ``config_path`` config.json)."""
    start = time.time()
    with open(config_path) as handle:
        config = json.load(handle)
    ranks = sorted(f for f in os.listdir(src) if re.fullmatch(r"model\d+-mp\d+\.safetensors", f))
    if not ranks:
        raise CheckpointError(f"{src}: no model{{i}}-mp{{N}}.safetensors files")
    count = int(re.search(r"mp(\d+)", ranks[0])[1])
    expected = [mp_file(r, count) for r in range(count)]
    if ranks != sorted(expected):
        raise CheckpointError(f"{src}: expected {expected}, found {ranks}")
    headers = [safetensors_header(os.path.join(src, f)) for f in expected]
    experts = config.get("n_routed_experts") or 1
    shapes = {k: s for k, s in official_tensor_shapes(config).items() if not is_mtp_key(k, config["num_hidden_layers"])}
    fp8 = (config.get("quantization_config") or {}).get("quant_method") == "fp8"
    keys = list(shapes)
    if fp8:
        keys += [k.removesuffix(".weight") + SCALE_SUFFIX for k in shapes if QUANTIZED_KEY.search(k)]
    plan = Plan("from-mp", lambda c: c, lambda shard, _: shard, arguments={"config": config_path})
    work, finished = prepare_destination(dst, overwrite, resume, plan)
    sizes = {}
    for key in keys:
        name, dim, expert = mp_name(key)
        rank = expert // (experts // count) if expert is not None else 0
        if name not in headers[rank]:
            raise CheckpointError(f"{expected[rank]}: tensor {name!r} (official {key!r}) is missing")
        entry = headers[rank][name]
        sizes[key] = (entry["data_offsets"][1] - entry["data_offsets"][0]) * (count if dim is not None and expert is None else 1)
    shards, current, total = [], [], 0
    for key in keys:
        if current and total + sizes[key] > max_shard_size:
            shards.append(current)
            current, total = [], 0
        current.append(key)
        total += sizes[key]
    shards.append(current)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    summary = Summary(shards_skipped=len(finished))
    weight_map = {}
    stack = contextlib.ExitStack()
    handles = [stack.enter_context(SafetensorsReader(os.path.join(src, f))) for f in expected]
    progress = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="from-mp", disable=quiet)
    for file, shard_keys in zip(files, shards):
        weight_map.update(dict.fromkeys(shard_keys, file))
        if file not in finished:
            with SafetensorsWriter(os.path.join(work, file), header_bytes_for(shard_keys)) as writer:
                for key in shard_keys:
                    name, dim, expert = mp_name(key)
                    if expert is not None:
                        parts = [handles[expert // (experts // count)].get_tensor(name)]
                    elif dim is None:
                        parts = [handles[0].get_tensor(name)]
                    else:
                        parts = [h.get_tensor(name) for h in handles]
                    tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
                    writer.add(key, tensor)
                    summary.tensors_in += len(parts)
                    summary.bytes_in += tensor.numel() * tensor.element_size()
                    summary.tensors_out += 1
                    summary.bytes_out += tensor.numel() * tensor.element_size()
            finished.append(file)
            record(work, plan, finished)
        progress.update(sum(sizes[k] for k in shard_keys))
    progress.close()
    stack.close()
    mtp_dropped = {"num_nextn_predict_layers": 0} if config.get("num_nextn_predict_layers") else {}
    write_folder_files(src, work, _apply(config, mtp_dropped), weight_map)
    publish(work, dst)
    summary.seconds = time.time() - start
    return summary


# ---------------------------------------------------------------------- command line
def main(argv: Iterable[str] | None = None) -> int:
    """``deepseek-moe-convert SUBCOMMAND ...``; exit status 2 with a one-line error on a bad source."""
    parser = argparse.ArgumentParser(prog="deepseek-moe-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name, help_text, *extra, positionals=("src", "dst"), writes=True):
        command = commands.add_parser(name, help=help_text)
        for positional in positionals:
            command.add_argument(positional)
        for flags, kwargs in extra:
            command.add_argument(*flags, **kwargs)
        if writes:
            command.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
            command.add_argument("--resume", action="store_true", help="continue an interrupted conversion into DST")
        command.add_argument("--quiet", action="store_true", help="no progress bar")

    add("from-official", "official folder -> this package's format",
        (["--dtype"], dict(choices=["keep", "bf16", "fp8"], default="keep")),
        (["--drop-mtp"], dict(action="store_true", help="leave out V3's multi-token-prediction layer")))
    add("to-official", "this package's format -> DeepSeek's config schema")
    add("dequantize", "FP8 -> BF16 on the CPU")
    add("quantize", "BF16 -> block-wise FP8", (["--scale-fmt"], dict(choices=["float", "ue8m0"], default="float")))
    add("to-mp", "-> DeepSeek-V3's inference format (model{i}-mp{N}.safetensors)",
        (["--model-parallel"], dict(type=int, required=True)))
    add("from-mp", "DeepSeek-V3's inference format -> official folder",
        (["--config"], dict(required=True, help="the official config.json of the model")))
    add("merge-lora", "merge a PEFT LoRA adapter into the base weights", positionals=("base", "adapter", "dst"))
    add("verify", "compare two checkpoints tensor by tensor", positionals=("a", "b"), writes=False)
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.command == "verify":
            print(json.dumps(verify(args.a, args.b, quiet=args.quiet)))
            return 0
        options = dict(overwrite=args.overwrite, resume=args.resume, quiet=args.quiet)
        run = {"from-official": lambda: from_official(args.src, args.dst, args.dtype, args.drop_mtp, **options),
               "to-official": lambda: to_official(args.src, args.dst, **options),
               "dequantize": lambda: dequantize(args.src, args.dst, **options),
               "quantize": lambda: quantize(args.src, args.dst, args.scale_fmt, **options),
               "to-mp": lambda: to_mp(args.src, args.dst, args.model_parallel, **options),
               "from-mp": lambda: from_mp(args.src, args.dst, args.config, **options),
               "merge-lora": lambda: merge_lora(args.base, args.adapter, args.dst, **options)}[args.command]
        summary = run()
    except CheckpointError as error:
        print(f"deepseek-moe-convert {args.command}: {error}", file=sys.stderr)
        return 2
    print(f"{args.command}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
