"""Indexer top-k on a device mesh: the batch over "data", a chunk's queries over "tensor" and "expert" (and over
"data" too when the batch does not split).

The indexer has one key head that all of its query heads share, so every device scores its own queries against
the whole (sequence-split only) key cache and picks their top-k with no reduction; the selected indices
[B, T, k] int32 are small to gather afterwards. A decode step's single query cannot split: every device of a
sequence's group then computes the same indices.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

from ic_jax.ops.common import per_shard, split_axes
from ic_jax.ops.indexer_topk import indexer_topk

QUERY_AXES = ("tensor", "expert")


def indexer_topk_sharded(mesh, q, k, w, positions, kv_len, k_top: int, *, fp8: bool = False, k_scale=None,
                         layer=None, block_q: int | None = None, implementation=None, interpret: bool = False):
    """`indexer_topk(...)` run per shard of `mesh`; k (and k_scale) a stacked cache [L, B, S, *] when `layer` is
    given, else [B, S, *]."""
    B, T = positions.shape
    b = split_axes(mesh, B, "data")
    t = split_axes(mesh, T, *QUERY_AXES, *(() if b else ("data",)))
    stack = (None,) if layer is not None else ()
    keys, scales = P(*stack, b, None, None), P(*stack, b, None)

    def local(q, k, w, positions, kv_len, k_scale, layer):
        return indexer_topk(q, k, w, positions, kv_len, k_top, fp8=fp8, k_scale=k_scale, layer=layer,
                            block_q=block_q, implementation=implementation, interpret=interpret)

    in_specs = (P(b, t, None, None), keys, P(b, t, None), P(b, t), P(b),
                None if k_scale is None else scales, None if layer is None else P())
    return per_shard(local, mesh, in_specs=in_specs, out_specs=P(b, t, None))(q, k, w, positions, kv_len, k_scale,
                                                                              layer)
