"""Hugging Face folder -> the files of an ic_jax checkpoint, resumable, one tensor in host memory at a time.

`convert` writes each tensor (read by `ic_jax.runtime.hf.reading`) into its layer's .npy file in a work folder,
through a memory map that is unmapped after each tensor; a unit (the top-level tensors, one layer) is marked done
once all of it is on disk, and a run that was stopped skips the units marked done. `saved_tree` then opens the
files read-only, memory-mapped, for the checkpoint writer, so the final save holds no copy of the model either (with
a mesh, each process copies out of them only the slices its devices hold, `checkpoint.place_layers`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from ic_jax.files import atomic_write_text
from ic_jax.runtime.checkpoint import sync_processes
from ic_jax.runtime.hf.names import get_path
from ic_jax.runtime.hf.reading import Plan, abstract_model, copy_tensors, plan
from ic_jax.runtime.stacked import slots

BF16 = np.dtype(ml_dtypes.bfloat16)


def convert(hf_dir: Path, work: Path, dtype: str | None = None, progress: bool = True) -> Plan:
    """Converts every tensor into `work` (see the module docstring); units done by an earlier call for the same
    source, dtype and config are kept. In a job of several processes (sharing the file system), process 0 prepares
    `work`, each process converts every n-th unit and all return when every unit is done. Returns the plan;
    `saved_tree(plan, work)` is the result."""
    p = plan(hf_dir, dtype)
    if jax.process_index() == 0:
        start_work(work, {"source": str(Path(hf_dir).absolute()), "dtype": p.info.cfg.dtype,
                          "config": hashlib.sha256(json.dumps(p.info.raw, sort_keys=True).encode()).hexdigest()})
    sync_processes("convert work folder ready")
    abstract = per_layer_abstract(p)
    mine = p.units[jax.process_index()::jax.process_count()]
    todo = [(key, ts) for key, ts in mine if not (work / key / "done").is_file()]

    def put(key, t, value):
        leaf = get_path(abstract[key], t.path)
        bf16 = leaf.dtype == BF16
        file = work / key / (".".join(t.path) + ("@bf16" if bf16 else "") + ".npy")
        if not file.is_file():  # made whole before it is named, so a killed run leaves no half-made file
            file.parent.mkdir(exist_ok=True)
            part = file.with_name(file.name + ".part")
            np.lib.format.open_memmap(part, "w+", np.uint16 if bf16 else leaf.dtype, leaf.shape)  # sparse
            os.replace(part, file)
        stored = np.lib.format.open_memmap(file, "r+")
        stored[() if t.expert is None else t.expert] = value.view(stored.dtype)
        stored.flush()
        del stored  # unmapped: the written pages leave this process

    copy_tensors(p, todo, put, lambda key, t: get_path(abstract[key], t.path).dtype, progress,
                 done=lambda key: mark_done(work / key))
    sync_processes("convert units done")
    return p


def mark_done(unit: Path) -> None:
    atomic_write_text(unit / "done", "")


def per_layer_abstract(p: Plan) -> dict[str, dict]:
    """unit -> its params' shapes and dtypes as the checkpoint stores them (one layer, not stacked)."""
    model = abstract_model(p.info.cfg, p.shipped)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    unstack = functools.partial(jax.tree.map, lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype))
    out = {"top": {name: pure[name] for name in ("embed", "lm_head", "final_norm")}}
    for layer, (g, pos, _) in slots(model).items():
        out[f"layer_{layer:05d}"] = unstack(pure["groups"][g]["blocks"][pos])
    return out


def saved_tree(p: Plan, work: Path) -> dict:
    """{"top": ..., "layers": [...]} of read-only memory maps over the work folder's files."""
    return {"top": load_unit(work / "top"),
            "layers": [load_unit(work / key) for key, _ in p.units[1:]]}


def load_unit(folder: Path) -> dict:
    """A unit's tree of read-only memory maps (bfloat16 is stored as its uint16 bits: .npy has no bfloat16)."""
    tree: dict = {}
    for file in sorted(folder.glob("*.npy")):
        name, bf16 = file.stem.removesuffix("@bf16"), file.stem.endswith("@bf16")
        node = tree
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        array = np.load(file, mmap_mode="r")
        node[leaf] = array.view(BF16) if bf16 else array
    return tree


def start_work(work: Path, source: dict) -> None:
    """Keeps `work` when it was made for the same `source`, else starts it empty."""
    stamp = work / "source.json"
    if work.is_dir() and not (stamp.is_file() and json.loads(stamp.read_text()) == source):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(source))
