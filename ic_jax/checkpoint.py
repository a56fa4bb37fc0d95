"""Checkpoints: orbax params plus config, tokenizer and an optional default pattern, written atomically.

Layout of a checkpoint directory:
  config.json      the model config (Hugging Face key names)
  params/          orbax tree {"top": {...}, "layers": [layer 0, layer 1, ...]}, every layer's own indexer
  pattern.json     optional default pattern ({"pattern": "FSSS..."}), used when none is given at load
  tokenizer.json   optional Hugging Face tokenizer (else byte-level)
  meta.json        free-form facts about how it was made (training steps, losses, ...)
The params are pattern-free: `load_checkpoint(dir, pattern)` builds any pattern and drops unneeded indexers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ic_jax.config import ModelConfig
from ic_jax.errors import UserError
from ic_jax.model import DSAModel, build_model, layer_params, top_params
from ic_jax.pattern import check_pattern, parse_pattern


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(path: str | Path, model: DSAModel, *, pattern: str | None = None, tokenizer_file: Path | None = None,
                    meta: dict[str, Any] | None = None) -> Path:
    """Writes the checkpoint into a temporary sibling directory, then swaps it into place."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        tree = {"top": top_params(model), "layers": layer_params(model)}
        ocp.PyTreeCheckpointer().save(tmp / "params", jax.tree.map(np.asarray, tree))
        (tmp / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2))
        if pattern is not None:
            check_pattern(pattern, model.cfg.num_hidden_layers)
            (tmp / "pattern.json").write_text(json.dumps({"pattern": pattern}, indent=2))
        if tokenizer_file is not None:
            shutil.copy(tokenizer_file, tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(json.dumps(meta or {}, indent=2))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "params").is_dir():
        raise UserError(f"checkpoint {str(path)!r} not found (a checkpoint directory holds config.json and params/)")
    return ModelConfig.from_dict(json.loads((path / "config.json").read_text()), source=str(path / "config.json"))


def default_pattern(path: str | Path) -> str | None:
    p = Path(path) / "pattern.json"
    return json.loads(p.read_text())["pattern"] if p.is_file() else None


def load_checkpoint(path: str | Path, pattern: str | None = None, cfg: ModelConfig | None = None) -> DSAModel:
    """Builds the model for `pattern` (any accepted spelling; default: the checkpoint's, else all F).

    `cfg`, when given, must describe the same shapes as the checkpoint's own config.
    """
    path = Path(path)
    saved_cfg = read_config(path)
    cfg = cfg or saved_cfg
    pattern = parse_pattern(pattern if pattern is not None else default_pattern(path), cfg.num_hidden_layers)
    tree = ocp.PyTreeCheckpointer().restore(path.absolute() / "params")
    layers = [tree["layers"][str(i)] if isinstance(tree["layers"], dict) else tree["layers"][i]
              for i in range(len(tree["layers"]))]
    if len(layers) != cfg.num_hidden_layers:
        raise UserError(f"config has {cfg.num_hidden_layers} layers but checkpoint {path} has {len(layers)}; "
                        f"use the checkpoint's own config")
    try:
        model = build_model(cfg, pattern, layers, tree["top"])
    except ValueError as e:
        raise UserError(f"checkpoint {path} does not match the config: {e}") from None
    return model
