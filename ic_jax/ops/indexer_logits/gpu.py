"""Indexer logits on GPU: Pallas with the Triton lowering.

Grid (batch, query block, key block). The heads are reduced inside the kernel, one [bq, D] x [D, bk] dot
per head (ReLU, scale by w, accumulate in fp32), so [Tq, H, Tk] never exists. Key blocks wholly past the
causal / kv_len limit of their query block write -inf without loading anything. Fewer than 16 queries
(decode) use a per-query kernel whose dot has the keys as rows and the heads as columns: [bk, D] x [D, H] (with
the heads as rows, 32 < 64 rows kept it off Hopper's warpgroup MMA; BENCHMARKS.md). With
`block_max`, the block kernel also writes the maximum of each `block_max`-long run of keys per query, the seed
of the GPU top-k, which would otherwise read the logits once more.

The keys are read in place: k is the flat [L*B*Tk, D] view of a stacked cache [L, B, Tk, D] (a plain [B, Tk, D] is
L = 1), passed whole with the layer as a small int32 input, and each key block is a masked load of rows
(layer*B + b)*Tk + j*bk.. (rows past Tk read as 0), so neither k nor its scales are sliced or padded.

FP8 (`indexer_logits_fp8`): the same kernels on e4m3 q and k (the contraction D must be a multiple of 32), the
q scales folded into w and the k scales applied after the head sum. The dots of both kernels run on Hopper's fp8
warpgroup MMA (`triton_lowering.fp8_dot_params`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ic_jax.ops.common import layer_slice, next_pow2
from ic_jax.ops.indexer_logits.reference import block_maxima, fp8_inputs
from ic_jax.ops.triton_lowering import fp8_dot_params

MIN_DOT_ROWS = 16  # Triton's smallest dot tile
# (block_k, num_warps, num_stages) by kernel; the block kernel's is the best of a sweep on the H200 (BENCHMARKS.md)
BLOCK_TUNING = (128, 4, 3)
QUERY_TUNING = (256, 8, 2)


def _visible(pos, kv_len, cols):
    return (cols <= pos) & (cols < kv_len)


def _store(o_ref, val, rows, cols, tq: int, tk: int):
    """Triton does not mask ragged edge blocks: stores past Tq or Tk would land in the next rows."""
    plgpu.store(o_ref, val, mask=(rows < tq) & (cols < tk))


def _load_rows(ref, row, valid):
    """ref[row : row + len(valid)]; rows where `valid` is False are not read and come back 0."""
    mask = jnp.broadcast_to(valid.reshape(valid.shape + (1,) * (ref.ndim - 1)), valid.shape + ref.shape[1:])
    return plgpu.load(ref.at[pl.ds(row, valid.shape[0])], mask=mask, other=jnp.zeros((), ref.dtype))


def _first_row(layer_ref, start, batch: int, tk: int):
    """The flat key row of key `start` of this program's sequence in the layer."""
    return (layer_ref[0] * batch + pl.program_id(0)) * tk + start


