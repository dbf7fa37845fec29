"""DeepSeek-V3's inference ("mp") format, as its ``inference/convert.py`` writes it: ``to-mp`` and ``from-mp``.

One file per rank, ``model{i}-mp{N}.safetensors``, with DeepSeek's short names (``layers.0.attn.wq_b.weight``);
routed experts whole on their rank (rank i holds experts ``[i*E/N, (i+1)*E/N)``), the other weights split
over the ranks on DeepSeek's dim or copied to every rank. Both directions run on the conversion engine:
``to-mp`` lays the rank files out from the source headers, then fills them one source shard per unit;
``from-mp`` plans official shards with the package's one shard planner and writes one per unit.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

from ..configuration import DeepseekMoEConfig
from ..fp8 import BLOCK, QUANTIZED_KEY, SCALE_SUFFIX, scale_shape
from ..layout import official_tensor_shapes
from ..safetensors_io import (
    CheckpointError,
    SafetensorsReader,
    SafetensorsWriter,
    create_safetensors,
    data_offsets,
    header_bytes_for,
    plan_shards,
    safetensors_header,
    write_tensor,
)
from .engine import (
    Destination,
    Summary,
    Unit,
    convert,
    describe_mtp,
    is_fp8,
    is_mtp_key,
    model_config,
    notice,
    open_source,
    read_config,
    require_folder,
)

# DeepSeek-V3's inference/convert.py: per name part, the new name and the dim split across ranks.
MP_NAMES = {
    "embed_tokens": ("embed", 0), "input_layernorm": ("attn_norm", None), "post_attention_layernorm": ("ffn_norm", None),
    "q_proj": ("wq", 0), "q_a_proj": ("wq_a", None), "q_a_layernorm": ("q_norm", None), "q_b_proj": ("wq_b", 0),
    "kv_a_proj_with_mqa": ("wkv_a", None), "kv_a_layernorm": ("kv_norm", None), "kv_b_proj": ("wkv_b", 0),
    "o_proj": ("wo", 1), "gate": ("gate", None), "gate_proj": ("w1", 0), "down_proj": ("w2", 1),
    "up_proj": ("w3", 0), "norm": ("norm", None), "lm_head": ("head", 0),
}
MP_PARTS = {"self_attn": "attn", "mlp": "ffn", "weight_scale_inv": "scale", "e_score_correction_bias": "bias"}


def mp_name(key: str) -> tuple[str, int | None, int | None]:
    """Official key -> (mp name, split dim or None, routed expert index or None)."""
    parts = key.removeprefix("model.").split(".")
    parts = [MP_PARTS.get(p, p) for p in parts]
    if len(parts) < 2 or parts[-2] not in MP_NAMES:
        raise CheckpointError(f"tensor {key!r} has no name in DeepSeek's inference format")
    new, dim = MP_NAMES[parts[-2]]
    parts[-2] = new
    expert = int(parts[-3]) if "experts" in parts and "shared_experts" not in parts else None
    return ".".join(parts), dim, expert


def mp_file(rank: int, ranks: int) -> str:
    return f"model{rank}-mp{ranks}.safetensors"


def rank_parts(key: str, shape: list[int], ranks: int, experts: int) -> list[tuple[int, str, list[int], int | None]]:
    """Where an official tensor of ``shape`` goes: ``[(rank, mp name, shape there, split dim)]``."""
    name, dim, expert = mp_name(key)
    if expert is not None:
        return [(expert // (experts // ranks), name, list(shape), None)]
    if dim is None:
        return [(rank, name, list(shape), None) for rank in range(ranks)]
    if shape[dim] % ranks:
        raise CheckpointError(f"{key!r}: dim {dim} of {list(shape)} does not split over {ranks} ranks")
    part = list(shape)
    part[dim] //= ranks
    return [(rank, name, part, dim) for rank in range(ranks)]


def require_mla(model: DeepseekMoEConfig, config: dict, where: str) -> None:
    """DeepSeek's inference code (DeepSeek-V3's inference/model.py) builds MLA models only: V2 and V3."""
    if model.attention_type != "mla":
        raise CheckpointError(f"{where}: model_type {config.get('model_type')!r} is a DeepSeekMoE (V1) model, with "
                              "multi-head attention; DeepSeek's inference format holds MLA models only (V2, V3)")


def to_mp(src: str, dst: str, model_parallel: int, drop_mtp: bool = False, overwrite: bool = False,
          resume: bool = False, quiet: bool = False) -> Summary:
    """Official (or this package's) folder -> DeepSeek-V3's inference format. The format has no place for
    V3's multi-token-prediction layers: a source that holds them needs ``drop_mtp`` (they are left out,
    with a notice, as DeepSeek's convert.py leaves them out). Each rank file's layout is fixed from the
    source headers first (on a fresh start), then filled one source shard per unit."""
    destination = Destination(dst, "to-mp", {"source": os.path.abspath(src), "model_parallel": model_parallel,
                                             "drop_mtp": drop_mtp}, overwrite, resume)
    source = open_source(src)
    require_mla(source.model, source.config, os.path.join(src, "config.json"))
    if not isinstance(model_parallel, int) or model_parallel < 1:
        raise CheckpointError(f"model_parallel must be a positive number of ranks, got {model_parallel!r}")
    layers, experts = source.model.num_hidden_layers, source.model.n_routed_experts or 1
    if experts % model_parallel:
        raise CheckpointError(f"n_routed_experts ({experts}) does not split over {model_parallel} ranks")
    mtp = [key for key in source.keys if is_mtp_key(key, layers)]
    if mtp and not drop_mtp:
        raise CheckpointError(f"{src} holds V3's multi-token-prediction layer, {describe_mtp(mtp, layers)}, which DeepSeek's "
                              "inference format has no place for; pass --drop-mtp to leave it out")
    files = [mp_file(rank, model_parallel) for rank in range(model_parallel)]
    layout = [{} for _ in files]  # per rank: {mp name: (dtype, shape)}
    targets = {}  # per source shard: {key: rank_parts}
    for file, entries in source.files.items():
        targets[file] = {}
        for key, entry in entries.items():
            if is_mtp_key(key, layers):
                continue
            targets[file][key] = rank_parts(key, entry["shape"], model_parallel, experts)
            for rank, name, shape, dim in targets[file][key]:
                if entry["dtype"] == "F8_E4M3" and dim is not None and shape[dim] % BLOCK[dim]:
                    raise CheckpointError(f"{file}: FP8 tensor {key!r} {entry['shape']} split over {model_parallel} ranks "
                                          f"would cut its {BLOCK[0]}x{BLOCK[1]} scale blocks (dim {dim}: {shape[dim]} per rank)")
                layout[rank][name] = (entry["dtype"], shape)

    def prepare(work: str) -> None:
        for file, entries in zip(files, layout):
            create_safetensors(os.path.join(work, file), entries)

    def unit(file: str) -> Unit:
        def write(work: str, summary: Summary) -> None:
            offsets = [data_offsets(os.path.join(work, f)) for f in files]
            with contextlib.ExitStack() as stack:
                handles = [stack.enter_context(open(os.path.join(work, f), "r+b")) for f in files]
                reader = stack.enter_context(SafetensorsReader(os.path.join(source.directory, file)))
                for key, parts in targets[file].items():
                    tensor = reader.get_tensor(key)
                    summary.count_in([tensor])
                    for rank, name, shape, dim in parts:
                        part = tensor if dim is None else tensor.narrow(dim, rank * shape[dim], shape[dim])
                        write_tensor(handles[rank], offsets[rank][name], part)
                        summary.count_out(part)

        return Unit(file, source.size(file), write)

    units = [unit(file) for file in source.files]
    if mtp:
        notice(f"to-mp: leaving out V3's multi-token-prediction layer, {describe_mtp(mtp, layers)}, as DeepSeek's "
               "convert.py does (from-mp cannot restore it; verify --ignore-mtp compares the rest)")
    return convert(destination, units, None, src, index=False, prepare=prepare, quiet=quiet)


def from_mp(src: str, dst: str, config_path: str, overwrite: bool = False, resume: bool = False,
            quiet: bool = False, max_shard_size: int = 5 * 10**9) -> Summary:
    """DeepSeek-V3's inference format -> official folder (with the official ``config_path`` config.json),
    in shards of at most ``max_shard_size`` bytes."""
    destination = Destination(dst, "from-mp", {"source": os.path.abspath(src), "config": os.path.abspath(config_path),
                                               "max_shard_size": max_shard_size}, overwrite, resume)
    config = read_config(config_path)
    model = model_config(config, config_path)
    require_mla(model, config, config_path)
    require_folder(src, "a folder of model{i}-mp{N}.safetensors files")
    ranks = sorted(f for f in os.listdir(src) if re.fullmatch(r"model\d+-mp\d+\.safetensors", f))
    if not ranks:
        raise CheckpointError(f"{src}: no model{{i}}-mp{{N}}.safetensors files")
    count = int(re.search(r"mp(\d+)", ranks[0])[1])
    expected = [mp_file(r, count) for r in range(count)]
    if ranks != sorted(expected):
        raise CheckpointError(f"{src}: expected {expected}, found {ranks}")
    experts = model.n_routed_experts or 1
    if experts % count:
        raise CheckpointError(f"{config_path}: n_routed_experts ({experts}) does not split over the {count} ranks of {src}")
    headers = [safetensors_header(os.path.join(src, f)) for f in expected]
    shapes = {k: s for k, s in official_tensor_shapes(model.to_dict()).items() if not is_mtp_key(k, model.num_hidden_layers)}
    if is_fp8(config):
        shapes.update({k.removesuffix(".weight") + SCALE_SUFFIX: scale_shape(s) for k, s in shapes.items() if QUANTIZED_KEY.search(k)})
    sizes = {}  # bytes of each official tensor, summed over the ranks that hold a part
    for key, shape in shapes.items():
        sizes[key] = 0
        for index, (rank, name, part, dim) in enumerate(rank_parts(key, list(shape), count, experts)):
            entry = headers[rank].get(name)
            if entry is None:
                raise CheckpointError(f"{os.path.join(src, expected[rank])}: tensor {name!r} (official {key!r}) is missing")
            if entry["shape"] != part:
                raise CheckpointError(f"{os.path.join(src, expected[rank])}: tensor {name!r} has shape {entry['shape']}, "
                                      f"expected {part} (official {key!r} {list(shape)} over {count} ranks)")
            if dim is not None or index == 0:  # a tensor copied to every rank is read once
                sizes[key] += entry["data_offsets"][1] - entry["data_offsets"][0]
    shards = plan_shards(sizes, max_shard_size)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    def unit(file: str, shard_keys: list[str]) -> Unit:
        def write(work: str, summary: Summary) -> None:
            with contextlib.ExitStack() as stack:
                readers = [stack.enter_context(SafetensorsReader(os.path.join(src, f))) for f in expected]
                writer = stack.enter_context(SafetensorsWriter(os.path.join(work, file), header_bytes_for(shard_keys)))
                for key in shard_keys:
                    places = rank_parts(key, list(shapes[key]), count, experts)
                    dim = places[0][3]
                    parts = [readers[rank].get_tensor(name) for rank, name, _, _ in (places if dim is not None else places[:1])]
                    tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
                    writer.add(key, tensor)
                    summary.count_in(parts)
                    summary.count_out(tensor)

        return Unit(file, sum(sizes[k] for k in shard_keys), write)

    units = [unit(file, shard_keys) for file, shard_keys in zip(names, shards)]
    mtp_dropped = {"num_nextn_predict_layers": 0} if config.get("num_nextn_predict_layers") else {}
    return convert(destination, units, {**config, **mtp_dropped}, src, quiet=quiet)
