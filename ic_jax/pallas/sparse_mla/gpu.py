"""Sparse MLA on GPU: Pallas with the Triton lowering.

Grid (batch, query, head block, split). A program loops over its share of the selected indices in blocks
of `block_k`: it gathers those rows of the latent cache and the RoPE keys in-kernel (`kv_ref[ids, :]`; -1
is clamped to row 0 and its score set to -inf), runs an online softmax and writes the normalised output
and the log-sum-exp. Heads are padded to a power of two (H = 20 runs as 32). With few queries (decode) the
selected set is split over `splits` programs whose partial results are merged by their log-sum-exps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ic_jax.pallas.common import next_pow2, prev_pow2

NEG = -1e30  # finite start of the running max: exp(NEG - NEG) = 1 where every score so far is -inf
TARGET_PROGRAMS = 512  # splits are chosen to reach about this many programs (132 SMs on an H100)
# (num_warps, num_stages) without and with splits; the first is the best of a sweep on the H200 (BENCHMARKS.md)
PREFILL_TUNING = (4, 3)
SPLIT_TUNING = (8, 2)


def _nt_dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(ql_ref, qr_ref, kv_ref, kr_ref, idx_ref, o_ref, lse_ref, *, scale: float, block_k: int):
    hb = ql_ref.shape[0]
    ql, qr = ql_ref[...], qr_ref[...]

    def body(j, carry):
        m, l, acc = carry
        ids = idx_ref[pl.ds(j * block_k, block_k)]
        rows = jnp.maximum(ids, 0)
        kv = kv_ref[rows, :]
        s = _nt_dot(ql, kv) + _nt_dot(qr, kr_ref[rows, :])
        s = jnp.where(ids[None, :] >= 0, s * scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        acc = acc * alpha[:, None] + jax.lax.dot_general(p.astype(kv.dtype), kv, (((1,), (0,)), ((), ())),
                                                         preferred_element_type=jnp.float32)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((hb,), NEG, jnp.float32), jnp.zeros((hb,), jnp.float32),
            jnp.zeros(o_ref.shape, jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, idx_ref.shape[0] // block_k, body, init)
    found = l > 0
    o_ref[...] = (acc / jnp.where(found, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(found, m + jnp.log(jnp.where(found, l, 1.0)), -jnp.inf)


def merge_splits(o, lse):
    """o [B, Tq, S, H, C] normalised per split, lse [B, Tq, S, H] -> merged (o [B, Tq, H, C] f32, lse)."""
    total = jax.nn.logsumexp(lse, axis=2)
    wt = jnp.where(jnp.isfinite(lse), jnp.exp(lse - jnp.where(jnp.isfinite(total), total, 0.0)[:, :, None]), 0.0)
    return jnp.einsum("btsh,btshc->bthc", wt, o), total


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_h", "block_k", "splits", "num_warps",
                                             "num_stages"))
def sparse_mla(q_lat, q_rope, kv, k_rope, indices, scale: float, *, interpret: bool = False, block_h: int = 32,
               block_k: int = 64, splits: int | None = None, num_warps: int | None = None,
               num_stages: int | None = None):
    """Same contract as `reference.sparse_mla`. Unset tuning knobs take the defaults above."""
    B, Tq, H, C = q_lat.shape
    R = q_rope.shape[-1]
    Tk = kv.shape[1]
    K = indices.shape[-1]
    hb = min(block_h, next_pow2(H))
    nh = pl.cdiv(H, hb)
    bk = min(block_k, next_pow2(K))
    nblocks = pl.cdiv(K, bk)
    if splits is None:
        splits = prev_pow2(max(1, min(nblocks, TARGET_PROGRAMS // (B * Tq * nh))))
    per_split = pl.cdiv(nblocks, splits) * bk
    tuning = PREFILL_TUNING if splits == 1 else SPLIT_TUNING
    num_warps, num_stages = (given or default for given, default in zip((num_warps, num_stages), tuning))
    heads = [(0, 0), (0, 0), (0, nh * hb - H), (0, 0)]
    q_lat, q_rope = jnp.pad(q_lat, heads), jnp.pad(q_rope, heads)
    idx = jnp.pad(indices.astype(jnp.int32), [(0, 0), (0, 0), (0, splits * per_split - K)], constant_values=-1)
    idx = idx.reshape(B, Tq, splits, per_split)
    o_dtype = q_lat.dtype if splits == 1 else jnp.float32
    o, lse = pl.pallas_call(
        functools.partial(_kernel, scale=scale, block_k=bk),
        grid=(B, Tq, nh, splits),
        in_specs=[pl.BlockSpec((None, None, hb, C), lambda b, t, h, s: (b, t, h, 0)),
                  pl.BlockSpec((None, None, hb, R), lambda b, t, h, s: (b, t, h, 0)),
                  pl.BlockSpec((None, Tk, C), lambda b, t, h, s: (b, 0, 0)),
                  pl.BlockSpec((None, Tk, R), lambda b, t, h, s: (b, 0, 0)),
                  pl.BlockSpec((None, None, None, per_split), lambda b, t, h, s: (b, t, s, 0))],
        out_specs=[pl.BlockSpec((None, None, None, hb, C), lambda b, t, h, s: (b, t, s, h, 0)),
                   pl.BlockSpec((None, None, None, hb), lambda b, t, h, s: (b, t, s, h))],
        out_shape=[jax.ShapeDtypeStruct((B, Tq, splits, nh * hb, C), o_dtype),
                   jax.ShapeDtypeStruct((B, Tq, splits, nh * hb), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(q_lat, q_rope, kv, k_rope, idx)
    if splits == 1:
        o, lse = o[:, :, 0], lse[:, :, 0]
    else:
        o, lse = merge_splits(o, lse)
    return o[:, :, :H].astype(q_lat.dtype), lse[:, :, :H]
