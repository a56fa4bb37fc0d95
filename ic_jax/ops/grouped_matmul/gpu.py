"""Grouped matmul as Pallas kernels (Triton lowering) that do only the useful work.

`grouped_matmul` (rows sorted by group, prefill):

Rows are cut into aligned blocks of `bm`; a block that straddles group boundaries is computed once per
group it holds (about M/bm + G block passes in all, against G * M/bm for the dense expansion) and each
pass keeps only its own group's rows. The grid is (N/bn, M/bm) with the N blocks varying fastest, so
programs in flight share x rows and expert weights through L2. Forward only: no VJP is defined, so
training uses the "xla" implementation.

`gathered_matmul` (a few rows, each with its own matrix, decode): one program per (row, column block, part of K)
reads its share of the row's matrix in place, where XLA would first copy the chosen matrices out of the stack;
the K parts are summed after. The products are row vector x matrix, on the CUDA cores: the kernel is bound by
reading the weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from ic_jax.ops.common import next_pow2


def _pad_to(a, axis: int, size: int):
    if a.shape[axis] == size:  # not even a no-op pad: it would stand between a stack and the kernel
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, pad)


def _kernel(first_ref, count_ref, start_ref, end_ref, x_ref, w_ref, o_ref, *, bm: int, bk: int, bn: int,
            nk: int):
    j, i = pl.program_id(0), pl.program_id(1)
    r0 = pl.multiple_of(i * bm, bm)
    n0 = pl.multiple_of(j * bn, bn)
    rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
    first = first_ref[i]

    def one_group(step, acc):
        g = first + step
        start, end = start_ref[g], end_ref[g]

        def k_step(kk, part):
            k0 = pl.multiple_of(kk * bk, bk)
            xb = x_ref[pl.ds(r0, bm), pl.ds(k0, bk)]
            wb = w_ref[g, pl.ds(k0, bk), pl.ds(n0, bn)]
            return part + jnp.dot(xb, wb, preferred_element_type=jnp.float32)

        part = jax.lax.fori_loop(0, nk, k_step, jnp.zeros((bm, bn), jnp.float32))
        return jnp.where((rows >= start) & (rows < end), part, acc)

    acc = jax.lax.fori_loop(0, count_ref[i], one_group, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def schedule(group_sizes: Int[Array, "G"], m_pad: int, bm: int):
    """Per row block: its first group and how many groups it holds; per group: [start, end) rows.

    Empty groups never start a block; one inside a block's range costs a masked-out pass.
    """
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m_pad)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])
    total = ends[-1]
    r0 = jnp.arange(0, m_pad, bm, dtype=jnp.int32)
    r1 = jnp.minimum(r0 + bm, total) - 1
    first = jnp.searchsorted(ends, r0, side="right").astype(jnp.int32)
    last = jnp.searchsorted(ends, r1, side="right").astype(jnp.int32)
    count = jnp.where(r0 < total, last - first + 1, 0).astype(jnp.int32)
    return first, count, starts, ends


def layer_groups(w: Float[Array, "R G K N"], group_sizes: Int[Array, "G"], layer):
    """Layer `layer` of a stack as groups of the flat stack [R * G, K, N], the other layers' groups empty: the kernel
    then reads that layer's matrices in place (given the slice w[layer], XLA would first copy all G of them)."""
    R, G = w.shape[:2]
    sizes = jax.lax.dynamic_update_slice(jnp.zeros(R * G, group_sizes.dtype), group_sizes, (layer * G,))
    return w.reshape(-1, *w.shape[2:]), sizes


