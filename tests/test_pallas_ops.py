"""Every implementation of the three DSA ops against float64 numpy references written here, on fresh random
inputs with the edge cases: ragged lengths, -1 indices, all-masked rows, k above the visible keys, ties.
Pallas kernels run in interpret mode with small blocks, so ragged edges are exercised. The FP8 indexer path
is checked on its quantized values, and its quantizer and its distance to the bf16 logits on their own."""

from __future__ import annotations

import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ic_jax import ops
from ic_jax.ops.indexer_logits.reference import quantize_fp8
from ic_jax.ops.triton_lowering import triton_modules

# the op packages (ic_jax.ops re-exports their functions under the same names)
il_op = importlib.import_module("ic_jax.ops.indexer_logits")
mla_op = importlib.import_module("ic_jax.ops.sparse_mla")
topk_op = importlib.import_module("ic_jax.ops.topk")

SMALL_BLOCKS = {
    "pallas_gpu": {"indexer_logits": dict(block_q=16, block_k=32), "topk": dict(chunk=16, cap=32),
                   "sparse_mla": dict(block_h=4, block_k=8, block_c=8)},
    "pallas_tpu": {"indexer_logits": dict(block_q=8, block_k=32), "topk": dict(block_rows=8),
                   "sparse_mla": dict(block_k=8)},
}
IMPLS = sorted(set(il_op.IMPLEMENTATIONS) | set(topk_op.IMPLEMENTATIONS) | set(mla_op.IMPLEMENTATIONS))


def call(op: str, table: dict, impl: str, *args, **kwargs):
    if impl == "xla":
        return table[impl](*args, **kwargs)
    return table[impl](*args, interpret=True, **SMALL_BLOCKS[impl][op], **kwargs)


def bf16(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def dequantized(x):
    x8, scale = quantize_fp8(x)
    return f64(x8) * f64(scale)[..., None]


def indexer_ref(q, k, w, q_pos, kv_len):
    s = np.einsum("bthd,bsd->bths", f64(q), f64(k))
    out = np.einsum("bth,bths->bts", f64(w), np.maximum(s, 0.0))
    cols = np.arange(k.shape[1])
    vis = (cols[None, None] <= np.asarray(q_pos)[..., None]) & (cols[None, None] < np.asarray(kv_len)[:, None, None])
    return np.where(vis, out, -np.inf)


def assert_logits_match(got, ref, tol):
    got = np.asarray(got)
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=tol, atol=tol * np.abs(ref[fin]).max())


def indexer_inputs(rng, B, tq, H, D, tk, k_shape=None):
    """q, k, w, q_pos, kv_len, with a query that sees nothing and a ragged second kv_len; k of `k_shape`."""
    q, k = bf16(rng, (B, tq, H, D)), bf16(rng, k_shape or (B, tk, D))
    w = jnp.asarray(rng.standard_normal((B, tq, H)), jnp.float32)
    q_pos = rng.integers(0, tk, (B, tq)).astype(np.int32)
    q_pos[0, 0] = -1
    kv_len = np.array([tk, 40], np.int32)
    return q, k, w, q_pos, kv_len


def topk_ref_sets(x, k):
    x = np.asarray(x, np.float64)
    sets = np.empty(x.shape[:2], object)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            fin = np.flatnonzero(np.isfinite(x[b, t]))
            order = fin[np.lexsort((fin, -x[b, t, fin]))]  # value descending, then index ascending
            sets[b, t] = sorted(order[:k].tolist())
    return sets


def mla_ref(q_lat, q_rope, kv, k_rope, idx, scale):
    B, Tq, H, C = q_lat.shape
    o = np.zeros((B, Tq, H, C))
    lse = np.full((B, Tq, H), -np.inf)
    for b in range(B):
        for t in range(Tq):
            ids = np.asarray(idx[b, t])
            ids = ids[ids >= 0]
            if ids.size == 0:
                continue
            s = scale * (f64(q_lat[b, t]) @ f64(kv[b])[ids].T + f64(q_rope[b, t]) @ f64(k_rope[b])[ids].T)
            m = s.max(axis=1, keepdims=True)
            p = np.exp(s - m)
            o[b, t] = (p / p.sum(1, keepdims=True)) @ f64(kv[b])[ids]
            lse[b, t] = m[:, 0] + np.log(p.sum(1))
    return o, lse


