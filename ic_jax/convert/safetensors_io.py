"""Safetensors shards, read lazily: the header is parsed once and each tensor is a slice of a memory map, so host
memory holds one tensor at a time, not the shard. The format is an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}} and the raw data. It is read here directly because the `safetensors`
package's NumPy API cannot return bfloat16 or FP8 tensors, which these checkpoints are made of."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from ic_jax.errors import UserError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


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
        self.headers, self.data_start = {}, {}
        for f in files:
            self.headers[f], self.data_start[f] = read_header(self.folder / f)
        # the index decides which tensors exist (as Hugging Face loaders read it)
        self.where = weight_map or {name: f for f, h in self.headers.items() for name in h}
        for name, f in self.where.items():
            if name not in self.headers[f]:
                raise UserError(f"tensor {name}: {INDEX} places it in {f}, which does not hold it; "
                                f"re-download the checkpoint")
        self._maps: dict[str, np.memmap] = {}

    def names(self) -> list[str]:
        return sorted(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self._entry(name)["dtype"]])

    def nbytes(self, name: str) -> int:
        start, end = self._entry(name)["data_offsets"]
        return end - start

    def read(self, name: str) -> np.ndarray:
        """A copy of the tensor (the memory map is not kept referenced)."""
        f = self.where[name]
        if f not in self._maps:
            self._maps[f] = np.memmap(self.folder / f, np.uint8, mode="r")
        entry = self._entry(name)
        start, end = entry["data_offsets"]
        base = self.data_start[f]
        raw = np.array(self._maps[f][base + start: base + end])
        return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def _entry(self, name: str) -> dict:
        return self.headers[self.where[name]][name]


def read_header(path: Path) -> tuple[dict, int]:
    """The header of one shard and where its data begins; damage is one UserError."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > os.path.getsize(path):
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"{path} is not a safetensors file ({e}); re-download it") from None
    header.pop("__metadata__", None)
    data_size = os.path.getsize(path) - 8 - size
    for name, entry in header.items():
        if entry.get("dtype") not in DTYPES:
            raise UserError(f"tensor {name} in {path.name} has dtype {entry.get('dtype')}, which is not supported")
        if entry["data_offsets"][1] > data_size:
            raise UserError(f"tensor {name} in {path.name} lies past the end of the file; re-download it")
    return header, 8 + size


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
