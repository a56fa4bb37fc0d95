"""Grouped and gathered matmul: every implementation against float64 numpy loops (Pallas in interpret mode)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ic_jax.ops.grouped_matmul import GATHERED_IMPLEMENTATIONS, IMPLEMENTATIONS, gathered_matmul, gpu, grouped_matmul

IMPLS = list(IMPLEMENTATIONS)


def numpy_reference(x, w, sizes):
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, size in enumerate(sizes):
        out[start:start + size] = x[start:start + size].astype(np.float64) @ w[g].astype(np.float64)
        start += size
    return out


def numpy_gathered(x, w, groups):
    """Row i times w[groups[i]]; zeros for a group outside [0, G) (an expert of another device)."""
    return np.stack([x[i].astype(np.float64) @ w[g].astype(np.float64) if 0 <= g < len(w) else np.zeros(w.shape[2])
                     for i, g in enumerate(groups)])


def check_bf16(fn, impls, x, w, routing, ref):
    """fn(x, w, routing) in bf16 on every implementation: a bf16 result within 2% of the float64 `ref`."""
    for impl in impls:
        out = fn(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), routing, implementation=impl,
                 interpret=True)
        assert out.dtype == jnp.bfloat16
        err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
        assert err < 2e-2, (impl, err)


def check(impl, sizes, M, K, N, seed, **blocks):
    rng = np.random.default_rng(seed)
    sizes = np.asarray(sizes, np.int32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((len(sizes), K, N)).astype(np.float32)
    if blocks:
        out = gpu.grouped_matmul(x, w, sizes, interpret=True, **blocks)
    else:
        out = grouped_matmul(x, w, sizes, implementation=impl, interpret=True)
    out = np.asarray(out)
    ref = numpy_reference(x, w, sizes)
    assert out.shape == (M, N) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert np.linalg.norm(out - ref) <= 1e-5 * np.linalg.norm(ref)
    assert not out[sizes.sum():].any()  # rows past the groups are 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sizes, M", [
    ([7, 0, 20, 0, 0, 13], 40),    # empty groups, odd sizes
    ([0, 45, 3], 60),              # rows past sum(group_sizes)
    ([1] * 9, 9),                  # one row per group
    ([0, 0, 0], 8),                # no rows at all
])
def test_matches_numpy(impl, sizes, M):
    check(impl, sizes, M, 24, 40, seed=M + len(sizes))


@pytest.mark.parametrize("seed", range(3))
def test_small_blocks_random_sizes(seed):
    """bm=16: groups span several row blocks and blocks hold several groups; K, N not multiples of bk, bn."""
    rng = np.random.default_rng(100 + seed)
    G, M = 6, 90
    sizes = rng.multinomial(M - int(rng.integers(0, 10)), rng.dirichlet(np.ones(G) * 0.5))
    check("pallas_gpu", sizes, M, 40, 36, seed, bm=16, bk=16, bn=16)


def test_bf16_output_dtype():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((32, 32)).astype(np.float32)
    w = rng.standard_normal((2, 32, 16)).astype(np.float32)
    sizes = np.array([20, 12], np.int32)
    check_bf16(grouped_matmul, IMPLS, x, w, sizes, numpy_reference(x, w, sizes))


@pytest.mark.parametrize("impl", list(GATHERED_IMPLEMENTATIONS))
@pytest.mark.parametrize("M, K, N, blocks", [
    (1, 64, 48, {}),                    # one decode row
    (7, 200, 100, {}),                  # K, N not multiples of the default blocks
    (12, 40, 36, dict(bk=16, bn=16, splits=1)),  # several K and N blocks with ragged edges, one K part
    (3, 200, 36, dict(bk=16, bn=16, splits=4)),   # K cut in 4 parts of 4 blocks, the last ragged
    (2, 40, 20, dict(bk=16, bn=16, splits=8)),    # more splits asked than K blocks
])
def test_gathered_matches_numpy(impl, M, K, N, blocks):
    """Row i times w[groups[i]]; groups repeat and skip matrices, as a decode step's chosen experts do, and some
    lie outside the weights (-1 and G: another device's experts), which give zero rows."""
    rng = np.random.default_rng(M * 1000 + K)
    G = 9
    groups = rng.integers(-1, G + 1, M).astype(np.int32)
    groups[: min(M, 3)] = groups[0]  # a repeated expert
    groups[M // 2:][:2] = [G, -1][: len(groups[M // 2:][:2])]
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((G, K, N)).astype(np.float32)
    if blocks:
        out = gpu.gathered_matmul(x, w, groups, interpret=True, **blocks)
    else:
        out = gathered_matmul(x, w, groups, implementation=impl, interpret=True)
    ref = numpy_gathered(x, w, groups)
    out = np.asarray(out)
    assert out.shape == (M, N) and out.dtype == np.float32
    assert np.linalg.norm(out - ref) <= 1e-5 * np.linalg.norm(ref)


def test_gathered_bf16():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 96)).astype(np.float32)
    w = rng.standard_normal((5, 96, 80)).astype(np.float32)
    groups = np.array([4, 0, 4, 2], np.int32)
    check_bf16(gathered_matmul, GATHERED_IMPLEMENTATIONS, x, w, groups, numpy_gathered(x, w, groups))


