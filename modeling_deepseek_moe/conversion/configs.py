"""DeepSeek's config.json schema <-> this package's, and the two subcommands that change only that:
``from-official`` (optionally changing the dtype or leaving out V3's MTP layer) and ``to-official``.
Tensors are the same in both formats (DeepSeek's names, shapes and dtypes).
"""

from __future__ import annotations

import os

from ..fp8 import FP8_QUANTIZATION_CONFIG, quantize_tensors
from ..layout import OFFICIAL_MODEL_TYPES, official_architecture
from ..safetensors_io import CheckpointError
from ..saving import auto_map
from .engine import CONFIG_CLASSES, OFFICIAL_TO_OURS, Destination, Summary, convert, is_mtp_key, model_config, open_source, shard_units
from .quantization import dequantize_tensors

# from-official's dtype choices: keep the source's, dequantize FP8 to bf16, quantize what DeepSeek quantizes.
DTYPES = ("keep", "bf16", "fp8")
# Fields this package writes into config.json that DeepSeek's schema does not have.
PACKAGE_ONLY_FIELDS = {
    "auto_map", "head_dim", "qk_head_dim", "num_expert_chunks", "device_aux_loss_alpha", "comm_aux_loss_alpha",
    "bias_update_speed", "capacity_factor", "mla_absorb", "mtp_loss_weight", "fp8_compute", "output_router_logits",
    "rope_parameters", "transformers_version", "dtype",
}


def apply_changes(config: dict, changes: dict) -> dict:
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
    config = apply_changes(config, changes)
    family = type(model_config(config, "config.json"))
    version = family.__name__.removeprefix("DeepseekMoE").removesuffix("Config")
    return {**config, "model_type": family.model_type, "auto_map": auto_map(family),
            "architectures": [official_architecture(f"DeepseekMoE{version}ForCausalLM")]}


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
    return apply_changes(official, changes)


def from_official(src: str, dst: str, dtype: str = "keep", drop_mtp: bool = False, overwrite: bool = False,
                  resume: bool = False, quiet: bool = False) -> Summary:
    """Official folder -> this package's format (config with our model_type and auto_map, modeling code);
    ``dtype`` "bf16" dequantizes FP8 weights, "fp8" quantizes what DeepSeek quantizes; ``drop_mtp`` leaves
    out V3's multi-token-prediction layer."""
    destination = Destination(dst, "from-official", {"source": os.path.abspath(src), "dtype": dtype, "drop_mtp": drop_mtp},
                              overwrite, resume)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    source = open_source(src)
    layers = source.model.num_hidden_layers

    def tensors(shard, companions):
        if drop_mtp:
            shard = {k: v for k, v in shard.items() if not is_mtp_key(k, layers)}
        if dtype == "bf16":
            shard = dequantize_tensors(shard, companions)
        elif dtype == "fp8":
            shard = quantize_tensors(shard)
        return shard

    changes = {"num_nextn_predict_layers": 0} if drop_mtp else {}
    if dtype == "bf16":
        changes.update(quantization_config=None, torch_dtype="bfloat16")
    elif dtype == "fp8" and not source.is_fp8:
        changes["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    config = to_our_config(source.config, **changes)
    return convert(destination, shard_units(source, tensors), config, src, copy_code=True, quiet=quiet)


def to_official(src: str, dst: str, overwrite: bool = False, resume: bool = False, quiet: bool = False) -> Summary:
    """This package's folder -> DeepSeek's config schema; tensors unchanged (they are already official)."""
    destination = Destination(dst, "to-official", {"source": os.path.abspath(src)}, overwrite, resume)
    source = open_source(src)
    config = to_official_config(source.config)
    return convert(destination, shard_units(source, lambda shard, _: shard), config, src, quiet=quiet)

