"""Checkpoints in DeepSeek's official on-disk layout.

On disk (what DeepSeek releases and what serving engines read): one tensor per routed expert
(``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``), V3's multi-token-prediction module as layer
``num_hidden_layers`` (with its own copies of the embedding and output head), sharded safetensors with
``model.safetensors.index.json``. In memory: experts stacked per chunk (``...mlp.experts.chunks.C.gate_up_proj``
``[experts, 2 * moe_intermediate, hidden]`` = gate rows then up rows), the MTP module under ``model.mtp.D``.

Loading streams file by file into tensors allocated on their final device; every parameter must come
from the checkpoint, and every checkpoint tensor must find a parameter: anything else is an error naming
the key and file. Saving writes the same layout (load -> save is bit-exact), to a temporary folder first.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from transformers import GenerationConfig
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import logging

logger = logging.get_logger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8,
                      "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# DeepSeek's own model_type for each of this package's families: config.json in either schema loads.
OFFICIAL_MODEL_TYPES = {"deepseek_moe_v1": "deepseek", "deepseek_moe_v2": "deepseek_v2", "deepseek_moe_v3": "deepseek_v3"}

_EXPERT_KEY = re.compile(
    r"^(?P<prefix>model\.(?:layers|mtp)\.\d+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.(?P<kind>weight|weight_scale_inv)$"
)
_CHUNK_PARAM = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.chunks\.(?P<chunk>\d+)\.(?P<param>gate_up_proj|down_proj)(?P<scale>_scale_inv)?$"
)
_LAYER_KEY = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<rest>.+)$")
_MTP_PARAM = re.compile(r"^model\.mtp\.(?P<depth>\d+)\.(?P<rest>.+)$")
# Tensors of the official MTP layer that are copies of the main model's embedding and output head.
MTP_SHARED_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the file and the tensor key."""


# ---------------------------------------------------------------------- key mapping
@dataclass(frozen=True)
class Slot:
    """Where an official tensor lives in memory: ``param[index][rows]`` (index/rows None = whole)."""

    param: str
    index: int | None = None
    rows: slice | None = None


