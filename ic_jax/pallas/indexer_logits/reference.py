"""Lightning-indexer logits in plain jnp: the definition of correct for every kernel of this op."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def indexer_logits(
    q: Float[Array, "B Tq H D"],
    k: Float[Array, "B Tk D"],
    w: Float[Array, "B Tq H"],
    q_pos: Int[Array, "B Tq"],
    kv_len: Int[Array, "B"],
) -> Float[Array, "B Tq Tk"]:
    """I[b, t, s] = sum_h w[b, t, h] * relu(q[b, t, h] . k[b, s]), in fp32.

    Key s is visible to query t iff s <= q_pos[b, t] and s < kv_len[b]; invisible keys get -inf.
    The heads are reduced one at a time, so no [Tq, H, Tk] intermediate exists.
    """
    w = w.astype(jnp.float32)

    def add_head(acc, qw):
        qh, wh = qw
        s = jnp.einsum("btd,bsd->bts", qh, k, preferred_element_type=jnp.float32)
        return acc + wh[..., None] * jax.nn.relu(s), None

    B, Tq, H, _ = q.shape
    acc = jnp.zeros((B, Tq, k.shape[1]), jnp.float32)
    acc, _ = jax.lax.scan(add_head, acc, (jnp.moveaxis(q, 2, 0), jnp.moveaxis(w, 2, 0)))
    return jnp.where(visible_mask(q_pos, kv_len, k.shape[1]), acc, -jnp.inf)


def visible_mask(q_pos: Int[Array, "B Tq"], kv_len: Int[Array, "B"], tk: int) -> Array:
    s = jnp.arange(tk, dtype=jnp.int32)
    return (s[None, None, :] <= q_pos[:, :, None]) & (s[None, None, :] < kv_len[:, None, None])
