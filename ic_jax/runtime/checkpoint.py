"""Checkpoints: orbax params plus config, tokenizer and an optional default pattern, written atomically; and
the orbax-managed training state of train and distill.

Layout of a checkpoint directory:
  config.json      the model config (Hugging Face key names)
  params/          orbax tree {"top": {...}, "layers": [layer 0, layer 1, ...]}, every layer's own indexer
  pattern.json     optional default pattern ({"pattern": "FSSS..."}), used when none is given at load
  tokenizer.json   optional Hugging Face tokenizer (else byte-level)
  meta.json        free-form facts about how it was made (training steps, losses, settings, ...)
The params are pattern-free: `load_checkpoint(dir, pattern)` builds any pattern and drops unneeded indexers.

A damaged checkpoint or state is one UserError naming it and what is wrong. Saved arrays are checked before
orbax reads them: when orbax's reader fails halfway, its I/O threads print tracebacks ("Event loop is closed")
long after the error has been handled.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from ic_jax.errors import UserError
from ic_jax.files import atomic_write_text, claim_output_dir, new_temp_dir, publish_dir, read_json, remove_path
from ic_jax.model.config import ModelConfig
from ic_jax.model.dsa import Block, DSAModel, build_model, layer_params, top_params
from ic_jax.model.pattern import LayerKind, PatternError, check_pattern, load_pattern_file, parse_pattern
from ic_jax.runtime.sharding import is_variable, shard_model, spec_for

CHECKPOINT_FIX = "restore it from a copy or make the checkpoint again"


def save_checkpoint(path: str | Path, model: DSAModel, *, pattern: str | None = None, tokenizer_file: Path | None = None,
                    meta: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Writes the checkpoint into a hidden sibling folder, then swaps it into place. What is at `path` is
    replaced only when it is an ic_jax checkpoint, or when `overwrite` is set."""
    tree = jax.tree.map(np.asarray, {"top": top_params(model), "layers": layer_params(model)})
    return save_params(path, model.cfg, tree, pattern=pattern, tokenizer_file=tokenizer_file, meta=meta,
                       overwrite=overwrite)


def save_params(path: str | Path, cfg: ModelConfig, tree: dict, *, pattern: str | None = None,
                tokenizer_file: Path | None = None, meta: dict[str, Any] | None = None,
                overwrite: bool = False) -> Path:
    """`save_checkpoint` for a params tree {"top": ..., "layers": [...]} of host arrays or jax arrays. Host arrays
    are written from where they are: not deep-copied first (orbax's default) and not compressed (weights barely
    compress, and compressing holds every array's compressed copy until the write ends), so memory maps are
    read page by page as they are written and a converted model never sits whole in host memory."""
    path = claim_output_dir(path, "--out", overwrite=overwrite).absolute()
    if pattern is not None:
        check_pattern(pattern, cfg.num_hidden_layers)
    tmp = new_temp_dir(path)
    try:
        registry = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
            (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
        ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)).save(
            tmp / "params", args=ocp.args.PyTreeSave(tree))
        atomic_write_text(tmp / "config.json", json.dumps(cfg.to_dict(), indent=2))
        if pattern is not None:
            atomic_write_text(tmp / "pattern.json", json.dumps({"pattern": pattern}, indent=2))
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        atomic_write_text(tmp / "meta.json", json.dumps(meta or {}, indent=2))
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "params").is_dir():
        raise UserError(f"checkpoint {str(path)!r} not found (a checkpoint directory holds config.json and params/)")
    d = read_json(path / "config.json", f"checkpoint {path}: config.json", fix=CHECKPOINT_FIX)
    return ModelConfig.from_dict(d, source=str(path / "config.json"))


def read_meta(path: str | Path) -> dict:
    """The checkpoint's meta.json ({} when it has none)."""
    return read_json(Path(path) / "meta.json", f"checkpoint {path}: meta.json", fix=CHECKPOINT_FIX) or {}


