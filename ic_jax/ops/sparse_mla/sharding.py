"""Sparse MLA on a device mesh: the batch over "data", the heads over "tensor" and "expert", and a chunk's queries
over "data" when the batch does not split (one long prompt: sequence-parallel prefill).

Each head and each query attends over its own selected latents, so a device runs the op on its heads, queries and
sequences with no reduction; the cache [L, B, S, *] is split only by sequence, as `runtime.sharding` places it.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

from ic_jax.ops.common import per_shard, split_axes
from ic_jax.ops.sparse_mla import sparse_mla

HEAD_AXES = ("tensor", "expert")


def sparse_mla_sharded(mesh, q_lat, q_rope, kv, k_rope, indices, scale: float, *, layer, implementation=None,
                       interpret: bool = False):
    """`sparse_mla(..., layer=layer)` run per shard of `mesh` (a stacked cache [L, B, S, *]); returns (o, lse)."""
    B, T, H, _ = q_lat.shape
    b, h = split_axes(mesh, B, "data"), split_axes(mesh, H, *HEAD_AXES)
    t = None if b else split_axes(mesh, T, "data")
    query, cache = P(b, t, h, None), P(None, b, None, None)

    def local(q_lat, q_rope, kv, k_rope, indices, layer):
        return sparse_mla(q_lat, q_rope, kv, k_rope, indices, scale, layer=layer, implementation=implementation,
                          interpret=interpret)

    return per_shard(local, mesh, in_specs=(query, query, cache, cache, P(b, t, None), P()),
                     out_specs=(query, P(b, t, h)))(q_lat, q_rope, kv, k_rope, indices, layer)
