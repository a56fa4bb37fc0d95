"""Indexer logits on GPU: Pallas with the Triton lowering.

Grid (batch, query block, key block). The heads are reduced inside the kernel, one [bq, D] x [D, bk] dot
per head (ReLU, scale by w, accumulate in fp32), so [Tq, H, Tk] never exists. Key blocks wholly past the
causal / kv_len limit of their query block write -inf without loading anything. Fewer than 16 queries
(decode) use a per-query kernel that puts the heads in the dot's rows instead: [H, D] x [D, bk].

FP8 (`indexer_logits_fp8`): the same kernels on e4m3 q and k (the contraction D must be a multiple of 32), the
q scales folded into w and the k scales applied after the head sum. The block kernel's dots run on Hopper's fp8
warpgroup MMA (see `_fp8_dots_on_hopper_mma`); the per-query kernel's dots have too few rows (H = 32 < 64) for it
and run upcast to fp16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax._src.lib.mlir import ir
from jax._src.pallas.triton import pallas_call_registration
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ic_jax.errors import UserError
from ic_jax.pallas.common import next_pow2
from ic_jax.pallas.indexer_logits.reference import fp8_inputs

MIN_DOT_ROWS = 16  # Triton's smallest dot tile
# (block_k, num_warps, num_stages) by kernel; the block kernel's is the best of a sweep on the H200 (BENCHMARKS.md)
BLOCK_TUNING = (128, 4, 3)
QUERY_TUNING = (256, 8, 2)


def _fp8_dots_on_hopper_mma(lower):
    """Pallas builds Triton dots without `maxNumImpreciseAcc` (so 0), and for fp8 operands with an fp32 result
    Triton then refuses Hopper's warpgroup MMA: it upcasts them to fp16 for the Ampere MMA (SASS: F2FP...UNPACK_B
    and HMMA.16816 where the bf16 kernel has HGMMA), 1.7x slower than bf16. This wraps jax's internal
    Pallas-to-Triton lowering (once, at import) to set it on every fp8 dot to the dot's contraction length: one MMA
    accumulation chain per dot, added to the fp32 accumulator after it (DeepGEMM promotes every 128 too). The SASS
    then has QGMMA and the kernel runs 1.4x faster than bf16 (BENCHMARKS.md). Other dots are left alone."""
    def lower_with_fp8_dots(*args, **kwargs):
        result = lower(*args, **kwargs)

        def visit(op):
            if op.name == "tt.dot" and "f8" in str(op.operands[0].type):
                k = ir.RankedTensorType(op.operands[0].type).shape[-1]
                op.attributes["maxNumImpreciseAcc"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), k)
            return ir.WalkResult.ADVANCE

        result.module.operation.walk(visit)
        return result

    lower_with_fp8_dots.fp8_dots = True
    return lower_with_fp8_dots


_lowering = pallas_call_registration.lowering
# a jax without this hook keeps the slow (correct) fp8 dots; tests/test_pallas_ops.py fails on it
if hasattr(_lowering, "lower_jaxpr_to_triton_module") and not getattr(_lowering.lower_jaxpr_to_triton_module,
                                                                       "fp8_dots", False):
    _lowering.lower_jaxpr_to_triton_module = _fp8_dots_on_hopper_mma(_lowering.lower_jaxpr_to_triton_module)


def _visible(pos, kv_len, cols):
    return (cols <= pos) & (cols < kv_len)


def _store(o_ref, val, rows, cols, tq: int, tk: int):
    """Triton does not mask ragged edge blocks: stores past Tq or Tk would land in the next rows."""
    plgpu.store(o_ref, val, mask=(rows < tq) & (cols < tk))


def _block_kernel(q_ref, k_ref, w_ref, pos_ref, len_ref, *refs, heads: int, tq: int, tk: int):
    *scale_ref, o_ref = refs  # the k scales, on the FP8 path only, then the output
    bq, bk = o_ref.shape
    start = pl.program_id(2) * bk
    rows = (pl.program_id(1) * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
    cols = (start + jnp.arange(bk, dtype=jnp.int32))[None, :]
    pos = pos_ref[...]
    kv_len = len_ref[0]
    limit = jnp.minimum(jnp.max(pos) + 1, kv_len)

    @pl.when(start >= limit)
    def _():
        _store(o_ref, jnp.full(o_ref.shape, -jnp.inf, jnp.float32), rows, cols, tq, tk)

    @pl.when(start < limit)
    def _():
        kt = k_ref[...]

        def head(h, acc):
            s = jax.lax.dot_general(q_ref[:, h, :], kt, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
            return acc + jnp.maximum(s, 0.0) * w_ref[:, h].astype(jnp.float32)[:, None]

        acc = jax.lax.fori_loop(0, heads, head, jnp.zeros(o_ref.shape, jnp.float32))
        if scale_ref:
            acc = acc * scale_ref[0][...][None, :]
        _store(o_ref, jnp.where(_visible(pos[:, None], kv_len, cols), acc, -jnp.inf), rows, cols, tq, tk)


def _query_kernel(q_ref, k_ref, w_ref, pos_ref, len_ref, *refs, tk: int):
    *scale_ref, o_ref = refs
    bk = k_ref.shape[0]
    start = pl.program_id(2) * bk
    cols = start + jnp.arange(bk, dtype=jnp.int32)
    pos = pos_ref[0]
    kv_len = len_ref[0]
    limit = jnp.minimum(pos + 1, kv_len)

    @pl.when(start >= limit)
    def _():
        _store(o_ref, jnp.full(o_ref.shape, -jnp.inf, jnp.float32), 0, cols, 1, tk)

    @pl.when(start < limit)
    def _():
        s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)  # [H, bk]
        acc = jnp.sum(jnp.maximum(s, 0.0) * w_ref[...].astype(jnp.float32)[:, None], axis=0)
        if scale_ref:
            acc = acc * scale_ref[0][...]
        _store(o_ref, jnp.where(_visible(pos, kv_len, cols), acc, -jnp.inf), 0, cols, 1, tk)


@functools.partial(jax.jit, static_argnames=("interpret", "block_q", "block_k", "num_warps", "num_stages"))
def indexer_logits(q, k, w, q_pos, kv_len, k_scale=None, *, interpret: bool = False, block_q: int = 64,
                   block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """Same contract as `reference.indexer_logits`; with `k_scale` [B, Tk] every logit of key s is multiplied by
    k_scale[b, s] (the FP8 path). Unset tuning knobs take the kernel's defaults above."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    tuning = QUERY_TUNING if Tq < MIN_DOT_ROWS else BLOCK_TUNING
    block_k, num_warps, num_stages = (given or default for given, default in
                                      zip((block_k, num_warps, num_stages), tuning))
    bk = min(block_k, next_pow2(Tk))
    bq = 1 if Tq < MIN_DOT_ROWS else min(block_q, next_pow2(Tq))
    # inputs padded to whole blocks (Triton reads edge blocks unmasked); padded queries see no key
    tq_pad, tk_pad = pl.cdiv(Tq, bq) * bq - Tq, pl.cdiv(Tk, bk) * bk - Tk
    q = jnp.pad(q, [(0, 0), (0, tq_pad), (0, 0), (0, 0)])
    w = jnp.pad(w, [(0, 0), (0, tq_pad), (0, 0)])
    q_pos = jnp.pad(q_pos.astype(jnp.int32), [(0, 0), (0, tq_pad)], constant_values=-1)
    k = jnp.pad(k, [(0, 0), (0, tk_pad), (0, 0)])
    scales = () if k_scale is None else (jnp.pad(k_scale.astype(jnp.float32), [(0, 0), (0, tk_pad)]),)
    kv_len = kv_len.astype(jnp.int32)
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out_shape = jax.ShapeDtypeStruct((B, Tq, Tk), jnp.float32)
    k_spec = pl.BlockSpec((None, bk, D), lambda b, i, j: (b, j, 0))
    len_spec = pl.BlockSpec((1,), lambda b, i, j: (b,))
    scale_specs = [pl.BlockSpec((None, bk), lambda b, i, j: (b, j))] * len(scales)
    if Tq < MIN_DOT_ROWS:
        grid = (B, Tq, pl.cdiv(Tk, bk))
        in_specs = [pl.BlockSpec((None, None, H, D), lambda b, i, j: (b, i, 0, 0)), k_spec,
                    pl.BlockSpec((None, None, H), lambda b, i, j: (b, i, 0)),
                    pl.BlockSpec((None, 1), lambda b, i, j: (b, i)), len_spec, *scale_specs]
        out_spec = pl.BlockSpec((None, None, bk), lambda b, i, j: (b, i, j))
        kernel = functools.partial(_query_kernel, tk=Tk)
    else:
        grid = (B, pl.cdiv(Tq, bq), pl.cdiv(Tk, bk))
        in_specs = [pl.BlockSpec((None, bq, H, D), lambda b, i, j: (b, i, 0, 0)), k_spec,
                    pl.BlockSpec((None, bq, H), lambda b, i, j: (b, i, 0)),
                    pl.BlockSpec((None, bq), lambda b, i, j: (b, i)), len_spec, *scale_specs]
        out_spec = pl.BlockSpec((None, bq, bk), lambda b, i, j: (b, i, j))
        kernel = functools.partial(_block_kernel, heads=H, tq=Tq, tk=Tk)
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_spec, out_shape=out_shape,
                          compiler_params=params, interpret=interpret)(q, k, w, q_pos, kv_len, *scales)


def indexer_logits_fp8(q, k, w, q_pos, kv_len, k_scale=None, **kwargs):
    """Same contract as `reference.indexer_logits_fp8`; `kwargs` as for `indexer_logits`."""
    if q.shape[-1] % 32:
        raise UserError(f"FP8 indexer logits need a head dim divisible by 32 (Hopper fp8 dots), got {q.shape[-1]}")
    q8, k8, wq, k_scale = fp8_inputs(q, k, w, k_scale)
    return indexer_logits(q8, k8, wq, q_pos, kv_len, k_scale, **kwargs)