def trained_seq_len(ckpt: str | Path, default: int = 256) -> int:
    """The context the checkpoint was trained at (its meta.json "seq_len"), else `default`."""
    seq_len = read_meta(ckpt).get("seq_len", default)
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise UserError(f"checkpoint {ckpt}: meta.json has seq_len {seq_len!r}, not a positive integer; "
                        f"fix it or pass --seq-len")
    return seq_len


def default_pattern(path: str | Path) -> str | None:
    """The checkpoint's pattern.json pattern, checked against its layer count; None when it has none."""
    file = Path(path) / "pattern.json"
    if not file.is_file():
        return None
    pattern = load_pattern_file(str(file))
    try:
        return check_pattern(pattern, read_config(path).num_hidden_layers)
    except PatternError as e:
        raise UserError(f"checkpoint {path}: pattern.json is not valid for it ({e})") from None


def load_checkpoint(path: str | Path, pattern: str | None = None, cfg: ModelConfig | None = None,
                    mesh: Mesh | None = None) -> DSAModel:
    """Builds the model for `pattern` (any accepted spelling; default: the checkpoint's, else all F).

    `cfg`, when given, must describe the same shapes as the checkpoint's own config. With `mesh` every array is
    read straight into its shards (each process reads what its devices hold) and the params come back placed by
    `sharding.param_shardings`.
    """
    path = Path(path)
    saved_cfg = read_config(path)
    read_meta(path)  # not needed to build the model, but damage there means a damaged copy
    cfg = cfg or saved_cfg
    pattern = parse_pattern(pattern if pattern is not None else default_pattern(path), cfg.num_hidden_layers)
    top, layers = read_params(path, saved_cfg, mesh)
    if len(layers) != cfg.num_hidden_layers:
        raise UserError(f"config has {cfg.num_hidden_layers} layers but checkpoint {path} has {len(layers)}; "
                        f"use the checkpoint's own config")
    try:
        model = build_model(cfg, pattern, layers, top)
    except (ValueError, KeyError) as e:
        raise UserError(f"checkpoint {path} does not match the config: {e}") from None
    return model if mesh is None else shard_model(model, mesh)  # stacking the layers kept their shards


def read_params(path: Path, saved_cfg: ModelConfig, mesh: Mesh | None = None) -> tuple[dict, list[dict]]:
    """(top-level params, per-layer params) as saved: S layers of a converted checkpoint have no "indexer".
    With `mesh`, each array is read into its shards (`saved_shardings`)."""
    placement = None if mesh is None else functools.partial(saved_shardings, saved_cfg, mesh)
    tree = restore_tree(path / "params", f"checkpoint {path}", CHECKPOINT_FIX, placement)
    if not isinstance(tree, dict) or not {"top", "layers"} <= tree.keys():
        raise UserError(f"checkpoint {path}: params/ is not an ic_jax parameter tree (no top and layers); "
                        f"{CHECKPOINT_FIX}")
    layers = tree["layers"]
    if isinstance(layers, dict):  # orbax may give a list back as a dict keyed "0", "1", ...
        layers = [layers.get(str(i)) for i in range(len(layers))]
    if len(layers) != saved_cfg.num_hidden_layers:
        raise UserError(f"checkpoint {path}: params/ holds {len(layers)} layers but its config.json says "
                        f"{saved_cfg.num_hidden_layers}; {CHECKPOINT_FIX}")
    return tree["top"], layers


# ----------------------------------------------------------------------------------------------------------
# reading orbax trees safely


