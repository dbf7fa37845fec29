"""The conversion engine: every subcommand reads a validated source, works through a journal into
``DST.partial``, streams a shard at a time, and publishes ``DST`` by one rename.

- Validate: :func:`open_source` reads a checkpoint folder (config.json, the index against the files, every
  tensor the config implies with its shape, FP8 dtypes and scales); :class:`Destination` checks where the
  result goes. Both before a byte is written.
- Journal: a conversion is a list of :class:`Unit` (one shard each); each finished unit is recorded in
  ``DST.partial/.conversion.json``, so that a resumed run skips it.
- Stream: a unit holds at most one shard's tensors (and its converted copy) in memory;
  :func:`shard_units` makes the units of the conversions that map each source shard to a shard of the
  same name through a function of its tensors.
- Publish: config.json, the index (read back from the written shards), the tokenizer files, then the
  rename of ``DST.partial`` to ``DST``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

import torch
from tqdm.auto import tqdm

from ..configuration import DeepseekMoEConfig, DeepseekMoEV1Config, DeepseekMoEV2Config, DeepseekMoEV3Config
from ..fp8 import FP8_DTYPE, QUANTIZED_KEY, SCALE_SUFFIX, scale_shape
from ..layout import LAYER_KEY, OFFICIAL_MODEL_TYPES, official_tensor_shapes
from ..safetensors_io import (
    SAFE_WEIGHTS_INDEX_NAME,
    CheckpointError,
    SafetensorsReader,
    SafetensorsWriter,
    checkpoint_files,
    header_bytes_for,
    safetensors_header,
)
from ..saving import remote_code_files

# Files of a model folder that are not weights: copied as they are.
EXTRA_FILES = re.compile(r"(tokenizer.*|special_tokens_map\.json|generation_config\.json|.*\.model|.*\.tiktoken|README\.md|LICENSE.*)")
JOURNAL = ".conversion.json"
CONFIG_CLASSES = {c.model_type: c for c in (DeepseekMoEV1Config, DeepseekMoEV2Config, DeepseekMoEV3Config)}
OFFICIAL_TO_OURS = {official: ours for ours, official in OFFICIAL_MODEL_TYPES.items()}


# ---------------------------------------------------------------------- validate: the source
@dataclass
class Source:
    """A checkpoint folder: config.json (as a dict), its validated config object (None when not asked
    for) and ``{file: {key: header entry}}``."""

    directory: str
    config: dict
    model: DeepseekMoEConfig | None
    files: dict[str, dict[str, dict]]

    @cached_property
    def keys(self) -> dict[str, str]:
        """``{key: file}``, built once (conversions look scales up once per weight)."""
        return {key: file for file, entries in self.files.items() for key in entries}

    def size(self, file: str | None = None) -> int:
        """Bytes of one shard, or of all."""
        files = self.files if file is None else [file]
        return sum(os.path.getsize(os.path.join(self.directory, f)) for f in files)

    @property
    def is_fp8(self) -> bool:
        return is_fp8(self.config)


def is_fp8(config: dict) -> bool:
    """Whether a config.json says DeepSeek's block-wise FP8."""
    return (config.get("quantization_config") or {}).get("quant_method") == "fp8"


def is_mtp_key(key: str, num_layers: int) -> bool:
    """Whether official ``key`` belongs to V3's multi-token-prediction layers (``model.layers.N``, N >= layers)."""
    match = LAYER_KEY.match(key)
    return bool(match) and int(match["layer"]) >= num_layers


def describe_mtp(keys: Iterable[str], num_layers: int) -> str:
    """``"model.layers.61 (68 tensors)"``: the multi-token-prediction layers among official ``keys``."""
    mtp = [key for key in keys if is_mtp_key(key, num_layers)]
    layers = sorted({int(LAYER_KEY.match(key)["layer"]) for key in mtp})
    names = ", ".join(f"model.layers.{layer}" for layer in layers)
    return f"{names} ({len(mtp)} tensors)"


