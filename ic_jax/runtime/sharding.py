"""Sharding: logical axis names on every parameter, mapped to mesh axes by one table of rules.

The mesh has axes ("data", "tensor", "expert"). Parameters are placed with `NamedSharding`s derived from
their `logical_axes` metadata; `jax.jit` then partitions the computation to follow them (the "pjit"
model), for one host or many (`jax.distributed.initialize()` first, see `init_distributed`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ic_jax.errors import UserError
from ic_jax.model.cache import BATCH_AXIS, LayerCache, is_layer_cache
from ic_jax.ops.common import split_axes
from ic_jax.ops.grouped_matmul.sharding import EXPERT_PARALLEL_DATA, expert_axes

MESH_AXES = ("data", "tensor", "expert")

# logical axis -> mesh axis, or mesh axes that split it together, or a function of the mesh giving them (None =
# replicated). Attention heads, MLP and vocab split over "tensor"; routed experts over "expert", and over "data" too
# on a mesh made with expert_parallel_data (`expert_axes`, the axes the MoE op runs them over); the batch over
# "data". Latent ranks and head dims stay whole.
RULES: dict[str, str | tuple[str, ...] | Callable[[Mesh], tuple[str, ...]] | None] = {
    "batch": "data",
    "layers": None,
    "vocab": "tensor",
    "embed": None,
    "heads": "tensor",
    "index_heads": "tensor",
    "head_dim": None,
    "index_dim": None,
    "q_lora": None,
    "kv_lora": None,
    "mlp": "tensor",
    "experts": expert_axes,
    "norm": None,
    "positions": None,  # cache buffers: a sequence's positions stay on the devices that hold its batch row
    "rope_dim": None,
    "scale": None,
}


def parse_mesh(spec: str) -> dict[str, int]:
    """'data=2,tensor=4' -> {"data": 2, "tensor": 4, "expert": 1}."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, spec.split(",")):
        name, _, n = part.partition("=")
        if name not in sizes or not n.isdigit() or int(n) < 1:
            raise UserError(f"--mesh {spec!r}: write axis=size pairs over {', '.join(MESH_AXES)}, e.g. data=2,tensor=4")
        sizes[name] = int(n)
    return sizes


def check_expert_parallel_data(sizes: dict[str, int]) -> None:
    """Refuses --expert-parallel-data on a mesh whose data axis has one device: there is nothing to split over."""
    if sizes["data"] == 1:
        raise UserError("--expert-parallel-data splits the routed experts over the data axis of --mesh, which has one "
                        "device; give --mesh data=N with N > 1, or drop --expert-parallel-data")


