"""Sparse MLA attention over selected latent-cache entries, in plain jnp (absorbed / MQA form)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

GATHER_BUDGET = 1 << 25  # elements gathered per query block: bounds memory for any Tq


def sparse_mla(
    q_lat: Float[Array, "B Tq H C"],
    q_rope: Float[Array, "B Tq H R"],
    kv: Float[Array, "B Tk C"],
    k_rope: Float[Array, "B Tk R"],
    indices: Int[Array, "B Tq K"],
    scale: float,
) -> tuple[Float[Array, "B Tq H C"], Float[Array, "B Tq H"]]:
    """o[b,t,h] = sum_j p_j kv[b, idx_j], p = softmax_j(scale * (q_lat . kv[idx_j] + q_rope . k_rope[idx_j])).

    idx_j runs over indices[b, t, :] with -1 entries skipped. Returns the latent output (q_lat's dtype)
    and the log-sum-exp in fp32 (-inf, with a zero output, for a row with no valid index).
    The latent (C) and RoPE (R) parts stay separate arrays: Triton blocks need power-of-two sizes.
    Queries are processed in blocks so the gathered [block, K, C] slab stays under GATHER_BUDGET.
    """
    B, Tq, H, C = q_lat.shape
    K = indices.shape[-1]
    bq = max(1, min(Tq, GATHER_BUDGET // max(1, B * K * (C + k_rope.shape[-1]))))
    nb = -(-Tq // bq)
    pad = nb * bq - Tq

    def blocks(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=-1 if x.dtype == jnp.int32 else 0)
        return jnp.moveaxis(x.reshape(B, nb, bq, *x.shape[2:]), 1, 0)

    def one_block(args):
        ql, qr, idx = args
        safe = jnp.maximum(idx, 0)
        kv_g = jax.vmap(lambda c, i: c[i])(kv, safe)  # [B, bq, K, C]
        kr_g = jax.vmap(lambda c, i: c[i])(k_rope, safe)
        s = jnp.einsum("bqhc,bqkc->bqhk", ql, kv_g, preferred_element_type=jnp.float32)
        s += jnp.einsum("bqhr,bqkr->bqhk", qr, kr_g, preferred_element_type=jnp.float32)
        s = jnp.where(idx[:, :, None, :] >= 0, s * scale, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bqhk,bqkc->bqhc", p, kv_g.astype(jnp.float32)) / jnp.where(l > 0, l, 1.0)
        lse = jnp.where(l[..., 0] > 0, m[..., 0] + jnp.log(l[..., 0]), -jnp.inf)
        return o.astype(q_lat.dtype), lse

    o, lse = jax.lax.map(one_block, (blocks(q_lat), blocks(q_rope), blocks(indices)))
    o = jnp.moveaxis(o, 0, 1).reshape(B, nb * bq, H, C)[:, :Tq]
    lse = jnp.moveaxis(lse, 0, 1).reshape(B, nb * bq, H)[:, :Tq]
    return o, lse