def notice(message: str) -> None:
    """A line for the user on stderr (what a conversion does that they should know of, e.g. leaving out MTP)."""
    print(message, file=sys.stderr, flush=True)


def open_source(directory: str, expect_layout: bool = True) -> Source:
    """Read and validate a source folder: config.json (with ``expect_layout`` built by its family's config
    class, see :func:`model_config`), the index against the files, and with ``expect_layout`` every
    tensor the config implies with its shape (FP8 weights with their scales and dtype)."""
    require_folder(directory, "a checkpoint folder")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{directory}: no config.json (not a checkpoint folder)")
    config = read_config(config_path)
    model = model_config(config, config_path) if expect_layout else None
    files = {}
    for file, keys in checkpoint_files(directory).items():
        header = safetensors_header(os.path.join(directory, file))
        files[file] = {key: header[key] for key in keys}
    source = Source(directory, config, model, files)
    if expect_layout:
        validate_tensors(source)
    return source


def require_folder(path: str, what: str) -> None:
    """A CheckpointError unless ``path`` is a folder: it does not exist, or it is a file, not ``what``."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is a file, not {what}" if os.path.exists(path) else f"{path} does not exist")


def read_config(path: str) -> dict:
    """A config.json as a dict; a missing or unreadable one is a CheckpointError naming it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    try:
        with open(path) as handle:
            config = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a JSON config ({error})") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON config (a {type(config).__name__}, not an object)")
    return config


def model_config(config: dict, where: str, **overrides) -> DeepseekMoEConfig:
    """The config object of a config.json in DeepSeek's schema or ours, built by its family's class as
    ``from_pretrained`` builds it (so the same validation runs); a contradiction is a CheckpointError
    naming ``where`` and the field."""
    model_type = config.get("model_type")
    family = CONFIG_CLASSES.get(OFFICIAL_TO_OURS.get(model_type, model_type))
    if family is None:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not a DeepSeek MoE family")
    fields = json.loads(json.dumps(config))  # the config class edits rope_scaling in place
    fields["model_type"] = family.model_type
    try:
        built = family.from_dict(fields, **overrides)
        built.validate_architecture()  # from_dict sets the overrides after the constructor's validation
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{where}: {error}") from error
    return built


def validate_tensors(source: Source) -> None:
    """Every tensor the config implies, with its shape; FP8 weights in float8_e4m3fn with their scales."""
    keys = source.keys
    for key, shape in official_tensor_shapes(source.model.to_dict()).items():  # the config's defaults filled in
        file = keys.get(key)
        if file is None:
            raise CheckpointError(f"{source.directory}: tensor {key!r} is missing")
        entry = source.files[file][key]
        if tuple(entry["shape"]) != shape:
            raise CheckpointError(f"{file}: tensor {key!r} has shape {entry['shape']}, expected {list(shape)}")
        if source.is_fp8 and QUANTIZED_KEY.search(key):
            if entry["dtype"] != "F8_E4M3":
                raise CheckpointError(f"{file}: tensor {key!r} has dtype {entry['dtype']}, expected F8_E4M3")
            scale = key.removesuffix(".weight") + SCALE_SUFFIX
            if scale not in keys:
                raise CheckpointError(f"{source.directory}: FP8 scale {scale!r} is missing")
            scale_entry = source.files[keys[scale]][scale]
            if tuple(scale_entry["shape"]) != scale_shape(shape):
                raise CheckpointError(f"{keys[scale]}: tensor {scale!r} has shape {scale_entry['shape']}, expected {list(scale_shape(shape))}")


