"""A Hugging Face folder straight into device memory: `load_model` converts it tensor by tensor into the stacked
parameters of the model for a pattern, sharded over a mesh when one is given, with no copy on disk and one tensor
in host memory at a time."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from ic_jax.model.dsa import DSAModel
from ic_jax.runtime.hf.names import get_path
from ic_jax.runtime.hf.reading import (
    abstract_model,
    copy_tensors,
    plan,
    run_pattern,
    unit_layer,
)
from ic_jax.runtime.stacked import empty_params, slots, target_shardings, write_slice


def load_model(hf_dir: Path, pattern: str | None = None, mesh=None, progress: bool = False) -> DSAModel:
    """The model for `pattern` (default: the checkpoint's schedule) with the folder's weights, converted tensor by
    tensor into its stacked parameters on the device, each parameter sharded on `mesh` (see `param_shardings`) when
    one is given. Indexers of layers that run S are not read."""
    p = plan(hf_dir)
    pattern = run_pattern(p, pattern, str(hf_dir))
    model = abstract_model(p.info.cfg, pattern)
    state = nnx.state(model, nnx.Param)
    abstract = nnx.to_pure_dict(state)
    params = empty_params(abstract, target_shardings(model, mesh))
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
