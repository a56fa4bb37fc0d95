"""The scan layout, filled one layer at a time: a model's params are stacked per stage ([repeats, ...] for each
position of the stage's group), while checkpoints and Hugging Face folders hold them per layer. A loader makes the
stacked params empty, born in their shardings (`empty_params`), and writes each layer's slices into them in place
(`write_slice`, donated), so that it never holds more than the stacked params and the layer it is writing."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict
from jax.sharding import (
    Mesh,
    NamedSharding,
    PartitionSpec,
    Sharding,
    SingleDeviceSharding,
)

from ic_jax.model.config import ModelConfig
from ic_jax.model.dsa import DSAModel
from ic_jax.runtime.sharding import param_shardings


def slots(model: DSAModel) -> dict[int, tuple[int, int, int]]:
    """layer -> (stage, position in the group, repeat): where its params sit in the stacked tree."""
    return {stage.layer_id(rep, pos): (g, pos, rep) for g, stage in enumerate(model.stage_specs)
            for pos in range(len(stage.kinds)) for rep in range(stage.repeats)}


def target_shardings(model: DSAModel, mesh: Mesh | None) -> dict:
    """Every stacked param's sharding, as a pure dict: `param_shardings` on `mesh`, else this process's first
    device."""
    if mesh is not None:
        return nnx.to_pure_dict(param_shardings(model, mesh))
    one = SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: one, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def saved_shardings(cfg: ModelConfig, mesh: Mesh) -> tuple[dict, list[dict]]:
    """Where a model of `cfg` on `mesh` places the arrays of a per-layer params tree {"top", "layers"} (a checkpoint's
    layout): the flat shardings by path of the top-level params, and of each layer's (its stacked params' shardings
    without the stacking axis). All F, so that every layer's indexer has one."""
    model = nnx.eval_shape(lambda: DSAModel(cfg, "F" * cfg.num_hidden_layers, nnx.Rngs(0)))
    shardings = target_shardings(model, mesh)
    layers = [flatten_dict(jax.tree.map(lambda s: slice_sharding(s, 1), shardings["groups"][g]["blocks"][pos]))
              for _, (g, pos, _) in sorted(slots(model).items())]
    return flatten_dict(shardings), layers


def slice_sharding(sharding: Sharding, depth: int) -> Sharding:
    """How `sharding` places a slice big[i_0, ..., i_{depth-1}]: its spec without the leading `depth` axes."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[depth:]))


def empty_params(abstract: dict, shardings: dict) -> dict:
    """Zeros of every (ShapeDtypeStruct) leaf of `abstract`, born in its sharding: each device makes only its shards."""
    leaves, treedef = jax.tree.flatten(abstract)
    specs = tuple((a.shape, a.dtype, s) for a, s in zip(leaves, treedef.flatten_up_to(shardings)))
    return jax.tree.unflatten(treedef, _zeros(specs))


@functools.partial(jax.jit, static_argnums=0)
def _zeros(specs):
    """One program for all of them, compiled once per model: zeros of each (shape, dtype, sharding) in `specs`."""
    return [jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), s) for shape, dtype, s in specs]


def write_slice(big, value, index: tuple[int, ...]):
    """big[index] = value (cast to big's dtype) for every array of the tree `big` and its match in `value`, in place:
    `big` is donated. A host array of `value` is placed first as its big array's sharding places that slice (each
    process transfers only its own devices' part); a jax array should already lie there."""
    def placed(b, v):
        if not isinstance(v, np.ndarray):
            return v
        return jax.make_array_from_callback(v.shape, slice_sharding(b.sharding, len(index)), lambda i: v[i])

    return _write(big, jax.tree.map(placed, big, value), tuple(np.int32(i) for i in index))


@functools.partial(jax.jit, donate_argnums=0)
def _write(big, small, index):
    def one(b, s):
        s = s.astype(b.dtype)[(None,) * len(index)]
        return jax.lax.dynamic_update_slice(b, s, (*index, *(0,) * (b.ndim - len(index))))

    return jax.tree.map(one, big, small)
