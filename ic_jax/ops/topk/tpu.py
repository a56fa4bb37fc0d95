"""Top-k selection on TPU: a bisection select in Pallas Mosaic, then an XLA compaction.

`jax.lax.top_k` does not lower inside a TPU kernel, so the kernel only finds, per row, the k-th largest
int32 order key: 32 bisection steps, each counting keys >= mid over the row held in VMEM (blocks of
`block_rows` rows). It returns that key t and how many ties (== t) to take. The compaction (keys > t, then
ties in index order, -1 padded) is a cumsum and a scatter in XLA. Output in ascending key-index order
(NOT sorted by value); the set equals the reference's, ties going to the lower index.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ic_jax.ops.common import NEG_INF_KEY, order_key, round_up, tpu_interpret

INT_MIN = jnp.iinfo(jnp.int32).min
INT_MAX = jnp.iinfo(jnp.int32).max


def _kernel(x_ref, t_ref, need_ref, *, k: int):
    key = order_key(x_ref[...])
    valid = key > NEG_INF_KEY

    def count(t):
        return jnp.sum((valid & (key >= t)).astype(jnp.int32), axis=1, keepdims=True)

    def step(_, s):  # invariant: count(lo) >= k > count(hi), or lo = INT_MIN for rows with fewer than k
        lo, hi = s
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
        up = count(mid) >= k
        return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

    shape = t_ref.shape
    lo, _ = jax.lax.fori_loop(0, 32, step, (jnp.full(shape, INT_MIN, jnp.int32), jnp.full(shape, INT_MAX, jnp.int32)))
    t_ref[...] = lo
    need_ref[...] = k - jnp.sum((valid & (key > lo)).astype(jnp.int32), axis=1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("k", "interpret", "block_rows"))
def topk_indices(logits, k: int, *, interpret: bool = False, block_rows: int = 8):
    """Same set as `reference.topk_indices` (ties to the lower index), in ascending index order per row."""
    B, Tq, Tk = logits.shape
    n = B * Tq
    rows = logits.reshape(n, Tk).astype(jnp.float32)
    padded = jnp.pad(rows, [(0, round_up(n, block_rows) - n), (0, round_up(Tk, 128) - Tk)],
                     constant_values=-jnp.inf)
    spec = pl.BlockSpec((block_rows, 1), lambda r: (r, 0))
    t, need = pl.pallas_call(
        functools.partial(_kernel, k=k),
        grid=(padded.shape[0] // block_rows,),
        in_specs=[pl.BlockSpec((block_rows, padded.shape[1]), lambda r: (r, 0))],
        out_specs=[spec, spec],
        out_shape=[jax.ShapeDtypeStruct((padded.shape[0], 1), jnp.int32)] * 2,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=tpu_interpret(interpret),
    )(padded)
    key = order_key(rows)
    valid = key > NEG_INF_KEY
    eq = valid & (key == t[:n])
    keep = (valid & (key > t[:n])) | (eq & (jnp.cumsum(eq, axis=1, dtype=jnp.int32) <= need[:n]))
    dst = jnp.where(keep, jnp.cumsum(keep, axis=1, dtype=jnp.int32) - 1, k)
    out = jnp.full((n, k), -1, jnp.int32).at[jnp.arange(n)[:, None], dst].set(
        jnp.broadcast_to(jnp.arange(Tk, dtype=jnp.int32), (n, Tk)), mode="drop")
    return out.reshape(B, Tq, k)
