"""Checkpoints: orbax params plus config, tokenizer and an optional default pattern, written atomically; and
the orbax-managed training state of train and distill.

Layout of a checkpoint directory:
  config.json      the model config (Hugging Face key names)
  params/          orbax tree {"top": {...}, "layers": [layer 0, layer 1, ...]}, every layer's own indexer
  pattern.json     optional default pattern ({"pattern": "FSSS..."}), used when none is given at load
  tokenizer.json   optional Hugging Face tokenizer (else byte-level)
  meta.json        free-form facts about how it was made (training steps, losses, settings, ...)
The params are pattern-free: `load_checkpoint(dir, pattern)` builds any pattern and drops unneeded indexers. It
reads one layer at a time into the stacked params, made empty in their shardings first (`runtime.stacked`): a device
never holds more than its share of the stacked params and of the layer being read.

With a mesh, `save_params` writes each array from the shards its devices hold; in a job of several processes each
writes its own shards, and process 0 alone makes, fills and swaps in the hidden folder, the others waiting at
barriers, so that the atomic replacement holds for the job as for one process.

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
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ic_jax.errors import UserError
from ic_jax.files import (
    atomic_write_text,
    claim_output_dir,
    new_temp_dir,
    publish_dir,
    read_json,
    remove_path,
)
from ic_jax.model.config import ModelConfig
from ic_jax.model.dsa import DSAModel, layer_params, top_params
from ic_jax.model.pattern import (
    PatternError,
    check_pattern,
    load_pattern_file,
    parse_pattern,
)
from ic_jax.runtime.stacked import (
    empty_params,
    saved_shardings,
    slice_sharding,
    slots,
    target_shardings,
    write_slice,
)

CHECKPOINT_FIX = "restore it from a copy or make the checkpoint again"
TOP = ("embed", "lm_head", "final_norm")  # the params outside the layers
NAME_BYTES = 255  # the longest file name: the hidden folder's name, as process 0 tells the others


def save_checkpoint(path: str | Path, model: DSAModel, *, pattern: str | None = None, tokenizer_file: Path | None = None,
                    meta: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Writes the checkpoint into a hidden sibling folder, then swaps it into place. What is at `path` is
    replaced only when it is an ic_jax checkpoint, or when `overwrite` is set."""
    tree = jax.tree.map(np.asarray, {"top": top_params(model), "layers": layer_params(model)})
    return save_params(path, model.cfg, tree, pattern=pattern, tokenizer_file=tokenizer_file, meta=meta,
                       overwrite=overwrite)


def save_params(path: str | Path, cfg: ModelConfig, tree: dict, *, mesh: Mesh | None = None,
                pattern: str | None = None, tokenizer_file: Path | None = None, meta: dict[str, Any] | None = None,
                overwrite: bool = False) -> Path:
    """`save_checkpoint` for a params tree {"top": ..., "layers": [...]} of host arrays or jax arrays. Host arrays
    are written from where they are: not deep-copied first (orbax's default) and not compressed (weights barely
    compress, and compressing holds every array's compressed copy until the write ends), so memory maps are
    read page by page as they are written and a converted model never sits whole in host memory.

    With `mesh`, host arrays are first placed in the shardings `load_checkpoint` gives them, each process reading
    only the slices its devices hold. In a job of several processes, every process calls this with the same tree:
    each writes its own shards (host arrays: process 0 writes them) and process 0 writes the rest."""
    path = claim_output_dir(path, "--out", overwrite=overwrite).absolute()
    if pattern is not None:
        check_pattern(pattern, cfg.num_hidden_layers)
    if mesh is not None:
        tree = place_layers(tree, cfg, mesh)
    first = jax.process_index() == 0
    tmp = shared_temp_dir(path)
    try:
        registry = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
            (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
        ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)).save(
            tmp / "params", args=ocp.args.PyTreeSave(tree))
        if first:
            atomic_write_text(tmp / "config.json", json.dumps(cfg.to_dict(), indent=2))
            if pattern is not None:
                atomic_write_text(tmp / "pattern.json", json.dumps({"pattern": pattern}, indent=2))
            if tokenizer_file is not None:
                shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
            atomic_write_text(tmp / "meta.json", json.dumps(meta or {}, indent=2))
            publish_dir(tmp, path)
        sync_processes("checkpoint published")  # no process goes on before the checkpoint is in place
    except BaseException:
        if first:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def shared_temp_dir(path: Path) -> Path:
    """The hidden folder to build the replacement of `path` in (`files.new_temp_dir`), made by process 0; the other
    processes of a job learn its name from process 0, which makes it before it answers."""
    if jax.process_count() == 1:
        return new_temp_dir(path)
    name = np.zeros(NAME_BYTES, np.uint8)
    if jax.process_index() == 0:
        made = new_temp_dir(path).name.encode()
        name[:len(made)] = np.frombuffer(made, np.uint8)
    name = np.asarray(multihost_utils.broadcast_one_to_all(name))
    return path.with_name(name.tobytes().rstrip(b"\0").decode())


