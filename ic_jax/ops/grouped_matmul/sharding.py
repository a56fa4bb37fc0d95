"""The routed experts on a device mesh: experts over "expert" (and "data", see `expert_axes`), each expert's hidden
dim over "tensor", tokens over "data".

A device holds its experts' slices [*, E/e, D, F/t] of the weight stacks (as `runtime.sharding` places them, by the
same `expert_axes`) and every token of its sequences; it multiplies the tokens routed to its experts by its slices
(`local_ffn`, with the number of its first expert) and the partial outputs are summed over the expert axes and
"tensor": one all-reduce of [N, D] per MoE layer, and no device reads another's experts.

With the experts over "data" too (SGLang's data-parallel attention with expert-parallel MoE), the tokens of every
data shard must meet every expert: the rows (with their experts and weights, in one collective) are gathered over
"data" first, and the sum over "data" is scattered back to the rows' owners (a reduce-scatter); rows whole on every
device (one sequence's decode) need no gather.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ic_jax.ops.common import per_shard, split_axes

EXPERT_PARALLEL_DATA = "expert_parallel_data"  # the name of a size-1 mesh axis that puts the experts over "data" too


def expert_axes(mesh) -> tuple[str, ...]:
    """The mesh axes the routed experts split over: "expert", and "data" too on a mesh that has an axis named
    EXPERT_PARALLEL_DATA (`runtime.sharding.make_mesh`; the params are placed by this same function)."""
    return ("expert", "data") if EXPERT_PARALLEL_DATA in mesh.axis_names else ("expert",)


def expert_parallel(mesh, local_ffn, x, experts, weights, w_gate, w_up, w_down, layer):
    """local_ffn(x [n, D], experts [n, k], weights [n, k], (w_gate, w_up, w_down) local slices, layer, first,
    n_experts) -> this device's share of the routed output [n, D] (float32), run per shard of `mesh` and summed. The stacks are
    [R, E, D, F] / [R, E, F, D] with `layer` (an int, traced or not), or [E, D, F] / [E, F, D] with layer None; the
    experts split over those of the mesh's `expert_axes` of size > 1 whose product divides E (`split_axes`, as
    `runtime.sharding.spec_for` places them)."""
    stack = (None,) * (w_gate.ndim - 3)
    E, _, F = w_gate.shape[-3:]
    n = split_axes(mesh, x.shape[0], "data")
    e, f = split_axes(mesh, E, *expert_axes(mesh)), split_axes(mesh, F, "tensor")
    gathered = n if n and "data" in (e or ()) else None  # rows split over "data", which splits the experts too
    summed = tuple(a for a in (e or ()) + (f or ()) if a not in (gathered or ()))
    rows = P(n, None)

    def local(x, experts, weights, w_gate, w_up, w_down, layer):
        if gathered:
            x, experts, weights = _all_gather_rows((x, experts, weights), gathered)
        first = jax.lax.axis_index(e) * w_gate.shape[-3] if e else 0
        y = local_ffn(x, experts, weights, (w_gate, w_up, w_down), layer, first, E)
        if gathered:
            y = jax.lax.psum_scatter(y, gathered, scatter_dimension=0, tiled=True)
        return jax.lax.psum(y, summed) if summed else y

    in_specs = (rows, rows, rows, P(*stack, e, None, f), P(*stack, e, None, f), P(*stack, e, f, None),
                None if layer is None else P())
    return per_shard(local, mesh, in_specs=in_specs, out_specs=rows)(x, experts, weights, w_gate, w_up, w_down, layer)


def _all_gather_rows(arrays, axes):
    """All-gathers arrays [n, ...] of any dtypes over `axes` as one collective (one launch and one sync instead of
    one per array): each row's bytes side by side, split and cast back after."""
    n = arrays[0].shape[0]
    packed = jnp.concatenate([jax.lax.bitcast_convert_type(a, jnp.uint8).reshape(n, -1) for a in arrays], axis=1)
    packed = jax.lax.all_gather(packed, axes, axis=0, tiled=True)
    out, start = [], 0
    for a in arrays:
        width = math.prod(a.shape[1:]) * a.itemsize
        part = packed[:, start:start + width].reshape(-1, *a.shape[1:], *(() if a.itemsize == 1 else (a.itemsize,)))
        out.append(jax.lax.bitcast_convert_type(part, a.dtype))
        start += width
    return out
