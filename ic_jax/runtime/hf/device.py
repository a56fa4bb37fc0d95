"""A Hugging Face folder straight into device memory: `load_model` converts it tensor by tensor into the stacked
parameters of the model for a pattern, sharded over a mesh when one is given, with no copy on disk and one tensor
in host memory at a time."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ic_jax.model.dsa import DSAModel
from ic_jax.runtime.hf.names import get_path
from ic_jax.runtime.hf.reading import (
    abstract_model,
    copy_tensors,
    plan,
    run_pattern,
    slots,
    unit_layer,
)
from ic_jax.runtime.sharding import param_shardings


def load_model(hf_dir: Path, pattern: str | None = None, mesh=None, progress: bool = False) -> DSAModel:
    """The model for `pattern` (default: the checkpoint's schedule) with the folder's weights, converted tensor by
    tensor into its stacked parameters on the device, each parameter sharded on `mesh` (see `param_shardings`) when
    one is given. Indexers of layers that run S are not read."""
    p = plan(hf_dir)
    pattern = run_pattern(p, pattern, str(hf_dir))
    model = abstract_model(p.info.cfg, pattern)
    state = nnx.state(model, nnx.Param)
    abstract = nnx.to_pure_dict(state)
    if mesh is None:
        params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
    else:
        shardings = nnx.to_pure_dict(param_shardings(model, mesh))
        params = jax.tree.map(lambda a, s: jax.jit(functools.partial(jnp.zeros, a.shape, a.dtype),
                                                   out_shardings=s)(), abstract, shardings)
    where = slots(model)

    def locate(key, t):
        if key == "top":
            return t.path, ()
        g, pos, rep = where[unit_layer(key)]
        index = (rep,) if t.expert is None else (rep, t.expert)
        return ("groups", g, "blocks", pos) + t.path, index

    def put(key, t, value):
        path, index = locate(key, t)
        *parents, name = path
        node = get_path(params, parents)
        node[name] = write_slice(node[name], value, index)

    units = [(key, [t for t in ts if key == "top" or "indexer" not in t.path or pattern[unit_layer(key)] == "F"])
             for key, ts in p.units]
    copy_tensors(p, units, put, lambda key, t: get_path(abstract, locate(key, t)[0]).dtype, progress)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def write_slice(big: jax.Array, value: np.ndarray, index: tuple[int, ...]) -> jax.Array:
    """big[index] = value, in place (donated), with `value` placed as big's sharding places that slice (each
    process transfers only its own devices' part)."""
    sharding = big.sharding
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (big.ndim - len(sharding.spec))
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[len(index):]))
    small = jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])
    return _write(big, small, tuple(jnp.int32(i) for i in index))


@functools.partial(jax.jit, donate_argnums=0)
def _write(big, small, index):
    return jax.lax.dynamic_update_slice(big, small[(None,) * len(index)], (*index, *(0,) * small.ndim))