# ---------------------------------------------------------------------- validate: the destination; the journal
class Destination:
    """Where a conversion writes: ``DST.partial`` while it runs, holding the journal of finished units,
    renamed to ``DST`` at the end. ``plan`` and ``arguments`` identify the conversion, so that a resumed
    run continues only the same one. Checks, writing nothing: ``DST`` must be a folder that is empty
    unless ``overwrite``; a ``DST.partial`` left by an interrupted run is continued with ``resume``,
    replaced with ``overwrite``, and otherwise a CheckpointError asking for one of them."""

    def __init__(self, path: str, plan: str, arguments: dict, overwrite: bool = False, resume: bool = False) -> None:
        self.path = path.rstrip("/")
        self.work = self.path + ".partial"
        self.plan, self.arguments = plan, arguments
        self.finished: list[str] = []
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path} is a file; the destination must be a folder")
        if os.path.exists(self.path) and os.listdir(self.path) and not overwrite:
            raise CheckpointError(f"{self.path} exists and is not empty (pass --overwrite to replace it)")
        if not os.path.exists(self.work) or (overwrite and not resume):
            return
        journal = self._journal()
        if not resume:
            done = f"{journal.get('plan')}, finished shards: {len(journal['finished'])}" if journal else "no finished shard"
            raise CheckpointError(f"{self.work} holds an interrupted conversion ({done}): pass --resume to continue it, "
                                  "or --overwrite to start over")
        if journal is not None:
            if journal.get("plan") != plan or journal.get("arguments") != arguments:
                raise CheckpointError(f"{self.work} holds a different conversion ({journal.get('plan')} of "
                                      f"{journal.get('arguments', {}).get('source')}): pass --overwrite instead of --resume "
                                      "to start over")
            self.finished = list(journal["finished"])

    def _journal(self) -> dict | None:
        """The work folder's journal; None when there is none to trust (nothing recorded as finished)."""
        try:
            with open(os.path.join(self.work, JOURNAL)) as handle:
                journal = json.load(handle)
        except (OSError, json.JSONDecodeError):
            return None
        return journal if isinstance(journal, dict) and isinstance(journal.get("finished"), list) else None

    def begin(self) -> None:
        """Create the work folder, or keep it when resuming."""
        if not self.finished:
            shutil.rmtree(self.work, ignore_errors=True)
            os.makedirs(self.work)

    def record(self, unit: str) -> None:
        self.finished.append(unit)
        temporary = os.path.join(self.work, JOURNAL + ".tmp")
        with open(temporary, "w") as handle:
            json.dump({"plan": self.plan, "arguments": self.arguments, "finished": self.finished}, handle)
        os.replace(temporary, os.path.join(self.work, JOURNAL))

    def publish(self) -> None:
        os.remove(os.path.join(self.work, JOURNAL))
        if os.path.exists(self.path):
            shutil.rmtree(self.path)
        os.replace(self.work, self.path)


