"""Grouped matmul in plain XLA: `jax.lax.ragged_dot` (differentiable; on GPU a dense pass over all groups)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ic_jax.ops.common import layer_slice


def grouped_matmul(x: Float[Array, "M K"], w: Float[Array, "*R G K N"], group_sizes: Int[Array, "G"], *,
                   layer=None) -> Float[Array, "M N"]:
    """Rows sorted by group: rows of group g are multiplied by w[g]; rows past sum(group_sizes) give 0.

    Accumulates in float32 and returns x.dtype. With `layer` (an int, traced or not), w is a stack [R, G, K, N]
    and its layer `layer` is taken (a slice).
    """
    out = jax.lax.ragged_dot(x, layer_slice(w, layer), group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def gathered_matmul(x: Float[Array, "M K"], w: Float[Array, "G K N"], groups: Int[Array, "M"]) -> Float[Array, "M N"]:
    """Row i times w[groups[i]] (rows in any order, groups may repeat); a row whose group is outside [0, G) (an
    expert of another device) gives 0. Accumulates in float32, returns x.dtype.

    XLA gathers the chosen matrices (a copy of each) before the product."""
    G = w.shape[0]
    out = jnp.einsum("mk,mkn->mn", x, w[jnp.clip(groups, 0, G - 1)], preferred_element_type=jnp.float32)
    return jnp.where(((groups >= 0) & (groups < G))[:, None], out, 0).astype(x.dtype)
