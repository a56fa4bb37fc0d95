"""Top-k selection on GPU: a streaming threshold select, Pallas with the Triton lowering.

One program per row reads the row once, in chunks. It keeps a buffer of candidate (order key, index)
pairs (global scratch: `cap` slots plus `cap` dump slots) and a threshold key `t`: a chunk's elements
with key > t are appended in index order. When the buffer could overflow it is pruned to between k and
k + (cap - chunk - k) / 4 candidates by a bisection on the int32 order key (count of keys >= mid, in
registers), which also raises t. A last exact
bisection picks the k-th largest key; elements above it plus the lowest-index ties are kept.
Output: each row's set in ascending key-index order (NOT sorted by value), -1 padded at the end.
Exact and deterministic; a row read once when its values are in random order, more prunes (never more
reads) when values rise along the row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ic_jax.pallas.common import NEG_INF_KEY, next_pow2, order_key, prev_pow2

INT_MIN = jnp.iinfo(jnp.int32).min
INT_MAX = jnp.iinfo(jnp.int32).max


def _count(key, valid, t):
    return jnp.sum((valid & (key >= t)).astype(jnp.int32))


def _select(key, valid, k: int, slack: int):
    """(t, keep): keep holds between k and k + slack of the valid keys (all of them if fewer than k),
    every key > t, and keys == t in index order; exactly k when the range must be cut inside ties."""
    lo = jnp.min(jnp.where(valid, key, INT_MAX))
    hi = jnp.max(jnp.where(valid, key, INT_MIN)) + 1
    n = jnp.sum(valid.astype(jnp.int32))

    def narrow(s):  # invariant: count(lo) >= k > count(hi), or no key at all
        lo, hi, c_lo = s
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
        c = _count(key, valid, mid)
        up = c >= k
        return jnp.where(up, mid, lo), jnp.where(up, hi, mid), jnp.where(up, c, c_lo)

    lo, hi, c_lo = jax.lax.while_loop(lambda s: (s[0] + 1 < s[1]) & (s[2] > k + slack), narrow, (lo, hi, n))
    gt = valid & (key > lo)
    eq = valid & (key == lo)
    need = jnp.where(c_lo <= k + slack, c_lo, k) - jnp.sum(gt.astype(jnp.int32))
    return lo, gt | (eq & (jnp.cumsum(eq.astype(jnp.int32)) <= need))


def _append(key_ref, idx_ref, key, idx, keep, n, cap: int):
    """Writes the kept lanes at n, n+1, ... in lane order; the others go to distinct slots past cap
    (masked off on GPU; interpret mode writes them, and distinct slots keep the scatter well defined)."""
    lane = jnp.arange(keep.shape[0], dtype=jnp.int32)
    dst = jnp.where(keep, n + jnp.cumsum(keep.astype(jnp.int32)) - 1, cap + lane)
    plgpu.store(key_ref.at[dst], key, mask=keep)
    plgpu.store(idx_ref.at[dst], idx, mask=keep)


def _kernel(x_ref, o_ref, key_ref, idx_ref, *, k: int, chunk: int, interpret: bool):
    tk = x_ref.shape[0]
    cap = key_ref.shape[0]
    slots = jnp.arange(cap, dtype=jnp.int32)
    sync = (lambda: None) if interpret else plgpu.debug_barrier

    def compact(n, slack):
        sync()
        key, idx = key_ref[pl.ds(0, cap)], idx_ref[pl.ds(0, cap)]
        t, keep = _select(key, slots < n, k, slack)
        _append(key_ref, idx_ref, key, idx, keep, 0, cap)
        return jnp.sum(keep.astype(jnp.int32)), t

    def step(c, carry):
        n, t = carry
        n, t = jax.lax.cond(n > cap - chunk, lambda: compact(n, (cap - chunk - k) // 4), lambda: (n, t))
        first = c * chunk
        start = jnp.minimum(first, tk - chunk)  # the last chunk overlaps the one before: no ragged loads
        idx = start + jnp.arange(chunk, dtype=jnp.int32)
        key = order_key(x_ref[pl.ds(start, chunk)])
        keep = (key > t) & (idx >= first)
        _append(key_ref, idx_ref, key, idx, keep, n, cap)
        return n + jnp.sum(keep.astype(jnp.int32)), t

    n, _ = jax.lax.fori_loop(0, pl.cdiv(tk, chunk), step, (jnp.int32(0), jnp.int32(NEG_INF_KEY)))
    m, _ = compact(n, 0)
    sync()
    kp = o_ref.shape[0]
    o_ref[...] = jnp.where(jnp.arange(kp) < m, idx_ref[pl.ds(0, kp)], -1)


@functools.partial(jax.jit, static_argnames=("k", "interpret", "chunk", "num_warps"))
def topk_indices(logits, k: int, *, interpret: bool = False, chunk: int = 2048, num_warps: int = 4):
    """Same set as `reference.topk_indices` (ties to the lower index), in ascending index order per row."""
    B, Tq, Tk = logits.shape
    rows = logits.reshape(B * Tq, Tk).astype(jnp.float32)
    kp = next_pow2(k)
    chunk = min(chunk, prev_pow2(Tk))
    cap = next_pow2(kp + 2 * chunk)
    out_shape = [jax.ShapeDtypeStruct((B * Tq, kp), jnp.int32),
                 jax.ShapeDtypeStruct((B * Tq, 2 * cap), jnp.int32),
                 jax.ShapeDtypeStruct((B * Tq, 2 * cap), jnp.int32)]
    row = lambda r: (r, 0)
    out, _, _ = pl.pallas_call(
        functools.partial(_kernel, k=k, chunk=chunk, interpret=interpret),
        grid=(B * Tq,),
        in_specs=[pl.BlockSpec((None, Tk), row)],
        out_specs=[pl.BlockSpec((None, kp), row), pl.BlockSpec((None, 2 * cap), row),
                   pl.BlockSpec((None, 2 * cap), row)],
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
    )(rows)
    return out[:, :k].reshape(B, Tq, k)
