"""Sparse MLA on a device mesh: the batch over "data", the heads over "tensor" and "expert".

Each head attends over the same selected latents on its own, so a device runs the op on its heads and its
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
    B, _, H, _ = q_lat.shape
    b, h = split_axes(mesh, B, "data"), split_axes(mesh, H, *HEAD_AXES)
    query, cache = P(b, None, h, None), P(None, b, None, None)

    def local(q_lat, q_rope, kv, k_rope, indices, layer):
        return sparse_mla(q_lat, q_rope, kv, k_rope, indices, scale, layer=layer, implementation=implementation,
                          interpret=interpret)

    return per_shard(local, mesh, in_specs=(query, query, cache, cache, P(b, None, None), P()),
                     out_specs=(query, P(b, None, h)))(q_lat, q_rope, kv, k_rope, indices, layer)
