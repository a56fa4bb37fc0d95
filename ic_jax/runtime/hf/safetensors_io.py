"""Safetensors shards, read lazily with the `safetensors` package, one shard at a time; and written.

`safe_open` parses and validates each shard's header (its tensors must tile the data exactly, which makes every
tensor's byte range follow from the order, dtypes and shapes it reports) and memory-maps the file. Its NumPy
API returns every dtype these checkpoints hold except FP8 (safetensors 0.8 looks the FP8 types up on `numpy`,
which has none), and it does not expose byte offsets: FP8 tensors are therefore copied out of a memory map of the
shard at the offsets that follow from the validated header. Host memory holds one tensor (plus the pages of the
one or two shards being read), never a whole shard's tensors or the model."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from ic_jax.errors import UserError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
RAW_ONLY = {"F8_E4M3", "F8_E8M0"}  # what safe_open's NumPy API cannot return
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
OPEN_SHARDS = 2  # a weight and its scale may sit in neighbouring shards


@dataclasses.dataclass(frozen=True)
class Entry:
    file: str
    dtype: str  # the safetensors name (BF16, F8_E4M3, ...)
    shape: tuple[int, ...]
    start: int  # byte range in the file
    end: int


class Shards:
    """The tensors of a Hugging Face folder: `model.safetensors.index.json` over several shard files, or one
    `model.safetensors`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{index} is not a safetensors index (no weight_map); fix or re-download it") from None
            files = sorted(set(weight_map.values()))
        elif (self.folder / "model.safetensors").is_file():
            files, weight_map = ["model.safetensors"], None
        else:
            raise UserError(f"{self.folder} has no {INDEX} and no model.safetensors; pass a Hugging Face model folder")
        self.entries: dict[str, Entry] = {}
        for f in files:
            self.entries.update(read_entries(self.folder, f))
        # the index decides which tensors exist (as Hugging Face loaders read it)
        self.where = weight_map or {name: e.file for name, e in self.entries.items()}
        for name, f in self.where.items():
            if name not in self.entries or self.entries[name].file != f:
                raise UserError(f"tensor {name}: {INDEX} places it in {f}, which does not hold it; "
                                f"re-download the checkpoint")
        self._open: collections.OrderedDict[str, tuple] = collections.OrderedDict()

    def names(self) -> list[str]:
        return sorted(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self.entries[name].dtype])

    def nbytes(self, name: str) -> int:
        e = self.entries[name]
        return e.end - e.start

    def read(self, name: str) -> np.ndarray:
        """A copy of the tensor; only the last `OPEN_SHARDS` shards read stay open."""
        e = self.entries[name]
        handle, raw = self._shard(e.file)
        if e.dtype not in RAW_ONLY:
            return handle.get_tensor(name)
        return np.array(raw[e.start:e.end]).view(DTYPES[e.dtype]).reshape(e.shape)

    def _shard(self, file: str) -> tuple:
        if file not in self._open:
            path = self.folder / file
            self._open[file] = (safe_open(path, framework="numpy"), np.memmap(path, np.uint8, mode="r"))
            while len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)  # unmapped once dropped
        self._open.move_to_end(file)
        return self._open[file]


def read_entries(folder: Path, file: str) -> dict[str, Entry]:
    """The tensors of one shard with their byte ranges; a damaged or unsupported file is one UserError."""
    path = folder / file
    try:
        handle = safe_open(path, framework="numpy")
        listed = [(name, handle.get_slice(name)) for name in handle.offset_keys()]
        listed = [(name, s.get_dtype(), tuple(s.get_shape())) for name, s in listed]
    except (OSError, SafetensorError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a safetensors file ({reason}); re-download it") from None
    entries, offset = {}, 0
    for name, dtype, shape in listed:
        if dtype not in DTYPES:
            raise UserError(f"tensor {name} in {file} has dtype {dtype}, which is not supported")
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        entries[name] = Entry(file, dtype, shape, offset, offset + size)
        offset += size
    data_start = os.path.getsize(path) - offset  # safe_open checked that the tensors cover the data exactly
    return {name: dataclasses.replace(e, start=e.start + data_start, end=e.end + data_start)
            for name, e in entries.items()}


def write_shards(folder: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    """Writes `tensors` as `model-0000i-of-0000n.safetensors` shards of at most about `max_shard_bytes` each,
    with `model.safetensors.index.json`."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += t.nbytes
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_file(folder / file, {n: tensors[n] for n in group})
        weight_map.update({n: file for n in group})
    total = sum(t.nbytes for t in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_file(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)) + head)
        for t in tensors.values():
            fh.write(np.ascontiguousarray(t).tobytes())