def sync_processes(name: str) -> None:
    """Waits until every process of the job reaches the barrier `name` (the same text in each; nothing with one
    process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def place_layers(tree: dict, cfg: ModelConfig, mesh: Mesh) -> dict:
    """The params tree {"top": ..., "layers": [...]} of host arrays on `mesh`, each array in the sharding it takes in
    a model (`param_shardings`, the layer's slice of its stacked param); each process reads only the slices its
    own devices hold."""
    top, per_layer = saved_shardings(cfg, mesh)

    def placed(subtree, where):
        return jax.tree_util.tree_map_with_path(lambda path, a: jax.make_array_from_callback(
            a.shape, where[_plain(path)], lambda index: np.asarray(a[index])), subtree)

    return {"top": placed(tree["top"], top),
            "layers": [placed(layer, where) for layer, where in zip(tree["layers"], per_layer)]}


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

    `cfg`, when given, must describe the same shapes as the checkpoint's own config. The stacked params are made
    empty in their shardings (`sharding.param_shardings` on `mesh`, else this process's first device),
    then filled one layer at a time, each layer read straight into its slices' shards (each process reads what its
    devices hold): no device holds more than its share of the params and of one layer.
    """
    path = Path(path)
    saved_cfg = read_config(path)
    read_meta(path)  # not needed to build the model, but damage there means a damaged copy
    cfg = cfg or saved_cfg
    pattern = parse_pattern(pattern if pattern is not None else default_pattern(path), cfg.num_hidden_layers)
    saved = SavedParams(path, saved_cfg)
    if saved.num_layers != cfg.num_hidden_layers:
        raise UserError(f"config has {cfg.num_hidden_layers} layers but checkpoint {path} has {saved.num_layers}; "
                        f"use the checkpoint's own config")
    model = nnx.eval_shape(lambda: DSAModel(cfg, pattern, nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    abstract = flatten_dict(nnx.to_pure_dict(state))
    problem = saved.mismatch(model, abstract)
    if problem is not None:
        raise UserError(f"checkpoint {path} does not match the config: {problem}")
    shardings = flatten_dict(target_shardings(model, mesh))
    nnx.replace_by_pure_dict(state, unflatten_dict(fill_stacked(saved, model, abstract, shardings)))
    nnx.update(model, state)
    return model


def fill_stacked(saved: SavedParams, model: DSAModel, abstract: dict, shardings: dict) -> dict:
    """The stacked params of `model` (flattened: `abstract` shapes, placed by `shardings`), made empty, then filled
    from `saved` one layer at a time, each layer written into its slices in place."""
    params = flatten_dict(empty_params(unflatten_dict(abstract), unflatten_dict(shardings)))

    def args(k, sharding):
        return ocp.ArrayRestoreArgs(sharding=sharding, dtype=abstract[k].dtype)

    params.update(saved.read({k: args(k, shardings[k]) for k in abstract if k[0] in TOP}))
    for layer, (g, pos, rep) in slots(model).items():
        stacked = {k[4:]: k for k in abstract if k[:4] == ("groups", g, "blocks", pos)}
        reading = {name: args(k, slice_sharding(shardings[k], 1)) for name, k in stacked.items()}
        # the layer read is held by nothing once written: the next one is read with only the stacked params held
        written = write_slice({name: params[k] for name, k in stacked.items()}, saved.read(reading, layer), (rep,))
        params.update({k: written[name] for name, k in stacked.items()})
    return params


def read_params(path: Path, saved_cfg: ModelConfig, mesh: Mesh | None = None) -> tuple[dict, list[dict]]:
    """(top-level params, per-layer params) as saved (S layers of a converted checkpoint have no "indexer"): host
    arrays, or with `mesh` jax arrays in the shardings a model gives them (a layer's slice of its stacked param)."""
    saved = SavedParams(path, saved_cfg)
    if mesh is None:
        return saved.read_all(lambda keys: ocp.RestoreArgs(restore_type=np.ndarray))
    top, per_layer = saved_shardings(saved_cfg, mesh)

    def restore_args(keys):
        sharding = top.get(keys[1:]) if keys[0] == "top" else per_layer[keys[1]].get(keys[2:])
        if sharding is None:
            raise UserError(f"checkpoint {path}: params/{'/'.join(map(str, keys))} is not a parameter of this "
                            f"config; {CHECKPOINT_FIX}")
        return ocp.ArrayRestoreArgs(sharding=sharding)

    return saved.read_all(restore_args)


# ----------------------------------------------------------------------------------------------------------
# reading orbax trees safely


class SavedParams:
    """The params/ of checkpoint `path`, checked (`tree_problem`) and described by its metadata, then read a
    subtree at a time."""

    def __init__(self, path: Path, saved_cfg: ModelConfig):
        self.path = Path(path)
        self.directory = self.path / "params"
        self.owner = f"checkpoint {path}"
        self.checkpointer = ocp.PyTreeCheckpointer()
        problem = tree_problem(self.directory)
        if problem is not None:
            raise UserError(f"{self.owner}: {problem}; {CHECKPOINT_FIX}")
        self.tree = self._guard(lambda: self.checkpointer.metadata(self.directory.absolute()).item_metadata.tree)
        if not isinstance(self.tree, dict) or not {"top", "layers"} <= self.tree.keys():
            raise UserError(f"{self.owner}: params/ is not an ic_jax parameter tree (no top and layers); "
                            f"{CHECKPOINT_FIX}")
        # path in the saved tree ("layers", layer as an int, ...) -> array metadata
        self.leaves = {self._key(p): meta for p, meta in jax.tree_util.tree_flatten_with_path(self.tree)[0]}
        self.num_layers = len(self.tree["layers"])
        if self.num_layers != saved_cfg.num_hidden_layers:
            raise UserError(f"{self.owner}: params/ holds {self.num_layers} layers but its config.json says "
                            f"{saved_cfg.num_hidden_layers}; {CHECKPOINT_FIX}")

    def layer(self, i: int) -> dict[tuple, Any]:
        """Layer `i`'s array metadata by its path in the layer."""
        return {k[2:]: meta for k, meta in self.leaves.items() if k[:2] == ("layers", i)}

    def mismatch(self, model: DSAModel, abstract: dict[tuple, jax.ShapeDtypeStruct]) -> str | None:
        """What keeps these params from filling `model` (its flattened `abstract` params), or None. An F layer needs
        its indexer; an S layer's is not read."""
        top = {k[1:]: meta for k, meta in self.leaves.items() if k[0] == "top"}
        problem = _names_and_shapes("the top-level params", top,
                                    {k: a.shape for k, a in abstract.items() if k[0] in TOP})
        if problem is not None:
            return problem
        for layer, (g, pos, _) in slots(model).items():
            want = {k[4:]: a.shape[1:] for k, a in abstract.items() if k[:4] == ("groups", g, "blocks", pos)}
            got = self.layer(layer)
            full = any(k[0] == "indexer" for k in want)
            if full and not any(k[0] == "indexer" for k in got):
                return f"layer {layer} is F in the pattern but has no indexer weights"
            problem = _names_and_shapes(f"layer {layer}", {k: meta for k, meta in got.items()
                                                           if full or k[0] != "indexer"}, want)
            if problem is not None:
                return problem
        return None

    def read(self, args: dict[tuple, ocp.RestoreArgs], layer: int | None = None) -> dict[tuple, Any]:
        """The arrays of the top-level params (or of layer `layer`) at the paths `args` names, each read by its
        args; nothing else is read."""
        prefix = ("top",) if layer is None else ("layers", layer)
        got = self._restore({prefix + path: a for path, a in args.items()})
        return {k[len(prefix):]: array for k, array in got.items()}

    def read_all(self, restore_args) -> tuple[dict, list[dict]]:
        """(top, layers) of every saved array, each read with `restore_args(its path)`."""
        got = self._restore({k: restore_args(k) for k in self.leaves})
        top = unflatten_dict({k[1:]: a for k, a in got.items() if k[0] == "top"})
        return top, [unflatten_dict({k[2:]: a for k, a in got.items() if k[:2] == ("layers", i)})
                     for i in range(self.num_layers)]

    def _restore(self, args: dict[tuple, ocp.RestoreArgs]) -> dict[tuple, Any]:
        """The arrays at the paths `args` names, each restored by its args; the others are left unread (orbax
        placeholders)."""
        restore_args = jax.tree_util.tree_map_with_path(lambda p, _: args.get(self._key(p), ocp.PLACEHOLDER),
                                                        self.tree)
        item = jax.tree.map(lambda a: ocp.PLACEHOLDER if a is ocp.PLACEHOLDER else 0, restore_args)
        got = self._guard(lambda: self.checkpointer.restore(
            self.directory.absolute(), args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args)))
        flat = jax.tree_util.tree_flatten_with_path(got)[0]
        return {k: a for k, a in ((self._key(p), a) for p, a in flat) if k in args}

    @staticmethod
    def _key(leaf_path) -> tuple:
        """An orbax key path as plain keys, the layer as an int (orbax may key a list by "0", "1", ...)."""
        k = _plain(leaf_path)
        return (k[0], int(k[1]), *k[2:]) if k[0] == "layers" else k

    def _guard(self, read):
        try:
            return read()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any reader failure on checked files is damage we cannot name better
            raise UserError(f"{self.owner}: params/ cannot be read ({_first_line(e)}); {CHECKPOINT_FIX}") from None


def _names_and_shapes(what: str, got: dict[tuple, Any], want: dict[tuple, tuple]) -> str | None:
    """What differs between the saved arrays `got` (path -> metadata) and the shapes `want` (path -> shape)."""
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys(), key=str)
    if missing or extra:
        name = "/".join(map(str, (missing or extra)[0]))
        return f"{what}: {'no ' + name if missing else name + ' is not a parameter of this config'}"
    for k, shape in want.items():
        if tuple(got[k].shape) != tuple(shape):
            return f"{what}: {'/'.join(map(str, k))} has shape {tuple(got[k].shape)}, the config needs {tuple(shape)}"
    return None


def _plain(path) -> tuple:
    """A jax key path as plain keys: names and indices."""
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


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
