"""Indexer top-k: the keys each query attends to, as one op over two (`indexer_logits`, then `topk_indices`).

It owns what joins them: queries go through in blocks, so that the logits [B, block, Tk] of one block exist at a
time; when the top-k runs its GPU kernel, which seeds its threshold from the maxima of blocks of each row, the
indexer kernel writes those maxima with the logits (`indexer_logits_and_maxima`) and the top-k need not read the
logits once more for them; each query's visible length goes to the top-k, which reads no further. It has no kernel
of its own, so it is a folder of its own that imports both ops, neither of which knows the other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ic_jax.ops import dispatch, topk
from ic_jax.ops.indexer_logits import indexer_logits, indexer_logits_and_maxima

# queries per block: the logits of a block of 2048 queries at 200K keys are 1.6 GB in fp32
ACCELERATOR_BLOCK_Q, CPU_BLOCK_Q = 2048, 256


def indexer_topk(q: Float[Array, "B T H D"], k: Float[Array, "*L B S D"], w: Float[Array, "B T H"],
                 positions: Int[Array, "B T"], kv_len: Int[Array, "B"], k_top: int, *, fp8: bool = False,
                 k_scale: Float[Array, "*L B S"] | None = None, layer=None, block_q: int | None = None,
                 implementation: str | None = None, interpret: bool = False) -> Int[Array, "B T k_top"]:
    """The keys with the `k_top` largest indexer logits of each query, -1 padded where a query sees fewer (ties
    to the lower index; kernels may order each row's set differently): `topk_indices(indexer_logits(...))`.

    Query t sees key s iff s <= positions[b, t] and s < kv_len[b]. `fp8`, `k_scale` and `layer` as for
    `indexer_logits` (with `layer`, k is a stacked cache, read in place by the GPU kernel). `block_q` queries
    at a time (default: ACCELERATOR_BLOCK_Q on GPU and TPU, CPU_BLOCK_Q on CPU). The indices carry no
    gradient, so none is traced through the logits (the FP8 ones have none)."""
    q, k, w, k_scale = jax.lax.stop_gradient((q, k, w, k_scale))
    B, T = positions.shape
    bq = block_q or (CPU_BLOCK_Q if dispatch.backend() == "cpu" else ACCELERATOR_BLOCK_Q)
    seed = topk.seed_block((B, min(T, bq), k.shape[-2]), k_top, implementation)
    run = dict(implementation=implementation, interpret=interpret)

    def block(args):
        qb, wb, pb = args
        if seed:
            logits, maxima = indexer_logits_and_maxima(qb, k, wb, pb, kv_len, seed, fp8=fp8, k_scale=k_scale,
                                                       layer=layer, **run)
        else:
            logits, maxima = indexer_logits(qb, k, wb, pb, kv_len, fp8=fp8, k_scale=k_scale, layer=layer, **run), None
        visible = jnp.minimum(pb + 1, kv_len[:, None])  # the keys past it are -inf: the GPU top-k skips them
        return topk.topk_indices(logits, k_top, lengths=visible, block_maxima=maxima, **run)

    if T <= bq:
        return block((q, w, positions))
    nb = -(-T // bq)
    pad = nb * bq - T

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(B, nb, bq, *x.shape[2:]), 1, 0)

    idx = jax.lax.map(block, (split(q), split(w), split(positions)))
    return jnp.moveaxis(idx, 0, 1).reshape(B, nb * bq, k_top)[:, :T]