def saved_shardings(cfg: ModelConfig, mesh: Mesh, saved):
    """ArrayRestoreArgs for the saved param tree (its orbax metadata `saved`): each array's NamedSharding from its
    logical axes, a layer's params as in a block of its kind without the stacking axis (an S layer of a converted
    checkpoint has no indexer: the F kind names all it has)."""
    def axes_by_path(module) -> dict[tuple, tuple[str, ...]]:
        flat = jax.tree_util.tree_flatten_with_path(nnx.state(module, nnx.Param), is_leaf=is_variable)[0]
        return {_plain(path): v.logical_axes for path, v in flat}

    top = axes_by_path(nnx.eval_shape(lambda: DSAModel(cfg, "F" * cfg.num_hidden_layers, nnx.Rngs(0))))
    block = {moe: axes_by_path(nnx.eval_shape(lambda moe=moe: Block(cfg, LayerKind(full=True, moe=moe), nnx.Rngs(0))))
             for moe in (False, True)}

    def restore_args(path, meta):
        keys = _plain(path)
        axes = top.get(keys[1:]) if keys[0] == "top" else block[cfg.is_moe(int(keys[1]))].get(keys[2:])
        if axes is None or len(axes) != len(meta.shape):
            raise UserError(f"params/{'/'.join(map(str, keys))} is not a parameter of this config; {CHECKPOINT_FIX}")
        sharding = NamedSharding(mesh, spec_for(axes, tuple(meta.shape), mesh))
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(meta.shape))

    return jax.tree_util.tree_map_with_path(restore_args, saved)


def _plain(path) -> tuple:
    """A jax key path as plain keys: names and indices."""
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def restore_tree(directory: Path, owner: str, fix: str, placement=None):
    """The orbax PyTree saved at `directory`; `owner` names what it belongs to in the error. `placement` (the saved
    tree's metadata -> a tree of ArrayRestoreArgs), when given, says where each array is read to."""
    problem = tree_problem(directory)
    if problem is None:
        checkpointer = ocp.PyTreeCheckpointer()
        try:
            if placement is None:
                return checkpointer.restore(directory.absolute())
            args = placement(checkpointer.metadata(directory.absolute()).item_metadata.tree)
            return checkpointer.restore(directory.absolute(), args=ocp.args.PyTreeRestore(restore_args=args))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any reader failure on checked files is damage we cannot name better
            problem = f"{directory.name}/ cannot be read ({_first_line(e)})"
    raise UserError(f"{owner}: {problem}; {fix}")


def tree_problem(directory: Path) -> str | None:
    """What is wrong with the orbax PyTree save at `directory`, or None. Checks its metadata, and that the last
    byte of every stored value can be read, which finds cut-short files without reading the arrays."""
    name = directory.name
    if not directory.is_dir():
        return f"{name}/ is missing"
    if next(directory.iterdir(), None) is None:
        return f"{name}/ is empty"
    if not (directory / "_METADATA").is_file():
        return f"{name}/_METADATA is missing"
    try:
        metadata = json.loads((directory / "_METADATA").read_bytes())
    except ValueError:
        metadata = None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("tree_metadata"), dict):
        return f"{name}/_METADATA is damaged"
    if not metadata.get("use_ocdbt", True):
        return None
    try:
        store = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": f"{directory.absolute()}/"}}
                                ).result()
        keys = store.list().result()
    except Exception as e:  # noqa: BLE001 - tensorstore reports every kind of damage as ValueError or OSError
        return f"{name}/ has a damaged array index ({_first_line(e)})"
    if not keys:
        return f"{name}/manifest.ocdbt is missing or empty"
    tails = [store.read(k, byte_range=slice(-1, None)) for k in keys]  # synchronous: no event loop involved
    for key, tail in zip(keys, tails):
        try:
            tail.result()
        except Exception:  # noqa: BLE001
            try:
                store.read(key).result()  # an empty value has no last byte; anything else is damage
            except Exception as e:  # noqa: BLE001
                return f"{name}/ is cut short or damaged: {key.decode(errors='replace')} ({_first_line(e)})"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


# ----------------------------------------------------------------------------------------------------------
# training state


