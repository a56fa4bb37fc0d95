"""Indexer logits on TPU: Pallas Mosaic.

Grid (batch, query block, key block), the heads reduced in-kernel ([bq, D] x [D, bk] per head, ReLU, scale,
fp32 accumulate). Each query block's visible limit min(max q_pos + 1, kv_len) is scalar-prefetched: it
drives the key BlockSpec (blocks past the limit map to the last needed block, so no new DMA is issued) and
the kernel writes -inf there without computing. q and w are laid out head-major so a head is a leading index.
There is no FP8 kernel: not every TPU generation has fp8 matmuls, so fp8=True runs the XLA reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ic_jax.ops.common import layer_slice, round_up, tpu_interpret


def _kernel(lim_ref, len_ref, q_ref, k_ref, w_ref, pos_ref, o_ref, *, heads: int):
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = o_ref.shape
    start = j * bk

    @pl.when(start >= lim_ref[b, i])
    def _():
        o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, jnp.float32)

    @pl.when(start < lim_ref[b, i])
    def _():
        kt = k_ref[...]

        def head(h, acc):
            s = jax.lax.dot_general(q_ref[h], kt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            return acc + jnp.maximum(s, 0.0) * w_ref[h]

        acc = jax.lax.fori_loop(0, heads, head, jnp.zeros((bq, bk), jnp.float32))
        cols = start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        o_ref[...] = jnp.where((cols <= pos_ref[...]) & (cols < len_ref[b]), acc, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("interpret", "block_q", "block_k"))
def indexer_logits(q, k, w, q_pos, kv_len, *, layer=None, interpret: bool = False, block_q: int = 128,
                   block_k: int = 512):
    """Same contract as `reference.indexer_logits`; a stacked k is sliced to k[layer] (a copy)."""
    k = layer_slice(k, layer)
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    bq, bk = min(block_q, round_up(Tq, 8)), min(block_k, round_up(Tk, 128))
    tq_p, tk_p = round_up(Tq, bq), round_up(Tk, bk)
    q_pos = jnp.pad(q_pos.astype(jnp.int32), [(0, 0), (0, tq_p - Tq)], constant_values=-1)
    kv_len = kv_len.astype(jnp.int32)
    lim = jnp.minimum(q_pos.reshape(B, -1, bq).max(-1) + 1, kv_len[:, None])  # [B, query blocks]
    qh = jnp.pad(jnp.moveaxis(q, 2, 1), [(0, 0), (0, 0), (0, tq_p - Tq), (0, 0)])  # [B, H, Tq, D]
    wh = jnp.pad(jnp.moveaxis(w.astype(jnp.float32), 2, 1), [(0, 0), (0, 0), (0, tq_p - Tq)])[..., None]
    k = jnp.pad(k, [(0, 0), (0, tk_p - Tk), (0, 0)])

    def k_map(b, i, j, lim, _):
        return b, jnp.minimum(j, jnp.maximum(pl.cdiv(lim[b, i], bk) - 1, 0)), 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, tq_p // bq, tk_p // bk),
        in_specs=[pl.BlockSpec((None, H, bq, D), lambda b, i, j, *_: (b, 0, i, 0)),
                  pl.BlockSpec((None, bk, D), k_map),
                  pl.BlockSpec((None, H, bq, 1), lambda b, i, j, *_: (b, 0, i, 0)),
                  pl.BlockSpec((None, bq, 1), lambda b, i, j, *_: (b, i, 0))],
        out_specs=pl.BlockSpec((None, bq, bk), lambda b, i, j, *_: (b, i, j)),
    )
    out = pl.pallas_call(
        functools.partial(_kernel, heads=H), grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((B, tq_p, tk_p), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=tpu_interpret(interpret),
    )(lim, kv_len, qh, k, wh, q_pos[..., None])
    return out[:, :Tq, :Tk]