@pytest.mark.parametrize("impl", IMPLS)
class TestOps:
    @pytest.mark.parametrize("tq", [5, 20])  # 5: the per-query (decode) path on GPU; 20: query blocks
    def test_indexer_logits(self, impl, tq):
        rng = np.random.default_rng(tq)
        q, k, w, q_pos, kv_len = indexer_inputs(rng, 2, tq, 4, 16, 77)
        got = call("indexer_logits", il_op.IMPLEMENTATIONS, impl, q, k, w, jnp.asarray(q_pos), jnp.asarray(kv_len))
        assert_logits_match(got, indexer_ref(q, k, w, q_pos, kv_len), 1e-4)

    @pytest.mark.parametrize("tq,tk", [(1, 300), (20, 1000)])  # decode and query blocks; Tk ragged in key blocks
    def test_indexer_logits_stacked_keys(self, impl, tq, tk):
        """k a stacked cache [L, B, Tk, D] and a traced layer (a random one, then the last): k[layer]'s logits."""
        rng = np.random.default_rng(tk + tq)
        L = 3
        q, k, w, q_pos, kv_len = indexer_inputs(rng, 2, tq, 4, 16, tk, k_shape=(L, 2, tk, 16))
        q_pos[1, -1] = tk - 1  # sees up to the last key
        fn = jax.jit(lambda *a: call("indexer_logits", il_op.IMPLEMENTATIONS, impl, *a[:5], layer=a[5]))
        for layer in (int(rng.integers(0, L - 1)), L - 1):
            got = fn(q, k, w, jnp.asarray(q_pos), jnp.asarray(kv_len), jnp.int32(layer))
            assert_logits_match(got, indexer_ref(q, k[layer], w, q_pos, kv_len), 1e-4)

    @pytest.mark.parametrize("k", [5, 16, 100])  # 100 > Tk: every finite value is selected
    def test_topk(self, impl, k):
        rng = np.random.default_rng(k)
        x = rng.standard_normal((2, 6, 77)).astype(np.float32)
        x[0, 0] = np.round(x[0, 0] * 2)  # many ties, broken by the lower index
        x[0, 1, 3:] = -np.inf  # fewer visible keys than k
        x[0, 2] = -np.inf  # nothing visible
        x[1, :, ::2] = -np.inf  # ragged visibility
        x[1, 3] = np.linspace(-1, 1, 77, dtype=np.float32)  # rising values: the worst case for streaming
        x[1, 4] = 0.5  # all tied (finite positions)
        got = np.asarray(call("topk", topk_op.IMPLEMENTATIONS, impl, jnp.asarray(x), k))
        assert got.shape == (2, 6, k) and got.dtype == np.int32
        ref = topk_ref_sets(x, k)
        for b in range(2):
            for t in range(6):
                row = got[b, t]
                assert sorted(row[row >= 0].tolist()) == ref[b, t], (b, t)
                assert (row[len(ref[b, t]):] == -1).all() and (row[:len(ref[b, t])] >= 0).all(), (b, t)

    @pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 2e-2), (jnp.float32, 1e-5)])
    def test_sparse_mla(self, impl, dtype, tol):
        rng = np.random.default_rng(0)
        B, Tq, H, C, R, Tk, K = 2, 3, 5, 32, 8, 77, 20
        arr = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
        q_lat, q_rope, kv, k_rope = arr(B, Tq, H, C), arr(B, Tq, H, R), arr(B, Tk, C), arr(B, Tk, R)
        idx = rng.integers(0, Tk, (B, Tq, K)).astype(np.int32)
        idx[rng.random(idx.shape) < 0.3] = -1
        idx[0, 1] = -1  # no valid index: zero output, lse -inf
        idx[1, 2, 1:] = -1  # a single one
        o, lse = call("sparse_mla", mla_op.IMPLEMENTATIONS, impl, q_lat, q_rope, kv, k_rope, jnp.asarray(idx), 0.3)
        ro, rlse = mla_ref(q_lat, q_rope, kv, k_rope, idx, 0.3)
        assert o.shape == ro.shape and o.dtype == dtype and lse.dtype == jnp.float32
        np.testing.assert_allclose(f64(o), ro, rtol=tol, atol=tol * np.abs(ro).max())
        np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(rlse))
        fin = np.isfinite(rlse)
        np.testing.assert_allclose(np.asarray(lse)[fin], rlse[fin], rtol=tol, atol=tol)

    @pytest.mark.parametrize("flat", [True, False])
    def test_sparse_mla_stacked_cache(self, impl, flat, monkeypatch):
        """kv and k_rope stacked caches [L, B, Tk, *] and a traced layer (a random one, then the last): the entry
        point reads the layer through the flat stack, each index offset to its layer's and sequence's rows, or
        (`flat` False: the int32 row limit lowered below this stack's rows) through the layer's slice. Both give
        the attention of the layer's cache."""
        if not flat:
            monkeypatch.setattr(mla_op, "MAX_FLAT_ROWS", 3 * 2 * 77)
        rng = np.random.default_rng(21)
        L, B, Tq, H, C, R, Tk, K = 3, 2, 3, 5, 32, 8, 77, 20
        arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
        q_lat, q_rope, kv, k_rope = arr(B, Tq, H, C), arr(B, Tq, H, R), arr(L, B, Tk, C), arr(L, B, Tk, R)
        idx = rng.integers(0, Tk, (B, Tq, K)).astype(np.int32)
        idx[rng.random(idx.shape) < 0.3] = -1
        idx[0, 1] = -1  # no valid index: zero output, lse -inf
        fn = jax.jit(lambda *a: mla_op.sparse_mla(*a[:5], 0.3, layer=a[5], implementation=impl, interpret=True))
        for layer in (int(rng.integers(0, L - 1)), L - 1):
            o, lse = fn(q_lat, q_rope, kv, k_rope, jnp.asarray(idx), jnp.int32(layer))
            ro, rlse = mla_ref(q_lat, q_rope, kv[layer], k_rope[layer], idx, 0.3)
            assert o.shape == ro.shape and lse.shape == rlse.shape
            np.testing.assert_allclose(f64(o), ro, rtol=1e-5, atol=1e-5 * np.abs(ro).max())
            np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(rlse))
            fin = np.isfinite(rlse)
            np.testing.assert_allclose(np.asarray(lse)[fin], rlse[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", sorted(il_op.FP8_IMPLEMENTATIONS))  # TPU: no kernel (test_entry_points_dispatch)
@pytest.mark.parametrize("tq", [1, 5, 20])  # 1, 5: the per-query (decode) path on GPU; 20: query blocks
def test_indexer_logits_fp8(impl, tq):
    """Against float64 on the dequantized e4m3 values: their products are exact in fp32, so only the
    summation order differs and the tolerance is tighter than the bf16 test's."""
    rng = np.random.default_rng(100 + tq)
    B, H, D, Tk = 2, 4, 32, 77  # D: Hopper fp8 dots contract multiples of 32
    q, k, w, q_pos, kv_len = indexer_inputs(rng, B, tq, H, D, Tk)
    q = q * jnp.asarray(10.0 ** rng.uniform(-2, 2, (B, tq, H, 1)), jnp.bfloat16)
    k = k * jnp.asarray(10.0 ** rng.uniform(-2, 2, (B, Tk, 1)), jnp.bfloat16)
    k = k.at[0, 3].set(0)  # a zero key: scale 1, logits 0
    got = call("indexer_logits", il_op.FP8_IMPLEMENTATIONS, impl, q, k, w, jnp.asarray(q_pos), jnp.asarray(kv_len))
    assert_logits_match(got, indexer_ref(dequantized(q), dequantized(k), w, q_pos, kv_len), 1e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_fp8_logits_from_prequantized_keys(impl):
    """Keys quantized once (an FP8 key cache: e4m3 and a scale per key) give exactly the logits of keys
    quantized inside the call."""
    rng = np.random.default_rng(6)
    q, k = bf16(rng, (2, 5, 4, 32)), bf16(rng, (2, 37, 32))
    w = jnp.asarray(rng.standard_normal((2, 5, 4)), jnp.float32)
    q_pos, kv_len = jnp.asarray(rng.integers(0, 37, (2, 5)), jnp.int32), jnp.asarray([37, 20], jnp.int32)
    k8, k_scale = quantize_fp8(k)
    kw = dict(fp8=True, implementation=impl, interpret=True)
    np.testing.assert_array_equal(np.asarray(il_op.indexer_logits(q, k8, w, q_pos, kv_len, k_scale=k_scale, **kw)),
                                  np.asarray(il_op.indexer_logits(q, k, w, q_pos, kv_len, **kw)))
    with pytest.raises(ValueError, match="fp8=True"):
        il_op.indexer_logits(q, k8, w, q_pos, kv_len, k_scale=k_scale)


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
@pytest.mark.parametrize("tq,tk", [(1, 300), (20, 1000)])
def test_fp8_logits_stacked_keys(impl, tq, tk):
    """FP8 on a stacked cache: pre-quantized keys [L, B, Tk, D] with their scales [L, B, Tk] (read in place on GPU),
    and unquantized stacked keys, give exactly the logits of the call on the layer's keys."""
    rng = np.random.default_rng(7 + tq)
    L = 4
    q, k, w, q_pos, kv_len = (jnp.asarray(a) for a in indexer_inputs(rng, 2, tq, 4, 32, tk, k_shape=(L, 2, tk, 32)))
    k8, k_scale = quantize_fp8(k)
    fn = jax.jit(functools.partial(il_op.indexer_logits, fp8=True, implementation=impl, interpret=True))
    for layer in (int(rng.integers(0, L - 1)), L - 1):
        stacked = fn(q, k8, w, q_pos, kv_len, k_scale=k_scale, layer=jnp.int32(layer))
        np.testing.assert_array_equal(np.asarray(stacked), np.asarray(fn(q, k8[layer], w, q_pos, kv_len,
                                                                         k_scale=k_scale[layer])))
        np.testing.assert_array_equal(np.asarray(fn(q, k, w, q_pos, kv_len, layer=jnp.int32(layer))),
                                      np.asarray(fn(q, k[layer], w, q_pos, kv_len)))


def ops_on(text: str, *shapes) -> set[str]:
    """The StableHLO ops (and calls) in `text` with an operand or result of any of these tensor types."""
    lines = [line for line in text.splitlines() if any(f"tensor<{shape}>" in line for shape in shapes)]
    return {re.match(r"\s*(?:%\S+ = )?([\w.]+)", line).group(1) for line in lines}


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tq", [1, 64])  # the per-query (decode) and the block kernel
def test_gpu_reads_stacked_keys_in_place(fp8, tq):
    """The GPU kernel on a stacked cache, lowered for CUDA here on the CPU: k (and its scales) reach the Triton
    call only reshaped, with no pad, slice or copy; a stack of e4m3 keys past int32 offsets is sliced instead."""
    gpu = importlib.import_module("ic_jax.ops.indexer_logits.gpu")
    fn = gpu.indexer_logits_fp8 if fp8 else gpu.indexer_logits
    k_dtype, k_type = (jnp.float8_e4m3fn, "f8E4M3FN") if fp8 else (jnp.bfloat16, "bf16")

    def lowered(L, B, Tk, D=128):
        args = [jax.ShapeDtypeStruct(s, t) for s, t in [((B, tq, 4, D), jnp.bfloat16), ((L, B, Tk, D), k_dtype),
                                                        ((B, tq, 4), jnp.float32), ((B, tq), jnp.int32),
                                                        ((B,), jnp.int32), ((L, B, Tk), jnp.float32), ((), jnp.int32)]]
        call_fn = lambda q, k, w, p, n, s, layer: fn(q, k, w, p, n, *([s] if fp8 else []), layer=layer)
        return jax.jit(call_fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    text = lowered(3, 2, 1000)
    stacked = [f"3x2x1000x128x{k_type}", "3x2x1000xf32"]
    flat = [f"6000x128x{k_type}", "6000xf32"][:1 + fp8]
    assert ops_on(text, *stacked, *flat) <= {"func.func", "call", "stablehlo.reshape", "stablehlo.custom_call"}
    kernel = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    assert len(kernel) == 1 and all(f"tensor<{shape}>" in kernel[0] for shape in flat)
    if fp8:  # 2.5e9 e4m3 keys: 2.4 GiB
        assert "stablehlo.dynamic_slice" in ops_on(lowered(5, 1, 4_000_000), f"5x1x4000000x128x{k_type}")


@pytest.mark.parametrize("tq, heads, dim, tk, result", [(64, 4, 64, 256, "64x128"), (1, 32, 128, 1024, "256x32")])
def test_gpu_indexer_dots_take_hopper_mma(tq, heads, dim, tk, result):
    """The Triton IR of the GPU indexer, exported for CUDA here on the CPU, bf16 and fp8: the block kernel's dot is
    [64 queries, D] x [D, 128 keys]; the per-query (decode) kernel's has the keys as rows, [256 keys, D] x [D, 32
    heads] (at least the 64 rows of Hopper's warpgroup MMA, which 32 heads as rows are not). The fp8 dots carry
    maxNumImpreciseAcc = D (without it Triton runs them upcast on the Ampere MMA), the bf16 dots do not."""
    gpu = importlib.import_module("ic_jax.ops.indexer_logits.gpu")
    args = [jax.ShapeDtypeStruct(s, t) for s, t in [((1, tq, heads, dim), jnp.bfloat16), ((1, tk, dim), jnp.bfloat16),
                                                    ((1, tq, heads), jnp.float32), ((1, tq), jnp.int32),
                                                    ((1,), jnp.int32)]]
    modules = [m for fn in (gpu.indexer_logits, gpu.indexer_logits_fp8) for m in triton_modules(fn, *args)]
    dots = [[line for line in m.splitlines() if "tt.dot" in line] for m in modules]
    assert len(dots) == 2 and all(len(d) == 1 for d in dots)
    assert all(f"-> tensor<{result}xf32" in d[0] for d in dots), dots
    assert "bf16" in dots[0][0] and "maxNumImpreciseAcc" not in dots[0][0]
    assert "f8E4M3FN" in dots[1][0] and f"maxNumImpreciseAcc = {dim} : i32" in dots[1][0]


def test_gpu_decode_splits_match_unsplit():
    """The split-K decode path (partial results merged by log-sum-exp) equals one program per query."""
    rng = np.random.default_rng(1)
    arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    args = (arr(2, 1, 4, 16), arr(2, 1, 4, 8), arr(2, 50, 16), arr(2, 50, 8),
            jnp.asarray(rng.integers(-1, 50, (2, 1, 40)), jnp.int32))
    fn = mla_op.IMPLEMENTATIONS["pallas_gpu"]
    one = fn(*args, 0.5, interpret=True, block_k=8, splits=1)
    many = fn(*args, 0.5, interpret=True, block_k=8, splits=4)
    for a, b in zip(one, many):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_gpu_sparse_mla_rejects_uneven_latent_chunks():
    arr = lambda *s: jnp.zeros(s, jnp.float32)
    args = (arr(1, 1, 4, 16), arr(1, 1, 4, 8), arr(1, 50, 16), arr(1, 50, 8), jnp.zeros((1, 1, 8), jnp.int32))
    with pytest.raises(NotImplementedError, match="multiple of block_c=12"):
        mla_op.IMPLEMENTATIONS["pallas_gpu"](*args, 0.5, interpret=True, block_c=12)


@pytest.mark.parametrize("segments, given, lengths", [(1, None, False), (4, None, False), (None, None, False),
                                                      (None, 16, False), (None, 100, False), (4, None, True),
                                                      (None, 16, True)])
def test_gpu_topk_seeded_rows(segments, given, lengths):
    """The GPU top-k's three stages on rows longer than its candidate buffer: a seed from block maxima, the
    filter (one program per row, or rows cut into segments that append in turn; None: the default, 16 here),
    the in-register select; rows whose candidates overflow the buffer (ties, short visible prefixes) take the
    streaming path. `given`: the seed's maxima passed in, of that block length (16 as the kernel would take them,
    100 coarser, with a ragged last block), as the GPU indexer writes them. `lengths`: each row's visible length
    passed (its last finite value + 1; 150 and 600 for the short rows), so the filter stops there. Sets against
    the float64 reference, each row in ascending index order."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 8, 1000)).astype(np.float32)
    x[0, 1] += np.linspace(0, 6, 1000, dtype=np.float32)  # rising: the top-k sits in the last blocks
    x[0, 2, 900:] += 8  # one cluster above everything else
    x[0, 3] = np.round(x[0, 3])  # heavy ties: overflows the buffer
    x[0, 4, 150:] = -np.inf  # a short visible prefix: too few blocks for a seed
    x[0, 5, 600:] = -np.inf
    x[1, :, 1::3] = -np.inf  # ragged visibility
    x[1, 6] = 2.0  # all tied
    for k in (3, 24):
        maxima = None if given is None else jnp.asarray(numpy_block_maxima(x, given), jnp.float32)
        visible = np.array([[np.flatnonzero(np.isfinite(r)).max(initial=-1) + 1 for r in b] for b in x], np.int32)
        got = np.asarray(topk_op.IMPLEMENTATIONS["pallas_gpu"](
            jnp.asarray(x), k, lengths=jnp.asarray(visible) if lengths else None, block_maxima=maxima,
            interpret=True, cap=64, chunk=32, segments=segments))
        ref = topk_ref_sets(x, k)
        for b in range(2):
            for t in range(8):
                row = got[b, t]
                assert row[row >= 0].tolist() == ref[b, t], (k, b, t)
                assert (row[len(ref[b, t]):] == -1).all(), (k, b, t)


def numpy_block_maxima(x, block):
    x = np.asarray(x, np.float64)
    nb = -(-x.shape[-1] // block)
    pad = np.full(x.shape[:-1] + (nb * block - x.shape[-1],), -np.inf)
    return np.concatenate([x, pad], -1).reshape(*x.shape[:-1], nb, block).max(-1)


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tq,block_max", [(20, 8), (20, 32), (20, 64), (3, 16)])
def test_indexer_logits_with_block_maxima(impl, fp8, tq, block_max):
    """`block_max` adds the maxima of each block of keys per query: on the GPU written by the block kernel with
    the logits (block_max 8, 32: dividing its 32-key blocks; Tk = 1000 is ragged, Tq = 20 too), computed after the
    kernel otherwise (64 > the key block; 3 queries: the per-query kernel). The logits are those of the call
    without it, bit for bit; the maxima those of the logits, on a stacked cache with a traced layer."""
    rng = np.random.default_rng(tq + block_max)
    q, k, w, q_pos, kv_len = indexer_inputs(rng, 2, tq, 4, 32, 1000, k_shape=(2, 2, 1000, 32))
    q_pos[1, -1] = 999
    args = (q, k, w, jnp.asarray(q_pos), jnp.asarray(kv_len))
    if impl == "xla":  # through the entry points, which compute the maxima after the reference
        def fn(*a, block_max=None):
            kw = dict(layer=a[5], fp8=fp8, implementation="xla")
            if block_max:
                return il_op.indexer_logits_and_maxima(*a[:5], block_max, **kw)
            return il_op.indexer_logits(*a[:5], **kw)
    else:  # the GPU kernel with small blocks
        table = il_op.FP8_IMPLEMENTATIONS if fp8 else il_op.IMPLEMENTATIONS
        fn = lambda *a, **kw: call("indexer_logits", table, impl, *a[:5], layer=a[5], **kw)
    run = lambda **kw: jax.jit(functools.partial(fn, **kw))(*args, jnp.int32(1))
    logits, maxima = run(block_max=block_max)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(run()))
    assert maxima.shape == (2, tq, -(-1000 // block_max))
    np.testing.assert_array_equal(np.asarray(maxima, np.float64), numpy_block_maxima(logits, block_max))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_topk(impl, fp8, monkeypatch):
    """The one op from the indexer's inputs to the selected keys: the sets against the float64 top-k of float64
    logits (of the dequantized e4m3 values with fp8, the keys pre-quantized as an FP8 key cache holds them), on a
    stacked key cache with a traced layer, 40 queries in blocks of 16 (the last one padded), with a query that
    sees nothing and rows that see fewer than k keys. The GPU top-k's candidate buffer is shrunk to 64 (of 1000
    keys) so that it takes a seed: the op then has the indexer write the seed's block maxima with the logits."""
    seeded = []
    if impl == "pallas_gpu":
        topk_gpu = importlib.import_module("ic_jax.ops.topk.gpu")
        kernel, seed_block = topk_gpu.topk_indices, topk_gpu.seed_block

        def small_buffer(*a, block_maxima=None, **kw):
            seeded.append(block_maxima is not None)
            return kernel(*a, block_maxima=block_maxima, cap=64, chunk=32, **kw)

        monkeypatch.setattr(topk_gpu, "topk_indices", small_buffer)
        monkeypatch.setattr(topk_gpu, "seed_block", lambda tk, k, cap=64: seed_block(tk, k, cap))
    rng = np.random.default_rng(13 + fp8)
    L, B, T, Tk, K = 2, 2, 40, 1000, 24
    q, k, w, q_pos, kv_len = indexer_inputs(rng, B, T, 4, 32, Tk, k_shape=(L, B, Tk, 32))
    q_pos[1, -1] = Tk - 1
    k_scale = None
    if fp8:
        k, k_scale = quantize_fp8(k)
    fn = jax.jit(lambda q, k, w, p, n, s, layer: ops.indexer_topk(
        q, k, w, p, n, K, fp8=fp8, k_scale=s, layer=layer, block_q=16, implementation=impl, interpret=True))
    got = np.asarray(fn(q, k, w, jnp.asarray(q_pos), jnp.asarray(kv_len), k_scale, jnp.int32(1)))
    assert got.shape == (B, T, K) and got.dtype == np.int32
    keys = f64(k[1]) * f64(k_scale[1])[..., None] if fp8 else k[1]
    ref = topk_ref_sets(indexer_ref(dequantized(q) if fp8 else q, keys, w, q_pos, kv_len), K)
    for b in range(B):
        for t in range(T):
            row = got[b, t]
            assert sorted(row[row >= 0].tolist()) == ref[b, t], (b, t)
            assert (row[len(ref[b, t]):] == -1).all(), (b, t)
    assert all(seeded) and len(seeded) == (impl == "pallas_gpu")


def test_gpu_block_maxima_lower_to_triton():
    """The fused maxima (a reshape of the score tile and a max over its last axis) lower to Triton IR for CUDA."""
    gpu = importlib.import_module("ic_jax.ops.indexer_logits.gpu")
    args = [jax.ShapeDtypeStruct(s, t) for s, t in [((1, 64, 4, 64), jnp.bfloat16), ((1, 512, 64), jnp.bfloat16),
                                                    ((1, 64, 4), jnp.float32), ((1, 64), jnp.int32), ((1,), jnp.int32)]]
    (module,) = triton_modules(lambda *a: gpu.indexer_logits(*a, block_max=32), *args)
    assert "tt.reshape" in module and "tensor<64x4x32xf32" in module and '"tt.reduce"' in module


def test_bench_gather_rows_sums_the_selected_rows():
    """The sparse MLA gather ceiling's kernel reads exactly the indexed rows (repeats included)."""
    from ic_jax.bench.kernels import gather_rows
    rng = np.random.default_rng(5)
    kv, kr = bf16(rng, (2, 70, 16)), bf16(rng, (2, 70, 8))
    idx = rng.integers(0, 70, (2, 3, 64)).astype(np.int32)
    got = gather_rows(kv, kr, jnp.asarray(idx), block_k=16, interpret=True)
    for g, table in zip(got, (kv, kr)):
        t = np.asarray(table, np.float64)
        ref = np.stack([t[b][idx[b]].sum(1) for b in range(2)])  # [B, Tq, C]
        np.testing.assert_allclose(np.asarray(g), np.broadcast_to(ref[:, :, None], g.shape), rtol=1e-5, atol=1e-4)


def test_gpu_topk_seed_follows_the_visible_length():
    """16 rows that see only the start of a wide row (the first chunks of a long prefill): the seed's blocks follow
    the longest visible length of the call: 32 keys (the top level, from the given maxima, as the indexer writes
    them) for rows that see nearly all 2000, 8 and 4 for rows that see 300-460 and 120-150, over their first
    cap * b values. Each row then has at least k maxima, so a seed (32-key blocks would leave the shortest rows
    4-5); the sets are the float64 reference's."""
    rng = np.random.default_rng(12)
    gpu = importlib.import_module("ic_jax.ops.topk.gpu")
    for (lo, hi), b in [((120, 150), 4), ((300, 460), 8), ((1700, 2000), 32)]:
        visible = np.linspace(lo, hi, 16).astype(np.int32)
        x = rng.standard_normal((1, 16, 2000)).astype(np.float32)
        x[np.arange(2000)[None, None] >= visible[None, :, None]] = -np.inf
        maxima = jnp.asarray(numpy_block_maxima(x, 32), jnp.float32)
        rows = jnp.asarray(x[0])
        seed = np.asarray(gpu._seed_maxima(rows, jnp.asarray(visible[:, None]), 24, 64, maxima))
        assert seed.shape == (16, 64) and np.isfinite(seed).sum(1).tolist() == [-(-v // b) for v in visible]
        got = np.asarray(gpu.topk_indices(jnp.asarray(x), 24, lengths=jnp.asarray(visible[None]), block_maxima=maxima,
                                          interpret=True, cap=64, chunk=32))
        ref = topk_ref_sets(x, 24)
        for t in range(16):
            row = got[0, t]
            assert row[row >= 0].tolist() == ref[0, t], (lo, hi, t)


def test_gpu_topk_filter_reads_no_further_than_lengths():
    """With 16 rows or more the filter stops at each row's length: values past it (which the model never has:
    its invisible keys are -inf) are not selected even when larger than all others. The seed here comes whole
    from the given maxima of the visible values (the lengths call for the top level), so nothing else reads
    the rows."""
    rng = np.random.default_rng(9)
    visible = rng.integers(1700, 2001, (2, 8)).astype(np.int32)
    x = rng.standard_normal((2, 8, 2000)).astype(np.float32)
    hidden = np.arange(2000)[None, None] >= visible[..., None]
    maxima = jnp.asarray(numpy_block_maxima(np.where(hidden, -np.inf, x), 16), jnp.float32)
    got = np.asarray(topk_op.IMPLEMENTATIONS["pallas_gpu"](
        jnp.asarray(np.where(hidden, x + 100.0, x)), 24, lengths=jnp.asarray(visible), block_maxima=maxima,
        interpret=True, cap=128, chunk=32))
    ref = topk_ref_sets(np.where(hidden, -np.inf, x), 24)
    for b in range(2):
        for t in range(8):
            row = got[b, t]
            assert row[row >= 0].tolist() == ref[b, t], (b, t)


def test_entry_points_dispatch():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((1, 2, 40)), jnp.float32)
    got = topk_op.topk_indices(x, 4, implementation="pallas_gpu", interpret=True)
    ref = topk_op.topk_indices(x, 4, implementation="xla")
    np.testing.assert_array_equal(np.sort(np.asarray(got), -1), np.sort(np.asarray(ref), -1))
    # FP8 indexer logits have no TPU kernel: pallas_tpu runs the XLA reference
    args = (bf16(rng, (1, 3, 2, 32)), bf16(rng, (1, 9, 32)), jnp.ones((1, 3, 2), jnp.float32),
            jnp.arange(3, dtype=jnp.int32)[None], jnp.array([9], jnp.int32))
    tpu, xla = (il_op.indexer_logits(*args, fp8=True, implementation=i, interpret=True) for i in ("pallas_tpu", "xla"))
    np.testing.assert_array_equal(np.asarray(tpu), np.asarray(xla))


def test_dispatch_falls_back_where_a_kernel_declines():
    """A kernel that cannot take an input raises NotImplementedError, and the entry point runs the next
    implementation, XLA: sparse MLA with a latent dim of 192 (not a multiple of the GPU kernel's 128-wide chunks),
    FP8 indexer logits with a head dim of 16 (Hopper's fp8 dots contract multiples of 32). An implementation that
    does not exist is a ValueError."""
    rng = np.random.default_rng(14)
    mla = (bf16(rng, (1, 2, 4, 192)), bf16(rng, (1, 2, 4, 8)), bf16(rng, (1, 30, 192)), bf16(rng, (1, 30, 8)),
           jnp.asarray(rng.integers(-1, 30, (1, 2, 8)), jnp.int32), 0.3)
    with pytest.raises(NotImplementedError):
        mla_op.IMPLEMENTATIONS["pallas_gpu"](*mla, interpret=True)
    for got, want in zip(*(mla_op.sparse_mla(*mla, implementation=i, interpret=True) for i in ("pallas_gpu", "xla"))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    indexer = tuple(jnp.asarray(a) for a in indexer_inputs(rng, 2, 3, 4, 16, 20))
    with pytest.raises(NotImplementedError):
        il_op.FP8_IMPLEMENTATIONS["pallas_gpu"](*indexer, interpret=True)
    got, want = (il_op.indexer_logits(*indexer, fp8=True, implementation=i, interpret=True)
                 for i in ("pallas_gpu", "xla"))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="'pallas' is not one of"):
        topk_op.topk_indices(jnp.zeros((1, 1, 8)), 2, implementation="pallas")


def test_fp8_quantizer_round_trip():
    """Per-vector e4m3: round to nearest with 3 mantissa bits is within 2^-4 of each value (and of the amax),
    below e4m3's normal range within half its subnormal step; zero vectors stay zero, nothing is NaN."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 128)) * 10.0 ** rng.uniform(-4, 4, (6, 1))
    x[1] = 0  # zero vector
    x[2] = 0
    x[2, 5] = -3.0  # a single nonzero value
    x[3, 0] = 1e4 * np.abs(x[3]).max()  # an outlier: the rest of the vector falls to e4m3's subnormals
    x = x.astype(np.float32)
    x8, scale = quantize_fp8(jnp.asarray(x))
    assert x8.dtype == jnp.float8_e4m3fn and scale.dtype == jnp.float32 and scale.shape == (6,)
    deq, scale = dequantized(jnp.asarray(x)), f64(scale)[:, None]
    assert np.isfinite(deq).all() and (scale > 0).all()
    np.testing.assert_array_equal(deq[1], 0.0)
    err, amax = np.abs(deq - x), np.abs(x).max(1, keepdims=True)
    assert (err <= 2**-4 * amax).all()
    assert (err <= (2**-4 * np.abs(x) + 2**-10 * scale) * (1 + 1e-5)).all()
    np.testing.assert_allclose(np.abs(deq).max(1), amax[:, 0], rtol=1e-6)  # the amax maps to 448 exactly
    with pytest.raises(TypeError, match="no gradient"):
        jax.grad(lambda v: quantize_fp8(v)[1].sum())(jnp.asarray(x))


def test_fp8_logits_near_bf16_logits():
    """At the real head dim, indexer-like inputs (unit-variance q and LayerNorm'd k, w ~ (H D)^-1/2): each e4m3
    value is within 2^-4 relative (RMS about 2^-5.4), and the D products' errors are independent, so they
    average out: the logits' relative L2 error is about sqrt(2) times that RMS (0.036 measured); bound 2^-4.
    Top-64 selection then keeps >= 90% of its keys (0.965 measured)."""
    rng = np.random.default_rng(4)
    B, T, S, H, D, K = 1, 128, 512, 16, 128, 64
    q, k = bf16(rng, (B, T, H, D)), bf16(rng, (B, S, D))
    w = jnp.asarray(rng.standard_normal((B, T, H)) * (H * D) ** -0.5, jnp.float32)
    q_pos = jnp.broadcast_to(jnp.arange(S - T, S, dtype=jnp.int32), (B, T))
    args = (q, k, w, q_pos, jnp.array([S], jnp.int32))
    bf, f8 = (np.asarray(il_op.indexer_logits(*args, fp8=fp8, implementation="xla"), np.float64)
              for fp8 in (False, True))
    fin = np.isfinite(bf)
    np.testing.assert_array_equal(np.isfinite(f8), fin)
    assert np.linalg.norm(f8[fin] - bf[fin]) / np.linalg.norm(bf[fin]) < 2**-4
    top = lambda x: np.argsort(-x[0], -1)[:, :K]
    overlap = np.mean([np.intersect1d(a, b).size / K for a, b in zip(top(bf), top(f8))])
    assert overlap >= 0.9, overlap


def test_fp8_ue8m0_scales_hand_computed():
    """scale_fmt "ue8m0": amax / 448 rounded up to a power of two. [3, -1, 0.5]: 3/448 = 2^-7.22 -> 2^-7, so
    the e4m3 values are x * 128 = [384, -128, 64], exact; 56/448 = 2^-3 stays; a zero vector keeps scale 1."""
    x = jnp.asarray([[3.0, -1.0, 0.5, 0.0], [56.0, 7.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]], jnp.float32)
    x8, scale = quantize_fp8(x, True)
    np.testing.assert_array_equal(np.asarray(scale), [2.0**-7, 2.0**-3, 1.0])
    np.testing.assert_array_equal(np.asarray(x8.astype(jnp.float32)), [[384, -128, 64, 0], [448, 56, 0, 8], [0] * 4])
    np.testing.assert_allclose(float(quantize_fp8(x)[1][0]), 3 / 448, rtol=1e-6)  # exact scales stay the default
    # the op quantizes q that way too: the logits equal the formula on the hand-quantized inputs
    q, k, w = x[None, :1, None, :], x[None, :2], jnp.ones((1, 1, 1), jnp.float32)
    pos, kv_len = jnp.asarray([[1]], jnp.int32), jnp.asarray([2], jnp.int32)
    got = ops.indexer_logits(q, k, w, pos, kv_len, fp8="ue8m0", implementation="xla")
    want = [2.0**-7 * 2.0**-7 * 384 * 384 + 2.0**-7 * 2.0**-7 * (-128) * (-128) + 2.0**-7 * 2.0**-7 * 64 * 64,
            2.0**-7 * 2.0**-3 * (384 * 448 - 128 * 56)]
    np.testing.assert_allclose(np.asarray(got)[0, 0], want, rtol=1e-6)
