"""Where a command's model comes from: a checkpoint folder (the embedded model by default) or random weights of a
config, as the model flags of `generate` and `jobs` say."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
from flax import nnx

from ic_jax.errors import UserError
from ic_jax.model.config import load_config
from ic_jax.model.dsa import DSAModel
from ic_jax.model.pattern import parse_pattern
from ic_jax.package_data import DEFAULT_CKPT
from ic_jax.runtime.checkpoint import load_checkpoint
from ic_jax.runtime.hf.config import is_hf_folder
from ic_jax.runtime.hf.device import load_model as load_hf_model
from ic_jax.runtime.sharding import MESH_AXES, init_sharded, make_mesh


def load_model(a, mesh=None) -> tuple[DSAModel, Path | None]:
    """The model and its checkpoint folder (flags --ckpt, --config, --init, --pattern, --seed): an ic_jax checkpoint,
    a Hugging Face folder (converted into device memory as it loads) or random weights; params are born sharded on
    `mesh`."""
    if a.init:
        cfg = load_config(a.config)
        return random_model(cfg, parse_pattern(a.pattern, cfg.num_hidden_layers), a.seed, mesh), None
    ckpt = a.ckpt or DEFAULT_CKPT
    if a.ckpt is None and not DEFAULT_CKPT.is_dir():
        raise UserError(f"no embedded model at {DEFAULT_CKPT}; pass --ckpt DIR or --config tiny --init random")
    if is_hf_folder(ckpt):
        if a.config:
            raise UserError(f"--ckpt {ckpt} is a Hugging Face folder, whose config.json is used; drop --config")
        return load_hf_model(ckpt, a.pattern, mesh, progress=sys.stderr.isatty()), ckpt
    cfg = load_config(a.config) if a.config else None
    return load_checkpoint(ckpt, a.pattern, cfg, mesh=mesh), ckpt


def random_model(cfg, pattern: str, seed: int, mesh=None) -> DSAModel:
    """Random weights made on the devices under `jax.jit`, each holding only its shards of `mesh` (no host copy);
    without a mesh, all on the default device. Never built eagerly: an eager build materialises each parameter in
    float32 before casting it, twice the bf16 weights of a stack at once (an out-of-memory on one H200 for the 30B
    shape's experts)."""
    one_device = make_mesh(dict.fromkeys(MESH_AXES, 1), jax.devices()[:1])
    return init_sharded(lambda: DSAModel(cfg, pattern, nnx.Rngs(seed)), mesh if mesh is not None else one_device)
