"""Hugging Face folder -> ic_jax per-layer parameters, checked before any tensor is read and resumable.

Every upstream tensor is checked first (name, shape, FP8 scale grid): a missing, extra or misshapen one is one
UserError naming it. Layers are then converted one at a time (host memory: one layer), each saved into a work
folder; a run that was stopped reuses the layers already there. The MTP/NextN layer (index
num_hidden_layers) is skipped and noted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from ic_jax.convert.fp8 import dequantize, scale_grid
from ic_jax.convert.hf_config import HFCheckpoint, read_hf_config
from ic_jax.convert.names import (
    Tensor,
    assemble,
    has_indexer,
    layer_of,
    layer_tensors,
    top_tensors,
)
from ic_jax.convert.safetensors_io import Shards
from ic_jax.errors import UserError
from ic_jax.model.pattern import check_pattern

SCALE_SUFFIX = "_scale_inv"  # weight -> weight_scale_inv


def plan(hf_dir: Path, dtype: str | None = None):
    """(checkpoint, shards, per-layer tensor lists, top tensors, indexer pattern, notes), all checked."""
    info = read_hf_config(hf_dir, dtype)
    cfg, shards = info.cfg, Shards(hf_dir)
    names = shards.names()
    n = cfg.num_hidden_layers
    present = "".join("F" if has_indexer(names, i) else "S" for i in range(n))
    pattern = info.pattern or present
    for i, c in enumerate(pattern):
        if c == "F" and present[i] == "S":
            raise UserError(f"tensor model.layers.{i}.self_attn.indexer.wq_b.weight is missing: layer {i} is full (F) "
                            f"in the checkpoint's schedule; fix indexer_types / index_topk_* in config.json")
    check_pattern(pattern, n)  # with no schedule declared, layer 0 must ship an indexer
    layers = [layer_tensors(cfg, i, present[i] == "F") for i in range(n)]
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
    return info, shards, layers, top, pattern, notes


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
    w = shards.read(t.name)
    if w.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
        w = dequantize(w, shards.read(t.name + SCALE_SUFFIX), block or (128, 128))
    return t.to_ic(w).astype(np.float32 if t.fp32 else dtype)


def tensor_bytes(shards: Shards, tensors: list[Tensor]) -> int:
    return sum(shards.nbytes(t.name) + (shards.nbytes(t.name + SCALE_SUFFIX) if t.name + SCALE_SUFFIX in shards.where
                                        else 0) for t in tensors)


def convert(hf_dir: Path, work: Path, dtype: str | None = None, progress: bool = True):
    """(checkpoint info, per-layer trees, top tree, indexer pattern, notes). Converted layers are kept in `work`
    (one .npz each) and reused when this is called again for the same source and dtype."""
    info, shards, layers, top, pattern, notes = plan(hf_dir, dtype)
    np_dtype = np.dtype(info.cfg.dtype) if info.cfg.dtype == "float32" else np.dtype(ml_dtypes.bfloat16)
    start_work(work, {"source": str(Path(hf_dir).absolute()), "dtype": info.cfg.dtype,
                      "config": hashlib.sha256(json.dumps(info.raw, sort_keys=True).encode()).hexdigest()})
    units = [("top", top)] + [(f"layer_{i:05d}", ts) for i, ts in enumerate(layers)]
    todo = [(key, ts) for key, ts in units if not (work / f"{key}.npz").is_file()]
    bar = tqdm(total=sum(tensor_bytes(shards, ts) for _, ts in todo), unit="B", unit_scale=True, unit_divisor=1024,
               desc="convert", disable=not progress)
    for key, ts in todo:
        arrays = []
        for t in ts:
            arrays.append(read_tensor(shards, t, info.block, np_dtype))
            bar.update(tensor_bytes(shards, [t]))
        save_unit(work / f"{key}.npz", assemble(ts, arrays))
    bar.close()
    trees = {key: load_unit(work / f"{key}.npz") for key, _ in units}
    return info, [trees[key] for key, _ in units[1:]], trees["top"], pattern, notes


def start_work(work: Path, source: dict) -> None:
    """Keeps `work` when it was made for the same `source`, else starts it empty."""
    stamp = work / "source.json"
    if work.is_dir() and not (stamp.is_file() and json.loads(stamp.read_text()) == source):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(source))


def save_unit(path: Path, tree: dict) -> None:
    """Flat npz, written atomically; bfloat16 goes as its uint16 bits (npz has no bfloat16), marked in the key."""
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(prefix + k + "/", v)
            elif v.dtype == np.dtype(ml_dtypes.bfloat16):
                flat[prefix + k + "@bf16"] = v.view(np.uint16)
            else:
                flat[prefix + k] = v

    walk("", tree)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def load_unit(path: Path) -> dict:
    tree: dict = {}
    with np.load(path) as data:
        for key in data.files:
            value = data[key]
            if key.endswith("@bf16"):
                key, value = key[:-5], value.view(ml_dtypes.bfloat16)
            node = tree
            *parents, leaf = key.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    return tree
