"""Losses: next-token cross-entropy, and the indexer's KL losses (DeepSeek's and IndexCache's multi-layer one).

Each layer's target p_t is its head-averaged attention distribution over the keys it attended to (from
`RunOptions(mode="train")`); the indexer's distribution is q_t = softmax(I_t) over the same keys. In the
dense stage those are all visible keys, in the sparse stage the selected ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ic_jax.model.attention import selection_mask


def token_losses(logits: Float[Array, "B T V"], tokens: Int[Array, "B T"]) -> Float[Array, "B T-1"]:
    """Cross-entropy of each next token."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def lm_loss(logits: Float[Array, "B T V"], tokens: Int[Array, "B T"]) -> Float[Array, ""]:
    return token_losses(logits, tokens).mean()


def kl(p: Float[Array, "... S"], logits: Float[Array, "... S"], support: Array) -> Float[Array, "..."]:
    """KL(p || softmax(logits over `support`)); p is zero outside the support."""
    logq = jax.nn.log_softmax(jnp.where(support, logits, -jnp.inf), axis=-1)
    terms = jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - jnp.where(support, logq, 0.0)), 0.0)
    return terms.sum(-1)


def multi_layer_kl(ps: Float[Array, "M B T S"], logits: Float[Array, "B T S"], support: Array) -> Float[Array, ""]:
    """L_multi = sum_j 1/M * mean_t KL(p_t^(j) || q_t): one F layer's indexer against the M layers it serves."""
    return jnp.mean(jax.vmap(lambda p: kl(p, logits, support).mean())(ps))


def groups(pattern: str) -> list[tuple[int, list[int]]]:
    """(F layer, the layers it serves: itself and the S layers after it) for each F layer of a pattern."""
    out: list[tuple[int, list[int]]] = []
    for i, c in enumerate(pattern):
        if c == "F":
            out.append((i, [i]))
        else:
            out[-1][1].append(i)
    return out


def indexer_loss(aux: list[dict], pattern: str) -> Float[Array, ""]:
    """Sum over F layers of L_multi, on the keys each F layer selected (an all-F pattern: DeepSeek's loss)."""
    total = jnp.float32(0.0)
    for f, served in groups(pattern):
        support = selection_mask(aux[f]["indices"], aux[f]["logits"].shape[-1])
        ps = jax.lax.stop_gradient(jnp.stack([aux[j]["attn"] for j in served]))
        total += multi_layer_kl(ps, aux[f]["logits"], support)
    return total
