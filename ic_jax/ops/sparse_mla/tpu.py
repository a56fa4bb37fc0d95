"""Sparse MLA on TPU: Pallas Mosaic with in-kernel DMA gathers.

Grid (batch, query). The query's index row sits in SMEM (a blocked SMEM input; a whole [Tq, K] scalar
prefetch would not fit SMEM in prefill) and drives one row DMA per selected entry from the HBM latent and
RoPE caches into VMEM, `block_k` rows at a time; -1 gathers row 0 and is masked to -inf through a VMEM copy
of the same indices. Online softmax over the blocks; output normalised, log-sum-exp in fp32. Heads are
padded to a multiple of 8 (sublanes). The gather is single-buffered: DMAs of block j + 1 do not yet overlap
the compute of block j.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ic_jax.ops.common import round_up, tpu_interpret

NEG = -1e30  # finite start of the running max, so a block of only -inf scores gives exp(-inf) = 0


def _nt_dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(idx_s, idx_v, ql_ref, qr_ref, kv_hbm, kr_hbm, o_ref, lse_ref, kv_buf, kr_buf, sem, *,
            scale: float, block_k: int):
    b = pl.program_id(0)
    ql, qr = ql_ref[...], qr_ref[...]

    def body(j, carry):
        m, l, acc = carry
        base = j * block_k

        def copies(i):
            row = jnp.maximum(idx_s[base + i], 0)
            return (pltpu.make_async_copy(kv_hbm.at[b, pl.ds(row, 1)], kv_buf.at[pl.ds(i, 1)], sem.at[0]),
                    pltpu.make_async_copy(kr_hbm.at[b, pl.ds(row, 1)], kr_buf.at[pl.ds(i, 1)], sem.at[1]))

        def start(i, _):
            for c in copies(i):
                c.start()

        def wait(i, _):
            for c in copies(i):
                c.wait()

        jax.lax.fori_loop(0, block_k, start, None)
        jax.lax.fori_loop(0, block_k, wait, None)
        kv = kv_buf[...]
        s = _nt_dot(ql, kv) + _nt_dot(qr, kr_buf[...])
        s = jnp.where(idx_v[:, pl.ds(base, block_k)] >= 0, s * scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)
        acc = acc * alpha + jax.lax.dot_general(p.astype(kv.dtype), kv, (((1,), (0,)), ((), ())),
                                                preferred_element_type=jnp.float32)
        return m_new, l * alpha + jnp.sum(p, axis=1, keepdims=True), acc

    hp = ql_ref.shape[0]
    init = (jnp.full((hp, 1), NEG, jnp.float32), jnp.zeros((hp, 1), jnp.float32),
            jnp.zeros(o_ref.shape, jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, idx_v.shape[1] // block_k, body, init)
    found = l > 0
    safe = jnp.where(found, l, 1.0)
    o_ref[...] = (acc / safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(found, m + jnp.log(safe), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_k"))
def sparse_mla(q_lat, q_rope, kv, k_rope, indices, scale: float, *, interpret: bool = False, block_k: int = 128):
    """Same contract as `reference.sparse_mla`."""
    B, Tq, H, C = q_lat.shape
    R = q_rope.shape[-1]
    K = indices.shape[-1]
    hp = round_up(H, 8)
    bk = min(block_k, round_up(K, 8))
    kp = round_up(K, bk)
    heads = [(0, 0), (0, 0), (0, hp - H), (0, 0)]
    ql, qr = jnp.pad(q_lat, heads), jnp.pad(q_rope, heads)
    idx = jnp.pad(indices.astype(jnp.int32), [(0, 0), (0, 0), (0, kp - K)], constant_values=-1)
    q_map = lambda b, t: (b, t, 0, 0)
    o, lse = pl.pallas_call(
        functools.partial(_kernel, scale=scale, block_k=bk),
        grid=(B, Tq),
        in_specs=[pl.BlockSpec((None, None, kp), lambda b, t: (b, t, 0), memory_space=pltpu.SMEM),
                  pl.BlockSpec((None, None, 1, kp), q_map),
                  pl.BlockSpec((None, None, hp, C), q_map),
                  pl.BlockSpec((None, None, hp, R), q_map),
                  pl.BlockSpec(memory_space=pl.ANY),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[pl.BlockSpec((None, None, hp, C), q_map), pl.BlockSpec((None, None, hp, 1), q_map)],
        out_shape=[jax.ShapeDtypeStruct((B, Tq, hp, C), q_lat.dtype),
                   jax.ShapeDtypeStruct((B, Tq, hp, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bk, C), kv.dtype), pltpu.VMEM((bk, R), k_rope.dtype),
                        pltpu.SemaphoreType.DMA((2,))],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=tpu_interpret(interpret),
    )(idx, idx[:, :, None, :], ql, qr, kv, k_rope)
    return o[:, :, :H], lse[:, :, :H, 0]