class OfficialLayout:
    """The bijection between this package's parameter names and DeepSeek's tensor keys for one config."""

    def __init__(self, config) -> None:
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.mtp_depth = config.num_nextn_predict_layers
        if config.n_routed_experts:
            self.experts_per_chunk = config.n_routed_experts // config.num_expert_chunks
        self.intermediate = config.moe_intermediate_size
        quantization = getattr(config, "quantization_config", None) or {}
        block_rows = quantization.get("weight_block_size", [128])[0]
        # Where a stacked gate_up tensor's up part starts: row I of the weight, row ceil(I/128) of its scales.
        self.gate_up_split = {False: self.intermediate, True: -(-self.intermediate // block_rows) if self.intermediate else None}

    def slot(self, key: str) -> Slot | None:
        """The in-memory slot of official ``key``; None for tensors this model does not hold (the MTP
        layers beyond ``num_nextn_predict_layers`` and the MTP's copies of embedding and head)."""
        layer = _LAYER_KEY.match(key)
        if layer and int(layer["layer"]) >= self.num_layers:
            depth = int(layer["layer"]) - self.num_layers
            if depth >= self.mtp_depth or layer["rest"] in MTP_SHARED_COPIES:
                return None
            key = f"model.mtp.{depth}.{layer['rest']}"
        expert = _EXPERT_KEY.match(key)
        if expert is None:
            return Slot(key)
        chunk, index = divmod(int(expert["expert"]), self.experts_per_chunk)
        proj, scale = expert["proj"], expert["kind"] == "weight_scale_inv"
        param = f"{expert['prefix']}.chunks.{chunk}.{'down_proj' if proj == 'down' else 'gate_up_proj'}" + ("_scale_inv" if scale else "")
        split = self.gate_up_split[scale]
        rows = {"gate": slice(0, split), "up": slice(split, None), "down": None}[proj]
        return Slot(param, index, rows)

    def official_items(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Official ``(key, tensor view)`` pairs of one in-memory tensor, in DeepSeek's order."""
        mtp = _MTP_PARAM.match(name)
        if mtp:
            name = f"model.layers.{self.num_layers + int(mtp['depth'])}.{mtp['rest']}"
        chunk = _CHUNK_PARAM.match(name)
        if chunk is None:
            yield name, tensor
            return
        first = int(chunk["chunk"]) * self.experts_per_chunk
        kind = "weight_scale_inv" if chunk["scale"] else "weight"
        split = self.gate_up_split[bool(chunk["scale"])]
        for index in range(tensor.shape[0]):
            prefix = f"{chunk['prefix']}.{first + index}"
            if chunk["param"] == "down_proj":
                yield f"{prefix}.down_proj.{kind}", tensor[index]
            else:
                yield f"{prefix}.gate_proj.{kind}", tensor[index, :split]
                yield f"{prefix}.up_proj.{kind}", tensor[index, split:]

    def official_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whole official state (views, no copies) of an in-memory state dict with ``model.`` names."""
        official = {}
        for name, tensor in state.items():
            official.update(self.official_items(name, tensor))
        for depth in range(self.mtp_depth):
            for copy, source in MTP_SHARED_COPIES.items():
                if source in state:
                    official[f"model.layers.{self.num_layers + depth}.{copy}"] = state[source]
        return official


def official_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official checkpoint of ``config`` (a config.json dict in DeepSeek's schema or
    ours), in DeepSeek's order; FP8 scales excluded."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    layers = config["num_hidden_layers"]
    mtp_layers = config.get("num_nextn_predict_layers", 0)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers + mtp_layers):
        prefix = f"model.layers.{layer}."
        if layer >= layers:  # V3 multi-token prediction module
            shapes.update({
                prefix + "embed_tokens.weight": (vocab, hidden),
                prefix + "enorm.weight": (hidden,),
                prefix + "hnorm.weight": (hidden,),
                prefix + "eh_proj.weight": (hidden, 2 * hidden),
                prefix + "shared_head.norm.weight": (hidden,),
                prefix + "shared_head.head.weight": (vocab, hidden),
            })
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
        shapes.update(_attention_shapes(config, prefix + "self_attn.", hidden, heads))
        shapes.update(_mlp_shapes(config, prefix + "mlp.", layer, hidden))
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _attention_shapes(config, prefix, hidden, heads):
    if OFFICIAL_MODEL_TYPES.get(config["model_type"], config["model_type"]) == "deepseek":
        head_dim = hidden // heads
        kv = config.get("num_key_value_heads") or heads
        return {
            prefix + "q_proj.weight": (heads * head_dim, hidden),
            prefix + "k_proj.weight": (kv * head_dim, hidden),
            prefix + "v_proj.weight": (kv * head_dim, hidden),
            prefix + "o_proj.weight": (hidden, heads * head_dim),
        }
    qk_head = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    kv_rank = config["kv_lora_rank"]
    shapes = {}
    if config.get("q_lora_rank"):
        q_rank = config["q_lora_rank"]
        shapes[prefix + "q_a_proj.weight"] = (q_rank, hidden)
        shapes[prefix + "q_a_layernorm.weight"] = (q_rank,)
        shapes[prefix + "q_b_proj.weight"] = (heads * qk_head, q_rank)
    else:
        shapes[prefix + "q_proj.weight"] = (heads * qk_head, hidden)
    shapes[prefix + "kv_a_proj_with_mqa.weight"] = (kv_rank + config["qk_rope_head_dim"], hidden)
    shapes[prefix + "kv_a_layernorm.weight"] = (kv_rank,)
    shapes[prefix + "kv_b_proj.weight"] = (heads * (config["qk_nope_head_dim"] + config["v_head_dim"]), kv_rank)
    shapes[prefix + "o_proj.weight"] = (hidden, heads * config["v_head_dim"])
    return shapes


def _mlp_shapes(config, prefix, layer, hidden):
    experts = config.get("n_routed_experts")
    is_moe = experts and layer >= config["first_k_dense_replace"] and layer % config.get("moe_layer_freq", 1) == 0
    if not is_moe:
        width = config["intermediate_size"]
        return {
            prefix + "gate_proj.weight": (width, hidden),
            prefix + "up_proj.weight": (width, hidden),
            prefix + "down_proj.weight": (hidden, width),
        }
    width = config["moe_intermediate_size"]
    shapes = {prefix + "gate.weight": (experts, hidden)}
    if config.get("topk_method") == "noaux_tc":
        shapes[prefix + "gate.e_score_correction_bias"] = (experts,)
    for expert in range(experts):
        shapes[f"{prefix}experts.{expert}.gate_proj.weight"] = (width, hidden)
        shapes[f"{prefix}experts.{expert}.up_proj.weight"] = (width, hidden)
        shapes[f"{prefix}experts.{expert}.down_proj.weight"] = (hidden, width)
    if config.get("n_shared_experts"):
        shared = width * config["n_shared_experts"]
        shapes[prefix + "shared_experts.gate_proj.weight"] = (shared, hidden)
        shapes[prefix + "shared_experts.up_proj.weight"] = (shared, hidden)
        shapes[prefix + "shared_experts.down_proj.weight"] = (hidden, shared)
    return shapes


# ---------------------------------------------------------------------- reading
def checkpoint_files(directory: str) -> dict[str, list[str]]:
    """``{file: [keys]}`` of a checkpoint folder, from its index (checked against the files) or its single
    ``model.safetensors``. Raises :class:`CheckpointError` naming the file or key that is wrong."""
    index_path = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as handle:
                weight_map = json.load(handle)["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{index_path}: not a safetensors index ({error})") from error
        files: dict[str, list[str]] = defaultdict(list)
        for key, file in weight_map.items():
            files[file].append(key)
    elif os.path.isfile(os.path.join(directory, SAFE_WEIGHTS_NAME)):
        files = {SAFE_WEIGHTS_NAME: None}
    else:
        raise CheckpointError(f"{directory}: no {SAFE_WEIGHTS_INDEX_NAME} and no {SAFE_WEIGHTS_NAME}")
    listed = {}
    for file, keys in files.items():
        path = os.path.join(directory, file)
        if not os.path.isfile(path):
            raise CheckpointError(f"{index_path}: names {file}, which does not exist (key {keys[0]!r})")
        present = set(safetensors_header(path))  # also rejects a truncated file, naming it
        if keys is None:
            keys = sorted(present)
        missing = [key for key in keys if key not in present]
        if missing:
            raise CheckpointError(f"{path}: the index places {missing[0]!r} here, but the file does not hold it")
        listed[file] = keys
    return listed


class open_safetensors:
    """``safe_open`` whose errors name the file (a truncated or corrupt shard raises CheckpointError)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self):
        try:
            self.handle = safe_open(self.path, framework="pt", device="cpu")
            return self.handle.__enter__()
        except (SafetensorError, OSError, RuntimeError) as error:
            raise CheckpointError(f"{self.path}: cannot read safetensors file ({error})") from error

    def __exit__(self, *exc) -> None:
        self.handle.__exit__(*exc)


def read_tensor(handle, key: str, path: str) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{path}: cannot read tensor {key!r} ({error})") from error


def resolve_directory(name_or_path: str | os.PathLike, **hub_kwargs) -> str:
    """A local folder as it is; otherwise a snapshot of the Hub repository (weights, configs, code)."""
    if os.path.isdir(name_or_path):
        return str(name_or_path)
    from huggingface_hub import snapshot_download

    return snapshot_download(
        str(name_or_path),
        allow_patterns=["*.json", "*.safetensors", "*.py", "*.model", "*.txt", "*.tiktoken"],
        **{k: v for k, v in hub_kwargs.items() if v is not None},
    )


def load_config(cls, directory: str, overrides: dict):
    """Read config.json in DeepSeek's schema or this package's; refuse another family's."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no config.json")
    with open(path) as handle:
        model_type = json.load(handle).get("model_type")
    ours = cls.config_class.model_type
    if model_type not in (ours, OFFICIAL_MODEL_TYPES.get(ours)):
        raise CheckpointError(
            f"{path}: model_type {model_type!r} cannot be loaded by {cls.__name__} "
            f"(expects {ours!r} or DeepSeek's {OFFICIAL_MODEL_TYPES.get(ours)!r})"
        )
    config_dict, unused = cls.config_class.get_config_dict(directory)
    config_dict["model_type"] = ours  # DeepSeek's schema is ours: no model_type warning
    config, unused = cls.config_class.from_dict(config_dict, return_unused_kwargs=True, **overrides)
    config.validate_architecture()  # from_dict sets the overrides after the constructor's validation
    return config, unused


def resolve_dtype(dtype, config) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = config.dtype or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype


def resolve_device_map(model, device_map, max_memory, dtype) -> dict[str, str | int | torch.device]:
    """``{module_prefix: device}`` for a model built on the meta device."""
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, (str, int, torch.device)) and device_map not in (
        "auto", "balanced", "balanced_low_0", "sequential"
    ):
        return {"": device_map}
    if isinstance(device_map, dict):
        return device_map
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = model._no_split_modules
    if device_map != "sequential":
        max_memory = get_balanced_memory(
            model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
            low_zero=device_map == "balanced_low_0",
        )
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)


def device_for(name: str, device_map: dict) -> torch.device:
    """The device of the longest ``device_map`` prefix of ``name``."""
    best = None
    for prefix in device_map:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    if best is None:
        raise CheckpointError(f"device_map places no module that holds {name!r}")
    device = device_map[best]
    if device == "disk":
        raise CheckpointError(f"device_map puts {best!r} on 'disk': offloading to disk is not supported")
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def load_official_checkpoint(cls, name_or_path, *model_args, **kwargs):
    """Build ``cls`` on the meta device and fill it from an official-layout checkpoint (see module doc)."""
    if model_args:
        raise TypeError(f"{cls.__name__}.from_pretrained takes no positional model arguments, got {model_args}")
    config = kwargs.pop("config", None)
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None) or "auto"
    device_map = kwargs.pop("device_map", None)
    max_memory = kwargs.pop("max_memory", None)
    attn_implementation = kwargs.pop("attn_implementation", None)
    hub_kwargs = {key: kwargs.pop(key, None) for key in ("revision", "token", "cache_dir", "local_files_only")}
    for ignored in ("trust_remote_code", "_from_auto", "_from_pipeline", "low_cpu_mem_usage", "use_safetensors",
                    "output_loading_info", "code_revision", "adapter_kwargs", "subfolder"):
        kwargs.pop(ignored, None)
    directory = resolve_directory(name_or_path, **hub_kwargs)
    if isinstance(device_map, dict) and "num_expert_chunks" not in kwargs:
        # A map that places expert chunks (e.g. placement.expert_device_map) fixes how many there are.
        chunk_ids = [int(m[1]) for key in device_map if (m := re.search(r"\.experts\.chunks\.(\d+)$", key))]
        if chunk_ids:
            kwargs["num_expert_chunks"] = max(chunk_ids) + 1
    if config is None:
        config, unused = load_config(cls, directory, kwargs)
        if unused:
            raise TypeError(f"{cls.__name__}.from_pretrained got unknown arguments {sorted(unused)}")
    elif kwargs:
        raise TypeError(f"{cls.__name__}.from_pretrained got unknown arguments {sorted(kwargs)}")
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    dtype = resolve_dtype(dtype, config)
    config.dtype = dtype

    with torch.device("meta"):
        model = cls(config)
    device_map = resolve_device_map(model, device_map, max_memory, dtype)
    StateFiller(model, OfficialLayout(config), dtype, device_map).fill_from(directory)
    model.tie_weights()
    model.eval()
    model.name_or_path = str(name_or_path)
    if model.can_generate() and os.path.isfile(os.path.join(directory, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(directory)
    devices = {str(device_for(name, device_map)) for name, _ in model.named_parameters()}
    if len(devices) > 1:
        from accelerate import dispatch_model

        dispatch_model(model, device_map=device_map)
    return model


class StateFiller:
    """Allocates each parameter on its device in its dtype and copies checkpoint tensors into it."""

    def __init__(self, model, layout: OfficialLayout, dtype: torch.dtype, device_map: dict) -> None:
        self.model = model
        self.layout = layout
        self.dtype = dtype
        self.device_map = device_map
        # The checkpoint names parameters as the causal LM does; a bare base model drops `model.`.
        self.prefix = "" if hasattr(model, model.base_model_prefix) else model.base_model_prefix + "."
        self.targets = {}  # in-memory name (checkpoint naming) -> (module, attribute, is_parameter)
        for module_name, module in model.named_modules():
            full = f"{module_name}." if module_name else ""
            for attr, param in module.named_parameters(recurse=False):
                self.targets[self.prefix + full + attr] = (module, attr, True)
            for attr, buffer in module.named_buffers(recurse=False):
                if attr not in module._non_persistent_buffers_set and buffer is not None:
                    self.targets[self.prefix + full + attr] = (module, attr, False)
        self.filled: dict[str, set] = defaultdict(set)
        self.mtp_copies: dict[str, tuple[str, str]] = {}
        self.tied = set(model._tied_weights_keys or {}) if model.config.tie_word_embeddings else set()

    def fill_from(self, directory: str) -> None:
        files = checkpoint_files(directory)
        self.check_keys(files)
        for file, keys in files.items():
            path = os.path.join(directory, file)
            with open_safetensors(path) as handle:
                for key in keys:
                    slot = self.layout.slot(key)
                    if slot is not None and not self.skips(slot.param):  # only what this model holds is read
                        self.fill(key, slot, read_tensor(handle, key, path), path)
        self.check_complete()
        self.check_mtp_copies(directory)
        for module in self.model.modules():
            if hasattr(module, "reset_buffers"):
                module.reset_buffers(device_for(self.module_name(module), self.device_map))

    def module_name(self, target: torch.nn.Module) -> str:
        return next(name for name, module in self.model.named_modules() if module is target)

    def check_keys(self, files: dict[str, list[str]]) -> None:
        """Every checkpoint key must land in a parameter (checked before any tensor is read)."""
        for file, keys in files.items():
            for key in keys:
                slot = self.layout.slot(key)
                if slot is None:
                    layer = _LAYER_KEY.match(key)
                    rest = layer["rest"] if layer else ""
                    if rest in MTP_SHARED_COPIES and int(layer["layer"]) - self.layout.num_layers < self.layout.mtp_depth:
                        self.mtp_copies[key] = (file, MTP_SHARED_COPIES[rest])
                    continue
                if self.skips(slot.param):
                    continue
                if slot.param not in self.targets:
                    raise CheckpointError(f"{file}: unexpected tensor {key!r} (no parameter of {type(self.model).__name__} holds it)")

    def skips(self, param: str) -> bool:
        """Tensors this model does not hold: a bare base model's output head, and under expert
        parallelism the expert chunks of the other ranks."""
        if bool(self.prefix) and param == "lm_head.weight":
            return True
        return self.model.config.ep_size > 1 and param not in self.targets and _CHUNK_PARAM.match(param) is not None

    def fill(self, key: str, slot: Slot, tensor: torch.Tensor, path: str) -> None:
        module, attr, is_param = self.targets[slot.param]
        current = getattr(module, attr)
        expected = current.shape if slot.index is None else current[slot.index][slot.rows or slice(None)].shape
        if tuple(tensor.shape) != tuple(expected):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {list(tensor.shape)}, expected {list(expected)}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, expected a floating point one")
        if (tensor.dtype == torch.float8_e4m3fn) != (current.dtype == torch.float8_e4m3fn):
            expected = "float8_e4m3fn (config.json has an FP8 quantization_config)" if current.dtype == torch.float8_e4m3fn \
                else "a non-FP8 dtype (config.json has no FP8 quantization_config for it)"
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, expected {expected}")
        # FP8 weights, their float32 scales and V3's float32 router bias keep their own dtype.
        keeps_dtype = current.dtype == torch.float8_e4m3fn or attr.endswith("_scale_inv") or (
            current.dtype == torch.float32 and attr == "e_score_correction_bias")
        dtype = current.dtype if keeps_dtype else self.dtype
        device = device_for(slot.param.removeprefix(self.prefix), self.device_map)
        if slot.index is None:
            self.assign(module, attr, is_param, tensor.to(device=device, dtype=dtype, copy=True))
            self.filled[slot.param].add(None)
            return
        if current.is_meta:
            current = torch.empty(current.shape, dtype=dtype, device=device)
            self.assign(module, attr, is_param, current)
        rows = slot.rows or slice(None)
        with torch.no_grad():
            current.data[slot.index][rows].copy_(tensor)
        self.filled[slot.param].add((slot.index, rows.start))

    @staticmethod
    def assign(module, attr: str, is_param: bool, tensor: torch.Tensor) -> None:
        if is_param:
            requires_grad = getattr(module, attr).requires_grad
            module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=requires_grad)
        else:
            module._buffers[attr] = tensor

    def check_complete(self) -> None:
        """Every parameter (and each expert slice of the stacked ones) must have come from the checkpoint."""
        for name, (module, attr, _) in self.targets.items():
            if name in self.tied:
                continue
            chunk = _CHUNK_PARAM.match(name)
            if chunk is None:
                if None not in self.filled[name]:
                    raise CheckpointError(f"checkpoint has no tensor for parameter {name!r}: it would stay uninitialised")
                continue
            tensor = getattr(module, attr)
            split = self.layout.gate_up_split[bool(chunk["scale"])]
            parts = [(i, start) for i in range(tensor.shape[0]) for start in ((None,) if chunk["param"] == "down_proj" else (0, split))]
            for part in parts:
                if part not in self.filled[name]:
                    keys = [k for k, _ in self.layout.official_items(name, tensor)]
                    raise CheckpointError(f"checkpoint has no tensor {keys[parts.index(part)]!r}: it would stay uninitialised")

    def check_mtp_copies(self, directory: str) -> None:
        """The MTP layer's embedding and head are saved back from the main ones: they must be equal."""
        for key, (file, source) in self.mtp_copies.items():
            if source not in self.targets:
                continue
            module, attr, _ = self.targets[source]
            path = os.path.join(directory, file)
            with open_safetensors(path) as handle:
                copy = read_tensor(handle, key, path)
            main = getattr(module, attr).detach()
            if copy.shape != main.shape or not torch.equal(copy.to(main.device, main.dtype), main):
                raise CheckpointError(f"{path}: {key!r} differs from {source!r}; this package shares them")


# ---------------------------------------------------------------------- writing
def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or a string such as "5GB", "80GiB", "2TiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])(i?)B\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"size {size!r}: expected a number of bytes or e.g. '5GB', '80GiB'")
    power = "KMGT".index(match[2].upper()) + 1
    return int(float(match[1]) * (1024**power if match[3] else 1000**power))


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_weights(folder: str, tensors: dict[str, torch.Tensor], max_shard_size: int | str) -> list[str]:
    """Sharded safetensors (+ index when more than one file) into ``folder``; returns the file names."""
    shards = plan_shards(tensors, parse_size(max_shard_size))
    names = [SAFE_WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map, total = {}, 0
    for name, keys in zip(names, shards):
        shard = {key: tensors[key] for key in keys}
        write_safetensors(os.path.join(folder, name), shard)
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update(dict.fromkeys(keys, name))
    if len(names) > 1:
        with open(os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME), "w") as handle:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2, sort_keys=True)
        names.append(SAFE_WEIGHTS_INDEX_NAME)
    return names


# ---------------------------------------------------------------------- safetensors files, streamed
def read_header(path: str) -> tuple[dict[str, dict], int]:
    """``({key: {"dtype", "shape", "data_offsets"}}, byte offset of the data)`` of a safetensors file, read
    without its data; a file shorter than its header says (truncated) is a CheckpointError naming it."""
    try:
        with open(path, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not a safetensors file ({error})") from error
    header.pop("__metadata__", None)
    end = 8 + size + max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if os.path.getsize(path) < end:
        raise CheckpointError(f"{path}: truncated ({os.path.getsize(path)} bytes, its header needs {end})")
    return header, 8 + size


def safetensors_header(path: str) -> dict[str, dict]:
    """The header of a safetensors file (see :func:`read_header`)."""
    return read_header(path)[0]


def data_offsets(path: str) -> dict[str, int]:
    """The absolute byte offset of each tensor's data in a safetensors file."""
    header, start = read_header(path)
    return {name: start + entry["data_offsets"][0] for name, entry in header.items()}


def encode_header(header: dict[str, dict]) -> bytes:
    """A safetensors JSON header (with this package's ``__metadata__``), padded with spaces to 8 bytes."""
    encoded = json.dumps({**header, "__metadata__": {"format": "pt"}}, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % 8)


def create_safetensors(path: str, entries: dict[str, tuple[str, list[int]]]) -> dict[str, int]:
    """Create ``path`` as a safetensors file of ``{name: (dtype name, shape)}`` whose data is still to be
    written (see :func:`write_tensor`); returns each tensor's absolute byte offset."""
    header, offset, starts = {}, 0, {}
    for name, (dtype, shape) in entries.items():
        size = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        starts[name] = offset
        offset += size
    encoded = encode_header(header)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        handle.truncate(8 + len(encoded) + offset)
    return {name: 8 + len(encoded) + start for name, start in starts.items()}


def write_tensor(handle, offset: int, tensor: torch.Tensor) -> None:
    """Write ``tensor``'s bytes at ``offset`` of an open file (one contiguous CPU copy at most)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    handle.seek(offset)
    handle.write(data.numpy().data)


class SafetensorsReader:
    """Tensors of one safetensors file read with plain file reads, one at a time. Unlike a memory map,
    nothing stays resident after the caller drops a tensor (mapped pages of a shard count in the
    process's resident memory until it is closed)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.header, self.start = read_header(path)
        self.handle = open(path, "rb")

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()

    def keys(self) -> list[str]:
        return list(self.header)

    def get_tensor(self, key: str) -> torch.Tensor:
        if key not in self.header:
            raise CheckpointError(f"{self.path}: no tensor {key!r}")
        entry = self.header[key]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        self.handle.seek(self.start + begin)
        self.handle.readinto(buffer)
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


class SafetensorsWriter:
    """Write tensors one at a time into a safetensors file (through ``path.tmp``, renamed on success).
    The data goes right behind ``header_bytes`` reserved for the header (padding with spaces is valid
    safetensors); a header that outgrows the reservation is moved by one streamed copy."""

    def __init__(self, path: str, header_bytes: int) -> None:
        self.path, self.temporary, self.reserved = path, path + ".tmp", header_bytes + (-header_bytes % 8)
        self.handle = open(self.temporary, "wb")
        self.handle.seek(8 + self.reserved)
        self.header: dict[str, dict] = {}
        self.size = 0

    def __enter__(self) -> SafetensorsWriter:
        return self

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.header[key] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [self.size, self.size + nbytes]}
        write_tensor(self.handle, 8 + self.reserved + self.size, tensor)
        self.size += nbytes

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.handle.close()
            os.remove(self.temporary)
            return
        encoded = encode_header(self.header)
        if len(encoded) <= self.reserved:
            self.handle.seek(0)
            self.handle.write(struct.pack("<Q", self.reserved) + encoded.ljust(self.reserved))
            self.handle.close()
        else:
            self.handle.close()
            self._move_data(encoded)
        os.replace(self.temporary, self.path)

    def _move_data(self, encoded: bytes) -> None:
        moved = self.temporary + ".moved"
        with open(self.temporary, "rb") as source, open(moved, "wb") as target:
            target.write(struct.pack("<Q", len(encoded)) + encoded)
            source.seek(8 + self.reserved)
            shutil.copyfileobj(source, target, 64 * 2**20)
        os.replace(moved, self.temporary)


def header_bytes_for(keys: Iterable[str], tensors_per_key: int = 1) -> int:
    """A header reservation enough for ``keys`` (each possibly becoming ``tensors_per_key`` tensors with
    a suffix, e.g. a weight and its ``weight_scale_inv``)."""
    return 64 + tensors_per_key * sum(len(key) + 128 for key in keys)


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Save ``tensors`` (views allowed) to ``path`` one tensor at a time, through ``path.tmp`` and a rename:
    no serialized copy of the whole file is ever held in memory."""
    with SafetensorsWriter(path, header_bytes_for(tensors)) as writer:
        for key, tensor in tensors.items():
            writer.add(key, tensor)


def remote_code_files() -> list[str]:
    """This package's modeling file and every file it imports relatively (what trust_remote_code needs)."""
    modeling = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modeling.py")
    return [modeling, *get_relative_import_files(modeling)]


def auto_map(config_class: type) -> dict[str, str]:
    """The ``auto_map`` of a folder saved with this package's code, for ``trust_remote_code``."""
    family = config_class.__name__.removeprefix("DeepseekMoE").removesuffix("Config")  # "V1", "V2", "V3"
    return {
        "AutoConfig": f"configuration.{config_class.__name__}",
        "AutoModel": f"modeling.DeepseekMoE{family}Model",
        "AutoModelForCausalLM": f"modeling.DeepseekMoE{family}ForCausalLM",
        "AutoModelForSequenceClassification": f"modeling.DeepseekMoE{family}ForSequenceClassification",
    }


def save_official_checkpoint(model, save_directory: str | os.PathLike, state_dict=None, max_shard_size="5GB") -> None:
    """Write ``model`` in the official layout with config, generation config and remote code."""
    save_directory = str(save_directory)
    if model.config.ep_size > 1:
        raise ValueError(f"this expert-parallel model (ep_size={model.config.ep_size}) holds 1/{model.config.ep_size} "
                         "of the routed experts; save the checkpoint from a model loaded with ep_size=1")
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} is a file, not a folder")
    os.makedirs(save_directory, exist_ok=True)
    if state_dict is None:
        state_dict = model.state_dict()
    prefix = "" if hasattr(model, model.base_model_prefix) else model.base_model_prefix + "."
    state_dict = {prefix + name: tensor for name, tensor in state_dict.items()}
    if model.config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    tensors = OfficialLayout(model.config).official_state(state_dict)

    staging = tempfile.mkdtemp(prefix=".saving-", dir=save_directory)
    try:
        written = write_weights(staging, tensors, max_shard_size)
        config = model.config
        config.architectures = [type(model).__name__]
        config.auto_map = auto_map(type(config))
        config.dtype = model.dtype
        config.save_pretrained(staging)
        written.append("config.json")
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
            written.append("generation_config.json")
        for source in remote_code_files():
            shutil.copy(source, staging)
            written.append(os.path.basename(source))
        for stale in os.listdir(save_directory):  # weights of an earlier save that this one does not replace
            if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", stale) and stale not in written:
                os.remove(os.path.join(save_directory, stale))
        for name in written:
            os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
