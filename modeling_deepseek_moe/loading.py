"""``from_pretrained`` for DeepSeek's official layout: transformers' loading contract over a streamed,
strict loader.

The model is built on the meta device and filled file by file, each tensor allocated on its final device in
its final dtype. Every backbone tensor must come from the checkpoint and every checkpoint tensor under the
backbone must find a parameter: anything else is a :class:`CheckpointError` naming the key and the file.
Task heads are the exception, as in transformers: a head the checkpoint lacks is initialised by the model's
``_init_weights`` and a head the model lacks is ignored, both listed in transformers' load report and in
``output_loading_info``; ``ignore_mismatched_sizes=True`` re-initialises tensors whose shape differs. A bitsandbytes
``quantization_config`` (4-bit) quantizes the weights as they are read (:mod:`.bnb4bit`).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import GenerationConfig

from .bnb4bit import Bnb4bitFiller, is_bitsandbytes_config, quantizer_for
from .compat import checked_device_map, log_loading_report, new_loading_info
from .layout import CHUNK_PARAM, LAYER_KEY, MTP_SHARED_COPIES, OFFICIAL_MODEL_TYPES, OfficialLayout, Slot
from .safetensors_io import CheckpointError, checkpoint_files, open_safetensors, read_tensor

# Hub download arguments of from_pretrained, passed on to huggingface_hub.
HUB_ARGUMENTS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
# from_pretrained arguments of transformers that change nothing in this loader.
IGNORED_ARGUMENTS = ("trust_remote_code", "_from_auto", "_from_pipeline", "low_cpu_mem_usage", "use_safetensors",
                     "code_revision", "weights_only", "tqdm_class", "_fast_init", "adapter_kwargs")


def load_pretrained(cls, name_or_path: str | os.PathLike | None, *model_args, **kwargs):
    """Build ``cls`` on the meta device and fill it from an official-layout checkpoint folder (or Hub
    repository), or from ``state_dict`` (this package's parameter names or DeepSeek's) with
    ``name_or_path=None`` and a ``config``. Returns the model in eval mode, with
    ``output_loading_info=True`` also transformers' ``{"missing_keys", "unexpected_keys",
    "mismatched_keys", "error_msgs"}``. ``quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...)``
    loads a float checkpoint into bitsandbytes 4-bit weights, routed experts included."""
    if model_args:
        raise TypeError(f"{cls.__name__}.from_pretrained takes no positional model arguments, got {model_args}")
    config = kwargs.pop("config", None)
    state_dict = kwargs.pop("state_dict", None)
    output_loading_info = kwargs.pop("output_loading_info", False)
    ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
    dtype = kwargs.pop("dtype", None)
    torch_dtype = kwargs.pop("torch_dtype", None)
    dtype = dtype if dtype is not None else torch_dtype
    device_map = checked_device_map(kwargs.pop("device_map", None))
    max_memory = kwargs.pop("max_memory", None)
    attn_implementation = kwargs.pop("attn_implementation", None)
    generation_config = kwargs.pop("generation_config", None)
    subfolder = kwargs.pop("subfolder", None) or ""
    if is_bitsandbytes_config(kwargs.get("quantization_config")):  # any other is a config override (FP8)
        quantizer = quantizer_for(kwargs.pop("quantization_config"))
        quantizer.validate_environment(device_map=device_map)  # no device_map: the CPU, as without quantization
    else:
        quantizer = None
    hub_kwargs = {key: kwargs.pop(key) for key in HUB_ARGUMENTS if key in kwargs}
    for ignored in IGNORED_ARGUMENTS:
        kwargs.pop(ignored, None)

    directory = None
    if name_or_path is not None:
        directory = resolve_directory(name_or_path, subfolder, **hub_kwargs)
    elif config is None or state_dict is None:
        raise ValueError(f"{cls.__name__}.from_pretrained(None, ...) needs both `config` and `state_dict`")
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
    else:
        config = copy.deepcopy(config)  # the caller's config is not changed (dtype, attention)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    dtype = resolve_dtype(dtype, config, state_dict)
    config.dtype = dtype
    if quantizer is not None:
        if config.quantization_config:
            raise CheckpointError(f"{directory or 'state_dict'}: the checkpoint is already quantized "
                                  f"({config.quantization_config.get('quant_method')!r}); bitsandbytes quantizes float "
                                  f"weights: dequantize it first (deepseek-moe-convert dequantize)")
        config.quantization_config = quantizer.quantization_config.to_dict()
        config.validate_architecture()  # 4-bit only

    with torch.device("meta"):
        model = cls(config)
    if quantizer is not None:  # attention and dense projections -> Linear4bit, by transformers
        quantizer.preprocess_model(model, device_map=device_map)
    device_map = resolve_device_map(model, device_map, max_memory, dtype)
    layout = OfficialLayout(config)
    source = CheckpointFolder(directory) if state_dict is None else StateDictCheckpoint(state_dict, layout)
    filler = StateFiller(model, layout, dtype, device_map, ignore_mismatched_sizes,
                         quantized=Bnb4bitFiller() if quantizer is not None else None)
    filler.fill_from(source)
    if quantizer is not None:
        quantizer.postprocess_model(model)
        model.hf_quantizer = quantizer
    model.eval()
    model.name_or_path = str(name_or_path) if name_or_path is not None else ""
    if generation_config is not None:
        model.generation_config = generation_config
    elif model.can_generate() and directory and os.path.isfile(os.path.join(directory, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(directory)
    log_loading_report(model, name_or_path, ignore_mismatched_sizes, filler.info)
    devices = {str(device_for(name, device_map)) for name, _ in model.named_parameters()}
    if len(devices) > 1:
        accelerate().dispatch_model(model, device_map=device_map)
    return (model, filler.info.to_dict()) if output_loading_info else model


def resolve_directory(name_or_path: str | os.PathLike, subfolder: str = "", **hub_kwargs) -> str:
    """A local folder as it is; otherwise a snapshot of the Hub repository (weights, configs, code). A name
    that is neither a folder nor a valid repository id is an ``OSError`` saying so."""
    name = str(name_or_path)
    if os.path.isdir(os.path.join(name, subfolder)):
        return os.path.join(name, subfolder)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise OSError(f"{name!r} is not a folder, and not a Hub repository id ('owner/name')") from None
    folder = snapshot_download(
        name,
        allow_patterns=[os.path.join(subfolder, pattern) for pattern in
                        ("*.json", "*.safetensors", "*.py", "*.model", "*.txt", "*.tiktoken")],
        **{k: v for k, v in hub_kwargs.items() if v is not None},
    )
    return os.path.join(folder, subfolder)


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


def resolve_dtype(dtype, config, state_dict: dict | None = None) -> torch.dtype:
    """The model dtype: as asked, or with ``"auto"`` (the default) the checkpoint's: config.json's
    ``torch_dtype``, else the first floating-point tensor of ``state_dict``, else float32."""
    if dtype is None or dtype == "auto":
        floating = (t.dtype for t in (state_dict or {}).values() if t.is_floating_point() and t.dtype.itemsize > 1)
        dtype = config.dtype or next(floating, None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype


def accelerate():
    """The ``accelerate`` package, for device maps, imported on use (transformers refuses remote code that
    imports a missing package outside a ``try``, and a model loaded on one device does not need it)."""
    try:
        import accelerate
        import accelerate.utils
    except ImportError as error:
        raise ImportError("a device_map needs accelerate: pip install accelerate") from error
    return accelerate


def resolve_device_map(model, device_map, max_memory, dtype) -> dict[str, str | int | torch.device]:
    """``{module_prefix: device}`` for a model built on the meta device; a device this machine does not
    have is a ValueError naming it."""
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, str):  # "auto", "balanced", "balanced_low_0", "sequential"
        utils = accelerate().utils
        no_split = model._no_split_modules
        if device_map != "sequential":
            max_memory = utils.get_balanced_memory(
                model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                low_zero=device_map == "balanced_low_0",
            )
        device_map = utils.infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    for prefix, device in device_map.items():
        check_device_exists(device, f"device_map places {prefix or 'the model'!r} on {device!r}")
    return device_map


def check_device_exists(device: str | int | torch.device, what: str) -> None:
    """Raise ValueError (``what``, then why) when ``device`` is a CUDA device this machine does not have."""
    if device in ("cpu", "disk", "meta"):
        return
    device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"{what}, but this machine has no CUDA device (torch {torch.__version__}, "
                         f"torch.cuda.is_available() is False)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{what}, but this machine has {torch.cuda.device_count()} CUDA device(s)")


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


# ---------------------------------------------------------------------- where tensors come from
class CheckpointFolder:
    """The safetensors files of a checkpoint folder (index checked against the files)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.files = checkpoint_files(directory)  # {file: [keys]}

    def where(self, file: str) -> str:
        return os.path.join(self.directory, file)

    @contextmanager
    def open(self, file: str) -> Iterator[Callable[[str], torch.Tensor]]:
        """A reader ``key -> tensor`` of one file, open for the ``with`` block."""
        path = self.where(file)
        with open_safetensors(path) as handle:
            yield lambda key: read_tensor(handle, key, path)


