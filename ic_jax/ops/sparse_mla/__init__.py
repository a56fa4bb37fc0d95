"""Sparse MLA attention: one entry point over every implementation."""

from __future__ import annotations

import jax.numpy as jnp

from ic_jax.ops import dispatch
from ic_jax.ops.common import layer_slice
from ic_jax.ops.sparse_mla import gpu, reference, tpu

# decode batches up to this run XLA, whose gather wins at one query; the kernel wins at 64 (BENCHMARKS.md, kernels)
SMALL_QUERIES = 16
IMPLEMENTATIONS = {"xla": reference.sparse_mla, "pallas_gpu": gpu.sparse_mla, "pallas_tpu": tpu.sparse_mla}
MAX_FLAT_ROWS = 2**31  # indices are int32


def sparse_mla(q_lat, q_rope, kv, k_rope, indices, scale: float, *, layer=None, implementation: str | None = None,
               interpret: bool = False):
    """See `reference.sparse_mla` for the contract; `implementation` picks the kernel. With `layer` (an int,
    traced or not), kv [L, B, Tk, C] and k_rope [L, B, Tk, R] are stacked caches and layer `layer` is attended
    to, read in place (`_flat_stack`)."""
    if layer is not None:
        return _flat_stack(q_lat, q_rope, kv, k_rope, indices, scale, layer, implementation, interpret)
    small = q_lat.shape[0] * q_lat.shape[1] <= SMALL_QUERIES
    return dispatch.call("sparse_mla", IMPLEMENTATIONS, (q_lat, q_rope, kv, k_rope, indices, scale),
                         implementation=implementation, interpret=interpret, small=small)


def _flat_stack(q_lat, q_rope, kv, k_rope, indices, scale, layer, implementation, interpret):
    """One layer of a stacked cache: the stack is one flat sequence of L*B*Tk entries, all queries one batch row,
    and each index is offset to its layer's and sequence's rows. A kernel given the slice kv[layer] would copy the
    layer's whole cache first (XLA materialises a custom call's sliced operand), at every step. A stack with
    more rows than int32 indices reach is sliced instead."""
    L, B, S, C = kv.shape
    T, K = indices.shape[1:]
    run = dict(implementation=implementation, interpret=interpret)
    if L * B * S >= MAX_FLAT_ROWS:
        return sparse_mla(q_lat, q_rope, layer_slice(kv, layer), layer_slice(k_rope, layer), indices, scale, **run)
    base = ((layer * B + jnp.arange(B, dtype=jnp.int32)) * S)[:, None, None]
    flat = jnp.where(indices >= 0, indices + base, -1).reshape(1, B * T, K)
    o, lse = sparse_mla(q_lat.reshape(1, B * T, *q_lat.shape[2:]), q_rope.reshape(1, B * T, *q_rope.shape[2:]),
                        kv.reshape(1, L * B * S, C), k_rope.reshape(1, L * B * S, -1), flat, scale, **run)
    return o.reshape(q_lat.shape), lse.reshape(q_lat.shape[:3])