class StateStore:
    """Orbax-managed training state: params and optimizer leaves, the loss history, and the run's settings.

    The last two saves are kept; a damaged newest save falls back to the one before. A folder that holds
    anything else, or another run's state, is refused unless `overwrite`, which starts the state again."""

    def __init__(self, path: Path, settings: dict, overwrite: bool = False):
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the saved JSON
        self.overwrite = overwrite
        self.path = Path(path).absolute()
        foreign = self.path.exists() and not _looks_like_state(self.path)
        if foreign and not overwrite:
            raise UserError(f"{path} exists and is not a training state (it holds other files); "
                            f"move it away or pass --overwrite to replace it")
        if foreign:
            claim_output_dir(self.path, "state folder", overwrite=True)  # never the current or home folder
            remove_path(self.path)

    @functools.cached_property
    def mngr(self) -> ocp.CheckpointManager:
        """Made on first use, so that a run refused before its first step leaves no folder behind."""
        return ocp.CheckpointManager(self.path, options=ocp.CheckpointManagerOptions(max_to_keep=2))

    def restore(self, template):
        """(step, tree, history) of the newest readable save, or (0, template, []) when there is none."""
        damaged = []
        for step in sorted(self.mngr.all_steps(), reverse=True):
            got, problem = self._read(step, template)
            if problem is not None:
                damaged.append((step, problem))
                continue
            if got.info["settings"] != self.settings:
                if not self.overwrite:
                    raise UserError(f"{self.path} holds a run with other settings "
                                    f"({json.dumps(got.info['settings'])}); delete it, choose another --out "
                                    f"or pass --overwrite to start again")
                return self._start_again(template)
            for bad, _ in damaged:  # else orbax would refuse to save those steps again
                self.mngr.delete(bad)
            if damaged:
                print(f"warning: training state step {damaged[0][0]} in {self.path} is damaged ({damaged[0][1]}); "
                      f"resuming from step {step}", file=sys.stderr)
            leaves = [got.leaves[str(i)] for i in range(len(got.leaves))]
            return step, jax.tree.unflatten(jax.tree.structure(template), leaves), got.info["history"]
        if damaged and not self.overwrite:
            step, problem = damaged[0]
            raise UserError(f"training state {self.path} is damaged (step {step}: {problem}) and has no readable "
                            f"earlier step; delete it or pass --overwrite to start again")
        return self._start_again(template)

    def _start_again(self, template):
        for step in self.mngr.all_steps():
            self.mngr.delete(step)
        return 0, template, []

    def _read(self, step: int, template):
        """(restored, None), or (None, what is wrong with the save of `step`)."""
        problem = tree_problem(self.path / str(step) / "leaves")
        if problem is not None:
            return None, problem
        try:
            got = self.mngr.restore(step, args=ocp.args.Composite(
                leaves=ocp.args.StandardRestore(), info=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - any reader failure on checked files is damage
            return None, _first_line(e)
        if not isinstance(got.info, dict) or not {"settings", "history"} <= got.info.keys():
            return None, "its info has no settings and history"
        want = [np.shape(x) for x in jax.tree.leaves(template)]
        if (set(got.leaves) != {str(i) for i in range(len(want))}
                or [np.shape(got.leaves[str(i)]) for i in range(len(want))] != want):
            return None, "its arrays do not fit this model"
        return got, None

    def save(self, step: int, tree, history: list):
        leaves = {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}
        self.mngr.save(step, args=ocp.args.Composite(
            leaves=ocp.args.StandardSave(leaves),
            info=ocp.args.JsonSave({"settings": self.settings, "history": history})))
        self.mngr.wait_until_finished()


def _looks_like_state(path: Path) -> bool:
    """Only what orbax's CheckpointManager writes: step folders (and their temporary forms) and metadata/."""
    return path.is_dir() and all(p.is_dir() and (p.name == "metadata" or re.match(r"\d+(\.|$)", p.name))
                                 for p in path.iterdir())
