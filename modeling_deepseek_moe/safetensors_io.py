"""Safetensors files, streamed: reading checkpoint folders (index checked against the files), reading and
writing one tensor at a time, and shard planning. Every error is a :class:`CheckpointError` that names the
file and the tensor key.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections import defaultdict
from collections.abc import Iterable

import torch
from safetensors import SafetensorError, safe_open

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8,
                      "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint that does not match the model: names the file and the tensor key. (A RuntimeError as
    transformers' loading errors are, and a ValueError as this package's were.)"""


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


# ---------------------------------------------------------------------- writing whole folders
def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or a string such as "5GB", "80GiB", "2TiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])(i?)B\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"size {size!r}: expected a number of bytes or e.g. '5GB', '80GiB'")
    power = "KMGT".index(match[2].upper()) + 1
    return int(float(match[1]) * (1024**power if match[3] else 1000**power))


def plan_shards(sizes: dict[str, int], max_shard_size: int) -> list[list[str]]:
    """Keys in order, cut into shards of at most ``max_shard_size`` bytes (``sizes``: bytes per key; a
    tensor larger than that is a shard of its own)."""
    shards, current, size = [], [], 0
    for key, nbytes in sizes.items():
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
    shards = plan_shards({key: t.numel() * t.element_size() for key, t in tensors.items()}, parse_size(max_shard_size))
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