@pytest.mark.parametrize("op", ["grouped", "gathered"])
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_of_a_stack_matches_numpy(op, impl):
    """`layer` (traced, as inside the model's scan) picks one layer of a [R, G, K, N] stack: the first and the
    last layer give the products with w[layer]."""
    rng = np.random.default_rng(11)
    R, G, M, K, N = 3, 5, 30, 24, 40
    w = rng.standard_normal((R, G, K, N)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    sizes = np.array([6, 0, 11, 9, 0], np.int32)  # 4 rows past the groups
    groups = rng.integers(0, G, M).astype(np.int32)
    groups[:2] = [-1, G]  # no expert of this layer: not the last of the layer before, nor the first of the next
    for layer in (0, R - 1):
        if op == "grouped":
            out = jax.jit(lambda w, l: grouped_matmul(x, w, sizes, layer=l, implementation=impl, interpret=True))(
                w, layer)
            ref = numpy_reference(x, w[layer], sizes)
        else:
            out = jax.jit(lambda w, l: gathered_matmul(x, w, groups, layer=l, implementation=impl,
                                                       interpret=True))(w, layer)
            ref = numpy_gathered(x, w[layer], groups)
        assert np.linalg.norm(np.asarray(out) - ref) <= 1e-5 * np.linalg.norm(ref), (layer, op, impl)


@pytest.mark.parametrize("op", ["grouped", "gathered"])
def test_gpu_reads_the_stack_in_place(op):
    """Lowered for CUDA here on the CPU: the stack reaches the Triton call only reshaped, with no slice or copy
    of one layer's experts (XLA would materialise a sliced operand of the custom call: all G matrices)."""
    R, G, M, K, N = 4, 8, 64, 128, 256
    fn = grouped_matmul if op == "grouped" else gathered_matmul
    routing = (jax.ShapeDtypeStruct((G,), jnp.int32) if op == "grouped" else jax.ShapeDtypeStruct((M,), jnp.int32))
    args = [jax.ShapeDtypeStruct((M, K), jnp.bfloat16), jax.ShapeDtypeStruct((R, G, K, N), jnp.bfloat16), routing,
            jax.ShapeDtypeStruct((), jnp.int32)]
    text = jax.jit(lambda x, w, r, layer: fn(x, w, r, layer=layer, implementation="pallas_gpu")).trace(
        *args).lower(lowering_platforms=("cuda",)).as_text()
    stack, flat = f"{R}x{G}x{K}x{N}xbf16", f"{R * G}x{K}x{N}xbf16"
    lines = [line for line in text.splitlines() if f"tensor<{stack}>" in line or f"tensor<{flat}>" in line]
    ops = {re.match(r"\s*(?:%\S+ = )?([\w.]+)", line).group(1) for line in lines}
    assert ops <= {"func.func", "call", "stablehlo.reshape", "stablehlo.custom_call"}, ops
    assert sum("stablehlo.custom_call" in line for line in lines) == 1


def test_xla_gradient_goes_to_the_callers_own_slice():
    """With `layer` and `own` (w[layer] as a scan's slice holds it), XLA multiplies by `own`: the product is that of
    w[layer], and the gradient goes to `own` (d/dw[g] of the sum of rows g's products: their column sums, in
    every column), none to the stack."""
    rng = np.random.default_rng(12)
    R, G, M, K, N = 3, 4, 24, 16, 20
    w = rng.standard_normal((R, G, K, N)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    sizes = np.array([5, 0, 9, 6], np.int32)  # 4 rows past the groups
    fn = lambda w, own: grouped_matmul(x, w, sizes, layer=1, own=own, implementation="xla")
    ref = numpy_reference(x, w[1], sizes)
    assert np.linalg.norm(np.asarray(fn(w, w[1])) - ref) <= 1e-5 * np.linalg.norm(ref)
    g_stack, g_own = jax.grad(lambda w, own: fn(w, own).sum(), argnums=(0, 1))(w, w[1])
    assert not np.asarray(g_stack).any()
    ends = np.cumsum(sizes)
    column_sums = np.stack([x[e - s:e].astype(np.float64).sum(0) for s, e in zip(sizes, ends)])
    np.testing.assert_allclose(np.asarray(g_own), np.repeat(column_sums[:, :, None], N, 2), rtol=1e-5, atol=1e-5)