def make_mesh(sizes: dict[str, int], devices=None, expert_parallel_data: bool = False) -> Mesh:
    """The mesh of axes MESH_AXES. With `expert_parallel_data` (SGLang's data-parallel attention with expert-parallel
    MoE) the routed experts split over "data" as well as "expert": the mesh then has one more axis, of size 1, named
    EXPERT_PARALLEL_DATA, so that the one mesh every command passes on carries the layout both to where params are
    placed (RULES) and to the MoE op (`expert_axes`), which agree by construction."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    need = int(np.prod(list(sizes.values())))
    if need != devices.size:
        raise UserError(f"mesh {sizes} needs {need} devices but {devices.size} are visible; make the sizes multiply "
                        f"to {devices.size}")
    if expert_parallel_data:
        check_expert_parallel_data(sizes)
    extra = (EXPERT_PARALLEL_DATA,) if expert_parallel_data else ()
    return Mesh(devices.reshape([sizes[a] for a in MESH_AXES] + [1] * len(extra)), MESH_AXES + extra)


def spec_for(logical: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh, rules=RULES) -> PartitionSpec:
    """The PartitionSpec of one array. A dim splits over its rule's mesh axes of size > 1 whose product divides it
    (`split_axes`, as the per-shard ops cut their operands), each mesh axis used once per array; else it stays
    whole."""
    out, used = [], set()
    for name, dim in zip(logical, shape):
        wanted = rules.get(name) or ()
        wanted = wanted(mesh) if callable(wanted) else (wanted,) if isinstance(wanted, str) else wanted
        axes = split_axes(mesh, dim, *(a for a in wanted if a not in used))
        used.update(axes or ())
        out.append(axes[0] if axes and len(axes) == 1 else axes)
    return PartitionSpec(*out)


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(model: nnx.Module, mesh: Mesh, rules=RULES):
    """A State of NamedShardings, one per parameter, from its `logical_axes` metadata."""
    return jax.tree.map(lambda v: NamedSharding(mesh, spec_for(v.logical_axes, v.get_value().shape, mesh, rules)),
                        nnx.state(model, nnx.Param), is_leaf=is_variable)


def shard_model(model: nnx.Module, mesh: Mesh, rules=RULES) -> nnx.Module:
    """Places every parameter of `model` on `mesh` (in place) and returns it."""
    state = nnx.state(model, nnx.Param)
    shardings = param_shardings(model, mesh, rules)
    nnx.update(model, jax.tree.map(lambda v, s: v.replace(jax.device_put(v.get_value(), s)), state, shardings,
                                   is_leaf=is_variable))
    return model


def init_sharded(build: Callable[[], nnx.Module], mesh: Mesh, rules=RULES) -> nnx.Module:
    """The module `build()` makes, born sharded: built under `jax.jit` with each parameter's sharding as its output
    sharding, so that every device computes and holds only its own shards. (The values are not bit-equal to an
    eager unsharded build's: compiled and eager random initialisers may round differently.)"""
    graphdef, abstract = nnx.split(nnx.eval_shape(build))

    def sharding(v):
        axes = getattr(v, "logical_axes", None)
        return NamedSharding(mesh, spec_for(axes, v.get_value().shape, mesh, rules) if axes else PartitionSpec())

    shardings = jax.tree.map(sharding, abstract, is_leaf=is_variable)
    state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def splits_as_is(batch: int, data: int) -> bool:
    """Whether `batch` sequences run on `data` devices of the batch's mesh axis without padding: their rows split
    evenly, or it is one sequence, whose prefill splits each chunk's tokens over that axis instead
    (`chunk_sharding`) against a cache whole on each of its devices."""
    return batch % data == 0 or batch == 1


def cache_batch(batch: int, mesh: Mesh | None, rules=RULES) -> int:
    """The batch a cache is built for: `batch` as it is where it `splits_as_is`, else padded up to a multiple of the
    batch's mesh axis, so that its rows split over that axis (`Engine` fills the extra rows with a one-token prompt
    and drops their outputs)."""
    n = mesh.shape[rules["batch"]] if mesh is not None else 1
    return batch if splits_as_is(batch, n) else -(-batch // n) * n


def cache_shardings(cache, mesh: Mesh, rules=RULES):
    """The NamedSharding of every buffer of `cache` (arrays or ShapeDtypeStructs, see `ic_jax.model.cache`), from
    each buffer's logical axes by the rules of the params: the batch over "data" (one sequence: whole on every
    device of "data", see `cache_batch`), the rest whole. Any other batch that does not split is an error, never a
    cache left whole on every device: pad it first (`cache_batch`)."""
    def layer(c: LayerCache) -> LayerCache:
        batch, axis = c.kv.shape[BATCH_AXIS], rules["batch"]
        if batch != cache_batch(batch, mesh, rules):
            raise ValueError(f"a cache of batch {batch} does not split over the {mesh.shape[axis]} devices of "
                             f"{axis!r}; build it for cache_batch(batch, mesh)")
        return dataclasses.replace(c, **{name: NamedSharding(mesh, spec_for(axes, x.shape, mesh, rules))
                                         for name, (x, axes) in c.buffers().items()})

    return jax.tree.map(layer, cache, is_leaf=is_layer_cache)


def chunk_sharding(mesh: Mesh, batch: int, chunk: int, rules=RULES) -> NamedSharding:
    """How a prefill chunk's tokens [batch, chunk] lie: the batch over "data" when it splits; else (one long prompt)
    the chunk's tokens over "data", a sequence-parallel prefill: every device runs the whole network on its part of
    the chunk against a cache that is whole on each of them, and only the chunk's new cache rows are gathered."""
    axis = rules["batch"]
    n = mesh.shape[axis]
    if batch % n == 0:
        return NamedSharding(mesh, PartitionSpec(axis, None))
    return NamedSharding(mesh, PartitionSpec(None, axis if chunk % n == 0 else None))


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """Joins a multi-host job, one process per host. What is not given here jax reads from the environment
    (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or detects (SLURM, TPU pod slices)."""
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except (ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--distributed could not join a job ({reason}); pass --coordinator HOST:PORT, "
                        f"--num-processes and --process-id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                        f"JAX_PROCESS_ID, or run under SLURM / on a TPU pod), or drop --distributed") from None
    native_prints_to_stderr()


def native_prints_to_stderr() -> None:
    """Native libraries of a job print to file descriptor 1 (gloo, jax's CPU collectives, reports its connections
    there): point it at stderr, so that stdout (`sys.stdout`, on a copy of the descriptor) holds only the command's
    output. Processes other than 0 write nothing to stdout."""
    sys.stdout.flush()
    out = os.dup(1)
    os.dup2(2, 1)
    if jax.process_index() != 0:
        os.close(out)
        out = os.open(os.devnull, os.O_WRONLY)
    sys.stdout = open(out, "w", encoding=sys.stdout.encoding, errors=sys.stdout.errors)  # noqa: SIM115 - for life


def mesh_from_args(a) -> Mesh | None:
    """The mesh of a command's parallelism flags (`ic_jax.cli.add_mesh_arguments`); None without --mesh. With
    --distributed the job is joined first, so the mesh spans every process's devices, and only process 0 keeps
    its stdout (every process runs the same program; one prints it)."""
    sizes = parse_mesh(a.mesh)  # bad flags end before any job is joined
    if a.expert_parallel_data:
        check_expert_parallel_data(sizes)
    if a.distributed:
        init_distributed(a.coordinator, a.num_processes, a.process_id)
        if jax.process_index() != 0:
            sys.stdout = open(os.devnull, "w")
    return make_mesh(sizes, expert_parallel_data=a.expert_parallel_data) if a.mesh else None


def splitting_chunk(chunk: int, mesh: Mesh | None, rules=RULES) -> int:
    """`chunk` rounded up to a multiple of the batch's mesh axis, so that one prompt's chunk splits over it
    (`chunk_sharding`: sequence-parallel prefill); `chunk` itself without a mesh."""
    n = mesh.shape[rules["batch"]] if mesh is not None else 1
    return -(-chunk // n) * n


def check_data_split(n: int, mesh: Mesh | None, what: str, one_prompt_ok: bool = False) -> None:
    """Refuses `n` rows (a batch, a number of windows) that do not split evenly over the mesh's "data" axis: rows
    left whole on every device would compute and hold `data` times the work. With `one_prompt_ok`, one sequence
    passes: its prefill splits each chunk's tokens over "data" instead (`splits_as_is`)."""
    data = mesh.shape["data"] if mesh is not None else 1
    if not (splits_as_is(n, data) if one_prompt_ok else n % data == 0):
        raise UserError(f"{what} {n} does not split over the {data} devices of the data axis of --mesh; give a "
                        f"multiple of {data} or a --mesh with another data size")


def put_batch(rows: np.ndarray, mesh: Mesh | None, axis: int = 0, rules=RULES) -> jax.Array:
    """A host array on the mesh with its batch `axis` split over the batch's mesh axis (the other axes whole): each
    device takes only its rows, so every process of a multi-host job passes the same array. Without a mesh, on the
    default device."""
    if mesh is None:
        return jax.device_put(rows)
    spec = [None] * rows.ndim
    spec[axis] = rules["batch"]
    return jax.make_array_from_callback(rows.shape, NamedSharding(mesh, PartitionSpec(*spec)), lambda i: rows[i])
