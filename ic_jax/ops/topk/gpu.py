"""Top-k selection on GPU: seed, filter, select; Pallas with the Triton lowering.

1. Seed: the maxima of `b`-long blocks of each row (XLA, or given: the GPU indexer kernel writes them with the
   logits), then the k-th largest of those maxima `t` (kernel, in registers). Any k blocks hold k values >= their
   maxima, so at least k values are >= t, and every top-k value is. `b` is the smallest power of two that leaves
   at most `cap` maxima of the row (`seed_block`), or, with the rows' visible lengths given for many rows, of the
   call's longest visible part (`_seed_maxima`).
2. Filter: one program per row streams it once (up to its visible length, when given for many rows) and
   appends every value >= t, in index order, to a buffer of `cap` candidates (about 2.5k for k = 2048 at 200K on
   random logits). No loop-carried state but the write offset, so the program is light and many run per
   multiprocessor. With few rows (decode), each row is cut into segments, one program each: a first pass counts
   each segment's hits, and the second appends them after the earlier segments' (the same buffer, the same
   order).
3. Select: the candidates sit in registers; a bisection on the int32 order key finds the k-th largest,
   and ties at the cut go to the lower index.
Rows whose candidates overflow `cap` (heavy ties, rows with fewer than k blocks of visible values)
rerun in a streaming select that prunes its own buffer (`_stream_kernel`); the others skip it.
Output: each row's set in ascending key-index order (NOT sorted by value), -1 padded at the end.
Exact and deterministic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ic_jax.ops.common import NEG_INF_KEY, next_pow2, order_key, prev_pow2

INT_MIN = jnp.iinfo(jnp.int32).min
INT_MAX = jnp.iinfo(jnp.int32).max
TARGET_PROGRAMS = 256  # with few rows, the filter splits each row into segments to reach about this many programs
CAP = 8192  # candidates per row, by default
FEW_ROWS = 16  # fewer rows (decode): `lengths` unused, no run-time choice of the seed's blocks (its cost is fixed)


def seed_block(tk: int, k: int, cap: int = CAP) -> int | None:
    """The block length whose maxima seed rows of `tk` values, or None where no seed is taken (every value fits
    the buffer, or fewer than k blocks)."""
    b = next_pow2(pl.cdiv(tk, cap))
    return None if b == 1 or tk // b < k else b


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
    """Writes the kept lanes at n, n+1, ... in lane order, up to slot cap - 1; the others go to distinct
    slots past cap (masked off on GPU; interpret mode writes them, and distinct slots keep the scatter
    well defined)."""
    lane = jnp.arange(keep.shape[0], dtype=jnp.int32)
    dst = n + jnp.cumsum(keep.astype(jnp.int32)) - 1
    keep = keep & (dst < cap)
    dst = jnp.where(keep, dst, cap + lane)
    if key_ref is not None:
        plgpu.store(key_ref.at[dst], key, mask=keep)
    plgpu.store(idx_ref.at[dst], idx, mask=keep)


def _chunk(x_ref, c, chunk: int):
    """Chunk c of the row: (indices, order keys, mask of the elements no earlier chunk had). The last chunk
    overlaps the one before, so no load is ragged."""
    first = c * chunk
    start = jnp.minimum(first, x_ref.shape[0] - chunk)
    idx = start + jnp.arange(chunk, dtype=jnp.int32)
    return idx, order_key(x_ref[pl.ds(start, chunk)]), idx >= first


def _seed_kernel(maxima_ref, t_ref, *, k: int, blocks: int):
    key = order_key(maxima_ref[...])
    _, keep = _select(key, jnp.arange(key.shape[0], dtype=jnp.int32) < blocks, k, 0)
    t = jnp.min(jnp.where(keep, key, INT_MAX))  # NEG_INF_KEY when fewer than k blocks see a value
    t_ref[...] = jnp.full(t_ref.shape, jnp.maximum(t, NEG_INF_KEY + 1), jnp.int32)


def _segment_hits(x_ref, t, length, chunk: int, per_segment: int, visit=None):
    """Counts the values >= t in this program's segment of the row (chunks s * per_segment, ... of it, s the
    second grid index), calling visit(key, idx, hit, hits so far) on each chunk. Values from `length` on do not
    count, and chunks wholly past it are not read."""
    nchunks = pl.cdiv(x_ref.shape[0], chunk)
    first = pl.program_id(1) * per_segment
    steps = jnp.clip(pl.cdiv(length, chunk) - first, 0, per_segment)

    def step(i, n):
        c = first + i
        idx, key, new = _chunk(x_ref, jnp.minimum(c, nchunks - 1), chunk)
        hit = (key >= t) & new & (idx < length)
        if visit is not None:
            visit(key, idx, hit, n)
        return n + jnp.sum(hit.astype(jnp.int32))

    return jax.lax.fori_loop(0, steps, step, jnp.int32(0))


def _store_count(n_ref, n):
    plgpu.store(n_ref.at[pl.ds(pl.program_id(1), 1)], jnp.full((1,), n, jnp.int32))


def _count_kernel(x_ref, t_ref, len_ref, n_ref, *, chunk: int, per_segment: int):
    _store_count(n_ref, _segment_hits(x_ref, t_ref[0], len_ref[0], chunk, per_segment))


def _filter_kernel(x_ref, t_ref, len_ref, off_ref, key_ref, idx_ref, n_ref, *, chunk: int, per_segment: int):
    """Appends the segment's values >= t, in index order, from slot off[s] on, and counts them (past cap:
    counted, not stored: the count tells the overflow)."""
    cap = key_ref.shape[0] // 2
    off = off_ref[pl.program_id(1)]
    _store_count(n_ref, _segment_hits(x_ref, t_ref[0], len_ref[0], chunk, per_segment,
                                      lambda key, idx, hit, n: _append(key_ref, idx_ref, key, idx, hit, off + n, cap)))


def _select_kernel(key_ref, idx_ref, n_ref, o_ref, *, k: int):
    cap = key_ref.shape[0] // 2
    valid = jnp.arange(cap, dtype=jnp.int32) < n_ref[0]
    _, keep = _select(key_ref[pl.ds(0, cap)], valid, k, 0)
    _append(None, o_ref, None, idx_ref[pl.ds(0, cap)], keep, 0, o_ref.shape[0] - cap)


def _stream_kernel(x_ref, todo_ref, o_ref, key_ref, idx_ref, *, k: int, chunk: int, interpret: bool):
    """The overflow path: streams the row with a threshold raised by pruning its own candidate buffer
    (`cap` slots plus `cap` dump slots) to at most k + (cap - chunk - k) / 4 whenever it could overflow."""
    tk = x_ref.shape[0]
    cap = key_ref.shape[0] // 2
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
        idx, key, new = _chunk(x_ref, c, chunk)
        keep = (key > t) & new
        _append(key_ref, idx_ref, key, idx, keep, n, cap)
        return n + jnp.sum(keep.astype(jnp.int32)), t

    @pl.when(todo_ref[0] != 0)
    def _():
        n, _ = jax.lax.fori_loop(0, pl.cdiv(tk, chunk), step, (jnp.int32(0), jnp.int32(NEG_INF_KEY)))
        m, _ = compact(n, 0)
        sync()
        kp = o_ref.shape[0]
        o_ref[...] = jnp.where(jnp.arange(kp) < m, idx_ref[pl.ds(0, kp)], -1)


def _seed_maxima(rows, lengths, k: int, cap: int, block_maxima):
    """[rows, cap] block maxima for the seed (-inf padded), or None where rows of this width need no seed. The
    block length follows the longest visible length of the call, not the row width: rows that see fewer than
    k * seed_block(width) keys (the first chunks of a long prefill into a cache sized for all of it) would have
    fewer than k blocks, no seed, and overflow the buffer. So one of the lengths 2, 4, ..., seed_block(width) is
    taken at run time (a switch), the shorter ones over the rows' first cap * b values, where all of their
    visible values lie; the longest from `block_maxima` when given. Without `lengths`, the longest."""
    R, Tk = rows.shape
    top = seed_block(Tk, k, cap)
    if top is None:
        return None

    def level(b: int):
        def maxima():
            if b == top and block_maxima is not None:
                m = block_maxima.reshape(R, -1)[:, :cap].astype(jnp.float32)
            else:  # a ragged tail is left out: any blocks give a valid seed
                m = rows[:, :min(Tk, cap * b) // b * b].reshape(R, -1, b).max(-1)
            return jnp.pad(m, ((0, 0), (0, cap - m.shape[1])), constant_values=-jnp.inf)
        return maxima

    if lengths is None:
        return level(top)()
    levels = [functools.partial(jnp.full, (R, cap), -jnp.inf, jnp.float32)]  # 0: every visible value fits
    levels += [level(2**i) for i in range(1, top.bit_length())]
    need = pl.cdiv(jnp.max(lengths), cap)  # the level: ceil(log2(need)), at most the top
    return jax.lax.switch(jnp.minimum(32 - jax.lax.clz(jnp.maximum(need, 1) - 1), len(levels) - 1), levels)


def _per_row(kernel, args, out_widths, num_warps: int, interpret: bool, segments: int = 1, num_stages: int = 1):
    """`segments` programs per row of 2-D int32/float32 arrays; every block is a whole row."""
    row = lambda r, s: (r, 0)
    rows = args[0].shape[0]
    return pl.pallas_call(
        kernel, grid=(rows, segments),
        in_specs=[pl.BlockSpec((None, a.shape[1]), row) for a in args],
        out_specs=[pl.BlockSpec((None, w), row) for w in out_widths],
        out_shape=[jax.ShapeDtypeStruct((rows, w), jnp.int32) for w in out_widths],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(*args)


@functools.partial(jax.jit, static_argnames=("k", "interpret", "cap", "chunk", "segments", "num_warps",
                                             "num_stages", "select_warps"))
def topk_indices(logits, k: int, *, lengths=None, block_maxima=None, interpret: bool = False, cap: int = CAP,
                 chunk: int = 2048, segments: int | None = None, num_warps: int = 4, num_stages: int = 1,
                 select_warps: int = 4):
    """Same set as `reference.topk_indices` (ties to the lower index), in ascending index order per row.
    `lengths` [B, Tq]: row (b, t) holds only -inf from lengths[b, t] on (the keys a query does not see; the
    caller's promise): with FEW_ROWS rows or more, the filter reads no further and the seed's blocks follow them.
    `block_maxima` [B, Tq, n]: the maxima of disjoint blocks of each row (any blocks, those past `cap` unused),
    taken as the seed's instead of computing them. `cap` (a power of two): candidates per row; `chunk`: elements
    per streaming step; `segments`: filter
    programs per row (default: about TARGET_PROGRAMS in all); `num_warps` for the streaming kernels and
    `num_stages` for the count and filter streams' pipelined loads, `select_warps` for the in-register selects."""
    B, Tq, Tk = logits.shape
    rows = logits.reshape(B * Tq, Tk).astype(jnp.float32)
    kp = next_pow2(k)
    chunk = min(chunk, prev_pow2(Tk))
    nchunks = pl.cdiv(Tk, chunk)
    segments = prev_pow2(min(segments or max(1, TARGET_PROGRAMS // (B * Tq)), nchunks))
    per_segment = pl.cdiv(nchunks, segments)
    if lengths is not None and B * Tq >= FEW_ROWS:
        lengths = jnp.clip(lengths.reshape(B * Tq, 1).astype(jnp.int32), 0, Tk)
    else:
        lengths = None
    maxima = _seed_maxima(rows, lengths, k, cap, block_maxima)
    lengths = jnp.full((B * Tq, 1), Tk, jnp.int32) if lengths is None else lengths
    if maxima is None:  # every value fits, or too few blocks: keep all finite values
        seed = jnp.full((B * Tq, 1), NEG_INF_KEY + 1, jnp.int32)
    else:
        (seed,) = _per_row(functools.partial(_seed_kernel, k=k, blocks=cap), [maxima], [1], select_warps, interpret)
    counts = jnp.zeros((B * Tq, 1), jnp.int32)
    if segments > 1:  # a first pass counts each segment's hits, so that each appends after the earlier ones
        (counts,) = _per_row(functools.partial(_count_kernel, chunk=chunk, per_segment=per_segment),
                             [rows, seed, lengths], [segments], num_warps, interpret, segments, num_stages)
    cand_key, cand_idx, counts = _per_row(
        functools.partial(_filter_kernel, chunk=chunk, per_segment=per_segment),
        [rows, seed, lengths, jnp.cumsum(counts, axis=1) - counts], [2 * cap, 2 * cap, segments], num_warps,
        interpret, segments, num_stages)
    n = jnp.sum(counts, axis=1, keepdims=True)
    (out,) = _per_row(functools.partial(_select_kernel, k=k), [cand_key, cand_idx, n], [next_pow2(kp + cap)],
                      select_warps, interpret)
    out = jnp.where(jnp.arange(k) < jnp.minimum(n, k), out[:, :k], -1)
    over = n > cap

    def stream():
        scratch = next_pow2(kp + 2 * chunk)
        streamed, _, _ = _per_row(functools.partial(_stream_kernel, k=k, chunk=chunk, interpret=interpret),
                                  [rows, over.astype(jnp.int32)], [kp, 2 * scratch, 2 * scratch], num_warps, interpret)
        return jnp.where(over, streamed[:, :k], out)

    out = jax.lax.cond(jnp.any(over), stream, lambda: out)
    return out.reshape(B, Tq, k)
