"""Top-k index selection in plain jnp (a full sort through `jax.lax.top_k`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def topk_indices(logits: Float[Array, "B Tq Tk"], k: int) -> Int[Array, "B Tq k"]:
    """Indices of the k largest finite logits of each row; -1 where a row has fewer than k finite values.

    Returned sorted by descending logit; ties go to the lower key index.
    """
    k_eff = min(k, logits.shape[-1])
    vals, idx = jax.lax.top_k(logits, k_eff)
    idx = jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)
    if k_eff < k:
        idx = jnp.pad(idx, ((0, 0), (0, 0), (0, k - k_eff)), constant_values=-1)
    return idx