# ---------------------------------------------------------------------- stream
@dataclass
class Summary:
    tensors_in: int = 0
    tensors_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0

    def count_in(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self.tensors_in += 1
            self.bytes_in += tensor.numel() * tensor.element_size()

    def count_out(self, tensor: torch.Tensor) -> None:
        self.tensors_out += 1
        self.bytes_out += tensor.numel() * tensor.element_size()

    def __str__(self) -> str:
        return (f"{self.tensors_in} tensors ({self.bytes_in / 2**30:.2f} GiB) -> {self.tensors_out} tensors "
                f"({self.bytes_out / 2**30:.2f} GiB) in {self.seconds:.1f} s"
                + (f", {self.shards_skipped} finished shards reused" if self.shards_skipped else ""))


@dataclass
class Unit:
    """One journal entry: ``write(work, summary)`` writes it into the work folder, reading ``size`` bytes."""

    name: str
    size: int
    write: Callable[[str, Summary], None]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while a conversion writes; its message says what is finished and how to continue."""


class Progress:
    """A progress bar in bytes on stderr whose final state is drawn once (tqdm draws the last update and
    again when closed: two 100% lines in a log)."""

    def __init__(self, total: int, desc: str, quiet: bool) -> None:
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=quiet)

    def advance(self, nbytes: int) -> None:
        if self.bar.n + nbytes < self.bar.total:
            self.bar.update(nbytes)
        else:
            self.bar.n = self.bar.total  # drawn by close()

    def close(self) -> None:
        self.bar.close()


def convert(destination: Destination, units: list[Unit], config: dict | None, extras_from: str, index: bool = True,
            copy_code: bool = False, prepare: Callable[[str], None] | None = None, quiet: bool = False) -> Summary:
    """Run ``units`` into ``destination`` (those a resumed run finished are skipped), then write ``config``
    (when not None), the index (with ``index``), the tokenizer files of ``extras_from`` and, with
    ``copy_code``, this package's modeling code, and publish. ``prepare(work)`` runs first on a fresh start.
    Ctrl-C raises :class:`Interrupted`, whose message says how to resume."""
    start = time.time()
    summary = Summary(shards_skipped=sum(unit.name in destination.finished for unit in units))
    progress = Progress(sum(unit.size for unit in units), destination.plan, quiet)
    try:
        destination.begin()
        if prepare is not None and not destination.finished:
            prepare(destination.work)
        for unit in units:
            if unit.name not in destination.finished:
                unit.write(destination.work, summary)
                destination.record(unit.name)
            progress.advance(unit.size)
        write_folder_files(extras_from, destination.work, config, index, copy_code)
        destination.publish()
    except KeyboardInterrupt:
        done = sum(unit.name in destination.finished for unit in units)
        raise Interrupted(f"interrupted with {done} of {len(units)} shards finished in {destination.work}: run the same "
                          "command with --resume to continue (or --overwrite to start over)") from None
    finally:
        progress.close()
    summary.seconds = time.time() - start
    return summary


def shard_units(source: Source, tensors: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> list[Unit]:
    """One unit per source shard, written as the shard of the same name: ``tensors(shard, companions)`` gets
    a weight with its ``weight_scale_inv`` at a time and, in ``companions``, the FP8 scales of its weights
    that DeepSeek's index placed in another shard; a shard whose tensors are all dropped leaves no file."""

    def unit(file: str, entries: dict[str, dict]) -> Unit:
        def write(work: str, summary: Summary) -> None:
            target = os.path.join(work, file)
            with SafetensorsReader(os.path.join(source.directory, file)) as reader, \
                    SafetensorsWriter(target, header_bytes_for(entries, 2)) as writer:
                for group in weight_groups(entries):
                    shard = {key: reader.get_tensor(key) for key in group}
                    summary.count_in(shard.values())
                    for key, tensor in tensors(shard, read_companion_scales(source, file, shard)).items():
                        writer.add(key, tensor)
                        summary.count_out(tensor)
            if not writer.header:
                os.remove(target)

        return Unit(file, source.size(file), write)

    return [unit(file, entries) for file, entries in source.files.items()]


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


# ---------------------------------------------------------------------- publish
def write_folder_files(extras_from: str, work: str, config: dict | None, index: bool, copy_code: bool = False) -> None:
    """The index of the shards in ``work`` (with ``index``), config.json (when ``config``), the tokenizer and
    generation files of ``extras_from`` and, with ``copy_code``, the modeling code."""
    if index:
        weight_map, total = {}, 0
        for file in sorted(f for f in os.listdir(work) if f.endswith(".safetensors")):
            for key, entry in safetensors_header(os.path.join(work, file)).items():
                weight_map[key] = file
                total += entry["data_offsets"][1] - entry["data_offsets"][0]
        with open(os.path.join(work, SAFE_WEIGHTS_INDEX_NAME), "w") as handle:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, handle, indent=2)
    if config is not None:
        with open(os.path.join(work, "config.json"), "w") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
    for name in os.listdir(extras_from):
        if EXTRA_FILES.fullmatch(name):
            shutil.copy(os.path.join(extras_from, name), work)
    for path in remote_code_files() if copy_code else ():
        shutil.copy(path, work)