@functools.partial(jax.jit, static_argnames=("bm", "bn", "bk", "num_warps", "num_stages", "interpret"))
def grouped_matmul(x: Float[Array, "M K"], w: Float[Array, "*R G K N"], group_sizes: Int[Array, "G"], *,
                   layer=None, bm: int = 128, bn: int = 128, bk: int = 64, num_warps: int = 8, num_stages: int = 4,
                   interpret: bool = False) -> Float[Array, "M N"]:
    """`reference.grouped_matmul` semantics (f32 accumulation, output x.dtype); forward only. With `layer`, w is
    a stack [R, G, K, N], read in place (`layer_groups`)."""
    if layer is not None:
        w, group_sizes = layer_groups(w, group_sizes, layer)
    (M, K), (G, _, N) = x.shape, w.shape
    # Blocks are powers of 2 (Triton), at least 16 (tensor-core dots), at most the padded dim.
    bm, bk, bn = (min(b, max(16, next_pow2(d))) for b, d in ((bm, M), (bk, K), (bn, N)))
    m_pad, k_pad, n_pad = pl.cdiv(M, bm) * bm, pl.cdiv(K, bk) * bk, pl.cdiv(N, bn) * bn
    x = _pad_to(_pad_to(x, 0, m_pad), 1, k_pad)
    w = _pad_to(_pad_to(w, 1, k_pad), 2, n_pad)
    first, count, starts, ends = schedule(group_sizes, m_pad, bm)
    # Index arrays padded to power-of-2 lengths for the Triton lowering.
    first, count = (_pad_to(a, 0, next_pow2(a.shape[0])) for a in (first, count))
    starts, ends = (_pad_to(a, 0, next_pow2(G)) for a in (starts, ends))
    full = pl.BlockSpec()
    out = pl.pallas_call(
        functools.partial(_kernel, bm=bm, bk=bk, bn=bn, nk=k_pad // bk),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), x.dtype),
        grid=(n_pad // bn, m_pad // bm),
        in_specs=[full] * 6,
        out_specs=pl.BlockSpec((bm, bn), lambda j, i: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="grouped_matmul",
    )(first, count, starts, ends, x, w)
    return out[:M, :N]


def _gathered_kernel(groups_ref, x_ref, w_ref, o_ref, *, bk: int, bn: int, k: int, n: int, g_count: int,
                     steps: int):
    j, i, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g = groups_ref[i]
    mine = (g >= 0) & (g < g_count)  # masked loads read no memory: another device's expert costs nothing
    g = jnp.clip(g, 0, g_count - 1)
    n0 = pl.multiple_of(j * bn, bn)
    cols = n0 + jnp.arange(bn, dtype=jnp.int32)

    def k_step(kk, acc):
        k0 = pl.multiple_of((part * steps + kk) * bk, bk)
        rows = k0 + jnp.arange(bk, dtype=jnp.int32)
        xb = plgpu.load(x_ref.at[i, pl.ds(k0, bk)], mask=rows < k, other=0)
        wb = plgpu.load(w_ref.at[g, pl.ds(k0, bk), pl.ds(n0, bn)],
                        mask=mine & (rows < k)[:, None] & (cols < n)[None, :], other=0)
        return acc + jnp.sum(xb.astype(jnp.float32)[:, None] * wb.astype(jnp.float32), axis=0)

    acc = jax.lax.fori_loop(0, steps, k_step, jnp.zeros((bn,), jnp.float32))
    plgpu.store(o_ref.at[part, i, pl.ds(n0, bn)], acc, mask=cols < n)


GATHERED_PROGRAMS = 1024  # split K until about this many programs: a few rows alone leave most SMs idle


@functools.partial(jax.jit, static_argnames=("bk", "bn", "splits", "num_warps", "num_stages", "interpret"))
def gathered_matmul(x: Float[Array, "M K"], w: Float[Array, "G K N"], groups: Int[Array, "M"], *, bk: int = 128,
                    bn: int = 64, splits: int | None = None, num_warps: int = 4, num_stages: int = 4,
                    interpret: bool = False) -> Float[Array, "M N"]:
    """`reference.gathered_matmul` semantics (a row of no group of w gives 0 and reads no weights); forward only.
    Nothing is padded: edge blocks are masked. K is cut into `splits` parts (default: enough for about
    GATHERED_PROGRAMS programs), summed in fp32 afterwards."""
    (M, K), (G, _, N) = x.shape, w.shape
    bk, bn = min(bk, next_pow2(K)), min(bn, next_pow2(N))
    k_steps = pl.cdiv(K, bk)
    if splits is None:
        splits = max(1, GATHERED_PROGRAMS // (M * pl.cdiv(N, bn)))
    steps = pl.cdiv(k_steps, min(splits, k_steps))
    parts = pl.cdiv(k_steps, steps)
    full = pl.BlockSpec()
    out = pl.pallas_call(
        functools.partial(_gathered_kernel, bk=bk, bn=bn, k=K, n=N, g_count=G, steps=steps),
        out_shape=jax.ShapeDtypeStruct((parts, M, N), jnp.float32),
        grid=(pl.cdiv(N, bn), M, parts),
        in_specs=[full] * 3,
        out_specs=full,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gathered_matmul",
    )(groups.astype(jnp.int32), x, w)
    return out.sum(0).astype(x.dtype)