def _block_kernel(q_ref, k_ref, w_ref, pos_ref, len_ref, layer_ref, *refs, heads: int, batch: int, tq: int,
                  tk: int, fp8: bool, block_max: int | None):
    # the k scales (FP8 only), the logits, the block maxima (with block_max only)
    scale_ref, o_ref, max_ref = refs[0] if fp8 else None, refs[int(fp8)], refs[-1] if block_max else None
    bq, bk = o_ref.shape
    start = pl.program_id(2) * bk
    rows = (pl.program_id(1) * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
    cols = (start + jnp.arange(bk, dtype=jnp.int32))[None, :]
    pos = pos_ref[...]
    kv_len = len_ref[0]
    limit = jnp.minimum(jnp.max(pos) + 1, kv_len)
    row = _first_row(layer_ref, start, batch, tk)

    def store(out):
        _store(o_ref, out, rows, cols, tq, tk)
        if block_max:
            maxima = jnp.max(out.reshape(bq, bk // block_max, block_max), axis=-1)
            plgpu.store(max_ref, maxima, mask=jnp.broadcast_to(rows < tq, maxima.shape))

    @pl.when(start >= limit)
    def _():
        store(jnp.full(o_ref.shape, -jnp.inf, jnp.float32))

    @pl.when(start < limit)
    def _():
        valid = cols[0] < tk
        kt = _load_rows(k_ref, row, valid)

        def head(h, acc):
            s = jax.lax.dot_general(q_ref[:, h, :], kt, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
            return acc + jnp.maximum(s, 0.0) * w_ref[:, h].astype(jnp.float32)[:, None]

        acc = jax.lax.fori_loop(0, heads, head, jnp.zeros(o_ref.shape, jnp.float32))
        if fp8:
            acc = acc * _load_rows(scale_ref, row, valid)[None, :]
        store(jnp.where(_visible(pos[:, None], kv_len, cols), acc, -jnp.inf))


def _query_kernel(q_ref, k_ref, w_ref, pos_ref, len_ref, layer_ref, *refs, batch: int, tk: int):
    *scale_ref, o_ref = refs
    bk = o_ref.shape[0]
    start = pl.program_id(2) * bk
    cols = start + jnp.arange(bk, dtype=jnp.int32)
    pos = pos_ref[0]
    kv_len = len_ref[0]
    limit = jnp.minimum(pos + 1, kv_len)
    row = _first_row(layer_ref, start, batch, tk)

    @pl.when(start >= limit)
    def _():
        _store(o_ref, jnp.full(o_ref.shape, -jnp.inf, jnp.float32), 0, cols, 1, tk)

    @pl.when(start < limit)
    def _():
        valid = cols < tk
        s = jax.lax.dot_general(_load_rows(k_ref, row, valid), q_ref[...], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)  # [bk, H]
        acc = jnp.sum(jnp.maximum(s, 0.0) * w_ref[...].astype(jnp.float32)[None, :], axis=1)
        if scale_ref:
            acc = acc * _load_rows(scale_ref[0], row, valid)
        _store(o_ref, jnp.where(_visible(pos, kv_len, cols), acc, -jnp.inf), 0, cols, 1, tk)


def _offsets_wrap(k) -> bool:
    """Pallas' Triton lowering addresses an array of at most 4 GiB with int32 element offsets (larger ones get
    int64), which a stack of more than 2**31 one-byte (e4m3) keys overruns."""
    return k.size > 2**31 and k.size * k.dtype.itemsize <= 2**32


@functools.partial(jax.jit, static_argnames=("block_max", "interpret", "block_q", "block_k", "num_warps",
                                             "num_stages"))
def indexer_logits(q, k, w, q_pos, kv_len, k_scale=None, *, layer=None, block_max: int | None = None,
                   interpret: bool = False, block_q: int = 64, block_k: int | None = None,
                   num_warps: int | None = None, num_stages: int | None = None):
    """Same contract as `reference.indexer_logits`; with `k_scale` [B, Tk] every logit of key s is multiplied by
    k_scale[b, s] (the FP8 path). With `layer`, k [L, B, Tk, D] (and k_scale [L, B, Tk]) is read in place, unless
    its offsets would overrun int32 (`_offsets_wrap`): then the layer is sliced out. With `block_max` (a power of
    two) it returns (logits, `reference.block_maxima(logits, block_max)`), the maxima written by the block kernel
    when block_max divides its key block (else computed after it). Unset tuning knobs take the kernel's defaults
    above."""
    if layer is not None and _offsets_wrap(k):
        k, k_scale, layer = layer_slice(k, layer), layer_slice(k_scale, layer), None
    B, Tq, H, D = q.shape
    Tk = k.shape[-2]
    tuning = QUERY_TUNING if Tq < MIN_DOT_ROWS else BLOCK_TUNING
    block_k, num_warps, num_stages = (given or default for given, default in
                                      zip((block_k, num_warps, num_stages), tuning))
    bk = min(block_k, next_pow2(Tk))
    bq = 1 if Tq < MIN_DOT_ROWS else min(block_q, next_pow2(Tq))
    # q, w and q_pos padded to whole query blocks (Triton reads edge blocks unmasked); padded queries see no key
    tq_pad = pl.cdiv(Tq, bq) * bq - Tq
    q = jnp.pad(q, [(0, 0), (0, tq_pad), (0, 0), (0, 0)])
    w = jnp.pad(w, [(0, 0), (0, tq_pad), (0, 0)])
    q_pos = jnp.pad(q_pos.astype(jnp.int32), [(0, 0), (0, tq_pad)], constant_values=-1)
    k = k.reshape(-1, D)  # free: the flat rows of the stack
    scales = () if k_scale is None else (k_scale.astype(jnp.float32).reshape(-1),)
    layer = jnp.zeros(1, jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32).reshape(1)
    kv_len = kv_len.astype(jnp.int32)
    params = (fp8_dot_params if scales else plgpu.CompilerParams)(num_warps=num_warps, num_stages=num_stages)
    out_shape = jax.ShapeDtypeStruct((B, Tq, Tk), jnp.float32)
    whole = pl.BlockSpec()  # k, its scales and the layer: the kernel indexes them (`_first_row`)
    len_spec = pl.BlockSpec((1,), lambda b, i, j: (b,))
    # maxima written by the block kernel when block_max divides its key block
    fused = block_max if block_max and Tq >= MIN_DOT_ROWS and bk % block_max == 0 else None
    if Tq < MIN_DOT_ROWS:
        grid = (B, Tq, pl.cdiv(Tk, bk))
        in_specs = [pl.BlockSpec((None, None, H, D), lambda b, i, j: (b, i, 0, 0)), whole,
                    pl.BlockSpec((None, None, H), lambda b, i, j: (b, i, 0)),
                    pl.BlockSpec((None, 1), lambda b, i, j: (b, i)), len_spec]
        out_spec = pl.BlockSpec((None, None, bk), lambda b, i, j: (b, i, j))
        kernel = functools.partial(_query_kernel, batch=B, tk=Tk)
    else:
        grid = (B, pl.cdiv(Tq, bq), pl.cdiv(Tk, bk))
        in_specs = [pl.BlockSpec((None, bq, H, D), lambda b, i, j: (b, i, 0, 0)), whole,
                    pl.BlockSpec((None, bq, H), lambda b, i, j: (b, i, 0)),
                    pl.BlockSpec((None, bq), lambda b, i, j: (b, i)), len_spec]
        out_spec = pl.BlockSpec((None, bq, bk), lambda b, i, j: (b, i, j))
        kernel = functools.partial(_block_kernel, heads=H, batch=B, tq=Tq, tk=Tk, fp8=bool(scales), block_max=fused)
        if fused:
            per_block = bk // fused
            out_spec = [out_spec, pl.BlockSpec((None, bq, per_block), lambda b, i, j: (b, i, j))]
            out_shape = [out_shape, jax.ShapeDtypeStruct((B, Tq, grid[2] * per_block), jnp.float32)]
    out = pl.pallas_call(kernel, grid=grid, in_specs=in_specs + [whole] * (1 + len(scales)), out_specs=out_spec,
                         out_shape=out_shape, compiler_params=params,
                         interpret=interpret)(q, k, w, q_pos, kv_len, layer, *scales)
    if not block_max:
        return out
    if fused:  # whole key blocks: those past Tk are all -inf
        return out[0], out[1][..., :pl.cdiv(Tk, block_max)]
    return out, block_maxima(out, block_max)


def indexer_logits_fp8(q, k, w, q_pos, kv_len, k_scale=None, *, layer=None, pow2: bool = False, **kwargs):
    """Same contract as `reference.indexer_logits_fp8`; `kwargs` as for `indexer_logits`. Pre-quantized stacked
    keys are read in place; keys quantized here are the layer's only."""
    if q.shape[-1] % 32:
        raise NotImplementedError(f"FP8 indexer logits on GPU need a head dim divisible by 32 (Hopper fp8 dots), "
                                  f"got {q.shape[-1]}")
    if k_scale is None:
        k, layer = layer_slice(k, layer), None
    q8, k8, wq, k_scale = fp8_inputs(q, k, w, k_scale, pow2=pow2)
    return indexer_logits(q8, k8, wq, q_pos, kv_len, k_scale, layer=layer, **kwargs)
