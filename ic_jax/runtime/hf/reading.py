"""A Hugging Face folder, checked before any tensor is read, then read one tensor at a time.

`plan` checks every upstream tensor first (name, shape, FP8 scale grid): a missing, extra or misshapen one is one
UserError naming it. `copy_tensors` then reads them one by one (dequantized, transposed into ic_jax's layout, cast
to the dtype the model gives that parameter) and hands each to a destination: a converted checkpoint's work folder
(`ic_jax.convert`) or the model's parameters in device memory (`device.load_model`). The MTP/NextN layer (index
num_hidden_layers) is skipped and noted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import nnx
from tqdm import tqdm

from ic_jax.errors import UserError
from ic_jax.model.dsa import DSAModel
from ic_jax.model.pattern import check_pattern, parse_pattern
from ic_jax.runtime.hf.config import HFCheckpoint, read_hf_config
from ic_jax.runtime.hf.fp8 import dequantize, scale_grid
from ic_jax.runtime.hf.names import (
    Tensor,
    has_indexer,
    layer_of,
    layer_tensors,
    top_tensors,
)
from ic_jax.runtime.hf.safetensors_io import Shards

SCALE_SUFFIX = "_scale_inv"  # weight -> weight_scale_inv


@dataclasses.dataclass
class Plan:
    info: HFCheckpoint
    shards: Shards
    shipped: str  # F where the checkpoint ships an indexer
    pattern: str  # the schedule config.json declares, else `shipped`
    units: list[tuple[str, list[Tensor]]]  # ("top", ...), ("layer_00000", ...), ... in reading order
    notes: list[str]


def plan(hf_dir: Path, dtype: str | None = None) -> Plan:
    """Everything about the folder, checked, before a tensor is read."""
    info = read_hf_config(hf_dir, dtype)
    cfg, shards = info.cfg, Shards(hf_dir)
    names = shards.names()
    n = cfg.num_hidden_layers
    shipped = "".join("F" if has_indexer(names, i) else "S" for i in range(n))
    pattern = info.pattern or shipped
    for i, c in enumerate(pattern):
        if c == "F" and shipped[i] == "S":
            raise UserError(f"tensor model.layers.{i}.self_attn.indexer.wq_b.weight is missing: layer {i} is full (F) "
                            f"in the checkpoint's schedule; fix indexer_types / index_topk_* in config.json")
    check_pattern(pattern, n)  # with no schedule declared, layer 0 must ship an indexer
    layers = [layer_tensors(cfg, i, shipped[i] == "F") for i in range(n)]
    top = top_tensors(cfg)
    expected = {t.name: t for t in top + [t for ts in layers for t in ts]}
    mtp = [name for name in names if (layer_of(name) or -1) >= n]
    for name in names:
        if name in expected or name in mtp:
            continue
        if name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in expected:
            continue
        raise UserError(f"unexpected tensor {name} in {hf_dir}: not part of a {info.architecture} with this "
                        f"config.json; check that the config belongs to these weights")
    for t in expected.values():
        check_tensor(shards, t, info)
    notes = []
    if mtp:
        notes.append(f"skipped the MTP/NextN layer(s) {sorted({layer_of(x) for x in mtp})} ({len(mtp)} tensors): "
                     f"ic_jax does not run multi-token prediction")
    units = [("top", top)] + [(f"layer_{i:05d}", ts) for i, ts in enumerate(layers)]
    units = [(key, sorted(ts, key=lambda t: position(shards, t))) for key, ts in units]  # shards read front to back
    return Plan(info, shards, shipped, pattern, units, notes)


def unit_layer(key: str) -> int:
    """The layer of a unit key ("layer_00003" -> 3)."""
    return int(key.removeprefix("layer_"))


def position(shards: Shards, t: Tensor) -> tuple[str, int]:
    e = shards.entries[t.name]
    return e.file, e.start


def run_pattern(p: Plan, pattern: str | None, where: str) -> str:
    """`pattern` (any spelling; default: the checkpoint's), refused with one line where it makes F a layer that
    ships no indexer."""
    pattern = parse_pattern(pattern if pattern is not None else p.pattern, p.info.cfg.num_hidden_layers)
    missing = [i for i, c in enumerate(pattern) if c == "F" and p.shipped[i] == "S"]
    if missing:
        raise UserError(f"--pattern {pattern} makes layer {missing[0]} F, but {where} ships no indexer weights for "
                        f"it (its layers with an indexer: {p.shipped}); choose a pattern with S there")
    return pattern


def check_tensor(shards: Shards, t: Tensor, info: HFCheckpoint) -> None:
    if t.name not in shards.where:
        raise UserError(f"tensor {t.name} is missing from the checkpoint; re-download it or fix config.json")
    shape = shards.shape(t.name)
    if shape != t.shape:
        raise UserError(f"tensor {t.name} has shape {list(shape)}, config.json needs {list(t.shape)}")
    if shards.dtype(t.name) == np.dtype(ml_dtypes.float8_e4m3fn):
        scale = t.name + SCALE_SUFFIX
        if scale not in shards.where:
            raise UserError(f"tensor {scale} is missing: {t.name} is FP8 and needs its block scales")
        grid = scale_grid(shape, info.block or (128, 128))
        if shards.shape(scale) != grid:
            raise UserError(f"tensor {scale} has shape {list(shards.shape(scale))}, the block grid of {t.name} "
                            f"is {list(grid)}")


def read_tensor(shards: Shards, t: Tensor, block, dtype) -> np.ndarray:
    """The tensor in ic_jax's layout and `dtype` (one routed expert's slice for an expert tensor)."""
    w = shards.read(t.name)
    if w.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
        w = dequantize(w, shards.read(t.name + SCALE_SUFFIX), block or (128, 128))
    return t.to_ic(w).astype(dtype)


def tensor_bytes(shards: Shards, tensors: list[Tensor]) -> int:
    return sum(shards.nbytes(t.name) + (shards.nbytes(t.name + SCALE_SUFFIX) if t.name + SCALE_SUFFIX in shards.where
                                        else 0) for t in tensors)


def abstract_model(cfg, pattern: str) -> DSAModel:
    return nnx.eval_shape(lambda: DSAModel(cfg, pattern, nnx.Rngs(0)))


def copy_tensors(p: Plan, units, put: Callable[[str, Tensor, np.ndarray], None], dtype_of: Callable,
                 progress: bool, done: Callable[[str], None] = lambda key: None) -> None:
    """Reads every tensor of `units` in order and hands it to `put(unit, tensor, array)`; `done(unit)` after each."""
    bar = tqdm(total=sum(tensor_bytes(p.shards, ts) for _, ts in units), unit="B", unit_scale=True,
               unit_divisor=1024, desc="convert", disable=not progress)
    for key, ts in units:
        for t in ts:
            put(key, t, read_tensor(p.shards, t, p.info.block, dtype_of(key, t)))
            bar.update(tensor_bytes(p.shards, [t]))
        done(key)
    bar.close()
