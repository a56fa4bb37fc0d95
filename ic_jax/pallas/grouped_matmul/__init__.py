"""Grouped matmul (one weight matrix per group of sorted rows) and its decode form, the gathered matmul (one
chosen matrix per row): one entry point each over every implementation.

Both take `layer` for weights that are one layer of a stack [R, G, K, N] (the scanned layers' experts): the
kernels then read that layer in place, because a kernel given the slice `w[layer]` would copy it first (XLA
materialises a custom call's sliced operand: all G matrices, on every call)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ic_jax.pallas import dispatch
from ic_jax.pallas.grouped_matmul import gpu, reference

IMPLEMENTATIONS = {"xla": reference.grouped_matmul, "pallas_gpu": gpu.grouped_matmul}
GATHERED_IMPLEMENTATIONS = {"xla": reference.gathered_matmul, "pallas_gpu": gpu.gathered_matmul}


def _flat(w):
    return w.reshape(-1, *w.shape[2:])


def grouped_matmul(x, w, group_sizes, *, layer=None, implementation: str | None = None, interpret: bool = False):
    """See `reference.grouped_matmul` for the contract; `implementation` picks the kernel. With `layer`, w is a
    stack [R, G, K, N] and the groups are those of w[layer]: the kernel sees all R * G matrices with the other
    layers' groups empty; XLA (`ragged_dot`, a dense pass over every group on GPU) takes the slice."""
    if layer is not None:
        if dispatch.resolve(IMPLEMENTATIONS, implementation) == "xla":
            w = w[layer]
        else:
            R, G = w.shape[:2]
            sizes = jnp.zeros(R * G, group_sizes.dtype)
            group_sizes = jax.lax.dynamic_update_slice(sizes, group_sizes, (layer * G,))
            w = _flat(w)
    return dispatch.call("grouped_matmul", IMPLEMENTATIONS, (x, w, group_sizes),
                         implementation=implementation, interpret=interpret)


def gathered_matmul(x, w, groups, *, layer=None, implementation: str | None = None, interpret: bool = False):
    """See `reference.gathered_matmul` for the contract; `implementation` picks the kernel. With `layer`, w is a
    stack [R, G, K, N] and `groups` index w[layer]."""
    if layer is not None:
        groups = groups + layer * w.shape[1]
        w = _flat(w)
    return dispatch.call("gathered_matmul", GATHERED_IMPLEMENTATIONS, (x, w, groups),
                         implementation=implementation, interpret=interpret)