class StateDictCheckpoint:
    """An in-memory state dict, in this package's parameter names (``model.state_dict()``, of a causal LM or
    of a bare base model) or DeepSeek's, seen as one file named ``state_dict``."""

    def __init__(self, state_dict: dict[str, torch.Tensor], layout: OfficialLayout) -> None:
        if state_dict and not any(key.startswith("model.") for key in state_dict):  # a bare base model's names
            state_dict = {f"model.{key}": tensor for key, tensor in state_dict.items()}
        self.tensors = layout.official_state(state_dict)
        self.files = {"state_dict": list(self.tensors)}

    def where(self, file: str) -> str:
        return file

    @contextmanager
    def open(self, file: str) -> Iterator[Callable[[str], torch.Tensor]]:
        yield self.tensors.__getitem__


# ---------------------------------------------------------------------- filling the model
def kept_dtype(attr: str, current: torch.Tensor) -> bool:
    """Tensors that keep their own dtype whatever the model dtype: FP8 weights, their float32 scales,
    V3's float32 router bias and integer ones (bitsandbytes' 4-bit codes)."""
    return current.dtype == torch.float8_e4m3fn or attr.endswith("_scale_inv") or not current.is_floating_point() or (
        current.dtype == torch.float32 and attr == "e_score_correction_bias")


