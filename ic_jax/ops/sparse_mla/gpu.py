"""Sparse MLA on GPU: Pallas with the Triton lowering.

Grid (batch, query, head block, split). A program loops over its share of the selected indices in blocks
of `block_k`: it gathers those rows of the latent cache and the RoPE keys in-kernel (`kv_ref[ids, :]`; -1
is clamped to row 0 and its score set to -inf), runs an online softmax and writes the normalised output
and the log-sum-exp. The latent dim is handled in `block_c`-wide column chunks (the gathered tile, the q
operand, the output accumulator), which keeps the dots' register operands small: whole 512-wide tiles spilled
registers (BENCHMARKS.md). Head blocks are a power of two (H = 20 runs as one block of 32);
the padding heads are masked in the kernel's loads and stores, so nothing is padded or sliced outside it. With
few queries (decode) the selected set is split over `splits` programs whose partial results are merged by their
log-sum-exps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ic_jax.ops.common import next_pow2, prev_pow2

NEG = -1e30  # finite start of the running max: exp(NEG - NEG) = 1 where every score so far is -inf
TARGET_PROGRAMS = 256  # splits are chosen to reach about this many programs: two per SM of a Hopper GPU
# (block_c, num_warps, num_stages): the best of sweeps on the H100 for prefill and decode (BENCHMARKS.md)
TUNING = (128, 4, 3)


def _nt_dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(ql_ref, qr_ref, kv_ref, kr_ref, idx_ref, o_ref, lse_ref, *, scale: float, block_k: int, block_c: int,
            heads: int):
    hb, C = ql_ref.shape
    chunks = [pl.ds(c, block_c) for c in range(0, C, block_c)]
    real = pl.program_id(2) * hb + jnp.arange(hb, dtype=jnp.int32) < heads  # the last block's padding heads
    ql = [plgpu.load(ql_ref.at[:, c], mask=real[:, None], other=0.0) for c in chunks]
    qr = plgpu.load(qr_ref, mask=real[:, None], other=0.0)

    def body(j, carry):
        m, l, *acc = carry
        ids = idx_ref[pl.ds(j * block_k, block_k)]
        rows = jnp.maximum(ids, 0)
        kv = [kv_ref[rows, c] for c in chunks]
        s = _nt_dot(qr, kr_ref[rows, :])
        for q_c, kv_c in zip(ql, kv):
            s += _nt_dot(q_c, kv_c)
        s = jnp.where(ids[None, :] >= 0, s * scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        # each chunk's dot is added as soon as it is made: all of them live at once would spill
        acc = [a * alpha[:, None] + jax.lax.dot_general(p.astype(kv_c.dtype), kv_c, (((1,), (0,)), ((), ())),
                                                        preferred_element_type=jnp.float32)
               for a, kv_c in zip(acc, kv)]
        return m_new, l * alpha + jnp.sum(p, axis=1), *acc

    init = (jnp.full((hb,), NEG, jnp.float32), jnp.zeros((hb,), jnp.float32),
            *(jnp.zeros((hb, block_c), jnp.float32) for _ in chunks))
    m, l, *acc = jax.lax.fori_loop(0, idx_ref.shape[0] // block_k, body, init)
    found = l > 0
    inv = 1.0 / jnp.where(found, l, 1.0)
    for c, a in zip(chunks, acc):
        plgpu.store(o_ref.at[:, c], (a * inv[:, None]).astype(o_ref.dtype), mask=real[:, None])
    plgpu.store(lse_ref, jnp.where(found, m + jnp.log(jnp.where(found, l, 1.0)), -jnp.inf), mask=real)


def merge_splits(o, lse, dtype):
    """o [B, Tq, S, H, C] f32 normalised per split, lse [B, Tq, S, H] -> merged (o [B, Tq, H, C] in dtype, lse),
    written as one weighted sum over the splits so that XLA fuses it into a single pass over o."""
    total = jax.nn.logsumexp(lse, axis=2)
    wt = jnp.where(jnp.isfinite(lse), jnp.exp(lse - jnp.where(jnp.isfinite(total), total, 0.0)[:, :, None]), 0.0)
    return jnp.sum(wt[..., None] * o, axis=2).astype(dtype), total


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_h", "block_k", "block_c", "splits",
                                             "num_warps", "num_stages"))
def sparse_mla(q_lat, q_rope, kv, k_rope, indices, scale: float, *, interpret: bool = False,
               block_h: int | None = None, block_k: int = 64, block_c: int | None = None, splits: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None):
    """Same contract as `reference.sparse_mla`. Unset tuning knobs take the defaults above."""
    B, Tq, H, C = q_lat.shape
    R = q_rope.shape[-1]
    Tk = kv.shape[1]
    K = indices.shape[-1]
    hb = block_h or min(32, next_pow2(H))
    nh = pl.cdiv(H, hb)
    bk = min(block_k, next_pow2(K))
    nblocks = pl.cdiv(K, bk)
    if splits is None:
        splits = prev_pow2(max(1, min(nblocks, TARGET_PROGRAMS // (B * Tq * nh))))
    per_split = pl.cdiv(nblocks, splits) * bk
    block_c, num_warps, num_stages = (given or default for given, default in
                                      zip((block_c, num_warps, num_stages), TUNING))
    block_c = min(block_c, C)
    if C % block_c:
        raise NotImplementedError(f"sparse MLA on GPU: the latent dim {C} is not a multiple of block_c={block_c}")
    idx = jnp.pad(indices.astype(jnp.int32), [(0, 0), (0, 0), (0, splits * per_split - K)], constant_values=-1)
    idx = idx.reshape(B, Tq, splits, per_split)
    o_dtype = q_lat.dtype if splits == 1 else jnp.float32
    o, lse = pl.pallas_call(
        functools.partial(_kernel, scale=scale, block_k=bk, block_c=block_c, heads=H),
        grid=(B, Tq, nh, splits),
        in_specs=[pl.BlockSpec((None, None, hb, C), lambda b, t, h, s: (b, t, h, 0)),
                  pl.BlockSpec((None, None, hb, R), lambda b, t, h, s: (b, t, h, 0)),
                  pl.BlockSpec((None, Tk, C), lambda b, t, h, s: (b, 0, 0)),
                  pl.BlockSpec((None, Tk, R), lambda b, t, h, s: (b, 0, 0)),
                  pl.BlockSpec((None, None, None, per_split), lambda b, t, h, s: (b, t, s, 0))],
        out_specs=[pl.BlockSpec((None, None, None, hb, C), lambda b, t, h, s: (b, t, s, h, 0)),
                   pl.BlockSpec((None, None, None, hb), lambda b, t, h, s: (b, t, s, h))],
        out_shape=[jax.ShapeDtypeStruct((B, Tq, splits, H, C), o_dtype),
                   jax.ShapeDtypeStruct((B, Tq, splits, H), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(q_lat, q_rope, kv, k_rope, idx)
    if splits == 1:
        return o[:, :, 0], lse[:, :, 0]
    return merge_splits(o, lse, q_lat.dtype)