class StateFiller:
    """Allocates each parameter on its device in its dtype, copies checkpoint tensors into it, then lets the
    model's ``_init_weights`` initialise what no checkpoint holds (task heads, non-persistent buffers).
    ``quantized`` (a :class:`.bnb4bit.Bnb4bitFiller`) quantizes the tensors it claims as they are read."""

    def __init__(self, model, layout: OfficialLayout, dtype: torch.dtype, device_map: dict,
                 ignore_mismatched_sizes: bool = False, quantized: Bnb4bitFiller | None = None) -> None:
        self.model = model
        self.quantized = quantized
        self.layout = layout
        self.dtype = dtype
        self.device_map = device_map
        self.ignore_mismatched_sizes = ignore_mismatched_sizes
        # The checkpoint names parameters as the causal LM does; a bare base model drops `model.`.
        self.prefix = "" if hasattr(model, model.base_model_prefix) else model.base_model_prefix + "."
        self.targets = {}  # in-memory name (checkpoint naming) -> (module, attribute, is_parameter)
        self.transient = {}  # the same for non-persistent buffers, which no checkpoint holds
        for module_name, module in model.named_modules():
            full = f"{module_name}." if module_name else ""
            for attr, param in module.named_parameters(recurse=False):
                self.targets[self.prefix + full + attr] = (module, attr, True)
            for attr, buffer in module.named_buffers(recurse=False):
                if buffer is None:
                    continue
                kind = self.transient if attr in module._non_persistent_buffers_set else self.targets
                kind[self.prefix + full + attr] = (module, attr, False)
        self.filled: dict[str, set] = defaultdict(set)
        self.mismatched: set[str] = set()
        self.unused: set[str] = set()  # checkpoint keys of heads this model does not have
        self.mtp_copies: dict[str, tuple[str, str]] = {}
        self.tied = set(model._tied_weights_keys or {}) if model.config.tie_word_embeddings else set()
        self.info = new_loading_info()

    def fill_from(self, source: CheckpointFolder | StateDictCheckpoint) -> None:
        self.check_keys(source)
        for file, keys in source.files.items():
            with source.open(file) as read:
                for key in keys:
                    slot = self.layout.slot(key)
                    if slot is not None and key not in self.unused and not self.skips(slot.param):
                        self.fill(key, slot, read(key), source.where(file))  # only what this model holds is read
        self.check_complete()
        self.check_mtp_copies(source)
        self.initialise_the_rest()

    def is_head(self, name: str) -> bool:
        """A task head (``lm_head``, ``score``): anything outside the base model."""
        return not name.startswith(self.model.base_model_prefix + ".")

    def check_keys(self, source: CheckpointFolder | StateDictCheckpoint) -> None:
        """Every checkpoint key must land in a parameter, or be a head this model does not have (checked
        before any tensor is read)."""
        for file, keys in source.files.items():
            for key in keys:
                slot = self.layout.slot(key)
                if slot is None:
                    layer = LAYER_KEY.match(key)
                    rest = layer["rest"] if layer else ""
                    if rest in MTP_SHARED_COPIES and int(layer["layer"]) - self.layout.num_layers < self.layout.mtp_depth:
                        self.mtp_copies[key] = (file, MTP_SHARED_COPIES[rest])
                    continue
                if self.skips(slot.param) or slot.param in self.targets:
                    continue
                if not self.is_head(slot.param):
                    raise CheckpointError(f"{source.where(file)}: unexpected tensor {key!r} (no parameter of "
                                          f"{type(self.model).__name__} holds it)")
                self.unused.add(key)
                self.info.unexpected_keys.add(key)

    def skips(self, param: str) -> bool:
        """Tensors this model does not hold: a bare base model's output head, and under expert
        parallelism the expert chunks of the other ranks."""
        if bool(self.prefix) and param == "lm_head.weight":
            return True
        return self.model.config.ep_size > 1 and param not in self.targets and CHUNK_PARAM.match(param) is not None

    def fill(self, key: str, slot: Slot, tensor: torch.Tensor, path: str) -> None:
        module, attr, is_param = self.targets[slot.param]
        current = getattr(module, attr)
        quantized = self.quantized is not None and self.quantized.claims(module, attr)
        if quantized:
            expected = self.quantized.expected_shape(module, attr)
        else:
            expected = current.shape if slot.index is None else current[slot.index][slot.rows or slice(None)].shape
        if tuple(tensor.shape) != tuple(expected):
            if not self.ignore_mismatched_sizes:
                raise CheckpointError(f"{path}: tensor {key!r} has shape {list(tensor.shape)}, expected "
                                      f"{list(expected)} (size mismatch; ignore_mismatched_sizes=True re-initialises it)")
            self.mismatched.add(slot.param)
            self.info.mismatched_keys.add((slot.param.removeprefix(self.prefix), tuple(tensor.shape), tuple(expected)))
            return
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, expected a floating point one")
        if (tensor.dtype == torch.float8_e4m3fn) != (current.dtype == torch.float8_e4m3fn):
            expected = "float8_e4m3fn (config.json has an FP8 quantization_config)" if current.dtype == torch.float8_e4m3fn \
                else "a non-FP8 dtype (config.json has no FP8 quantization_config for it)"
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, expected {expected}")
        dtype = current.dtype if kept_dtype(attr, current) else self.dtype
        device = device_for(slot.param.removeprefix(self.prefix), self.device_map)
        rows = slot.rows or slice(None)
        if quantized:
            part = None if slot.index is None else (slot.index, (rows.start or 0) // expected[0])
            self.quantized.fill(module, attr, part, tensor.to(device=device, dtype=self.dtype))
            self.filled[slot.param].add(None if slot.index is None else (slot.index, rows.start))
            return
        if slot.index is None:
            self.assign(module, attr, is_param, tensor.to(device=device, dtype=dtype, copy=True))
            self.filled[slot.param].add(None)
            return
        if current.is_meta:
            current = torch.empty(current.shape, dtype=dtype, device=device)
            self.assign(module, attr, is_param, current)
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
        """Every backbone parameter (and each expert slice of the stacked ones) must have come from the
        checkpoint; a missing head is listed for initialisation."""
        for name, (module, attr, _) in self.targets.items():
            if name in self.tied or name in self.mismatched:
                continue
            chunk = CHUNK_PARAM.match(name)
            if chunk is None:
                if None in self.filled[name]:
                    continue
                if self.is_head(name):
                    self.info.missing_keys.add(name)
                    continue
                raise CheckpointError(f"checkpoint has no tensor for parameter {name!r}: it would stay uninitialised")
            tensor = getattr(module, attr)
            split = self.layout.gate_up_split[bool(chunk["scale"])]
            parts = [(i, start) for i in range(tensor.shape[0]) for start in ((None,) if chunk["param"] == "down_proj" else (0, split))]
            for part in parts:
                if part not in self.filled[name]:
                    keys = [k for k, _ in self.layout.official_items(name, tensor)]
                    raise CheckpointError(f"checkpoint has no tensor {keys[parts.index(part)]!r}: it would stay uninitialised")

    def check_mtp_copies(self, source: CheckpointFolder | StateDictCheckpoint) -> None:
        """The MTP layer's embedding and head are saved back from the main ones: they must be equal."""
        for key, (file, main_name) in self.mtp_copies.items():
            if main_name not in self.targets or main_name in self.mismatched:
                continue
            module, attr, _ = self.targets[main_name]
            with source.open(file) as read:
                copy = read(key)
            main = getattr(module, attr).detach()
            if copy.shape != main.shape or not torch.equal(copy.to(main.device, main.dtype), main):
                raise CheckpointError(f"{source.where(file)}: {key!r} differs from {main_name!r}; this package shares them")

    def initialise_the_rest(self) -> None:
        """Tie the embeddings, allocate what the checkpoint did not fill (missing heads, re-initialised
        mismatched tensors, non-persistent buffers) on its device, and run transformers'
        ``initialize_weights``, which skips every tensor the checkpoint filled (``_is_hf_initialized``)."""
        self.model.tie_weights()
        for name, (module, attr, is_param) in {**self.targets, **self.transient}.items():
            current = getattr(module, attr)
            if name in self.mismatched or current.is_meta:
                dtype = current.dtype if not is_param or kept_dtype(attr, current) else self.dtype
                device = device_for(name.removeprefix(self.prefix), self.device_map)
                self.assign(module, attr, is_param, torch.empty(current.shape, dtype=dtype, device=device))
            elif name in self.targets:
                current._is_hf_initialized = True
        self.model.initialize_weights()
