"""Grouped matmul (one weight matrix per group of sorted rows) and its decode form, the gathered matmul (one
chosen matrix per row): one entry point each over every implementation.

Both take `layer` for weights that are one layer of a stack [R, G, K, N] (the scanned layers' experts): the
kernels then read that layer in place, because a kernel given the slice `w[layer]` would copy it first (XLA
materialises a custom call's sliced operand: all G matrices, on every call)."""

from __future__ import annotations

import jax.numpy as jnp

from ic_jax.ops import dispatch
from ic_jax.ops.grouped_matmul import gpu, reference

IMPLEMENTATIONS = {"xla": reference.grouped_matmul, "pallas_gpu": gpu.grouped_matmul}
GATHERED_IMPLEMENTATIONS = {"xla": reference.gathered_matmul, "pallas_gpu": gpu.gathered_matmul}


def grouped_matmul(x, w, group_sizes, *, layer=None, own=None, implementation: str | None = None,
                   interpret: bool = False):
    """See `reference.grouped_matmul` for the contract; `implementation` picks the kernel. With `layer`, w is a
    stack [R, G, K, N] and the groups are those of w[layer]: the kernel reads them in place
    (`gpu.layer_groups`); XLA (`ragged_dot`, a dense pass over every group on GPU) takes the slice, or `own`.
    `own`: w[layer] as the caller holds it already (a scan's slice of its stacked layers): XLA multiplies by it, so
    that the gradient goes to that slice (through the stack, a scan's backward pass would carry a gradient of the
    whole stack from step to step)."""
    table = IMPLEMENTATIONS
    if own is not None:
        table = {**table, "xla": lambda x, w, group_sizes, layer: reference.grouped_matmul(x, own, group_sizes)}
    return dispatch.call("grouped_matmul", table, (x, w, group_sizes), implementation=implementation,
                         interpret=interpret, layer=layer)


def gathered_matmul(x, w, groups, *, layer=None, implementation: str | None = None, interpret: bool = False):
    """See `reference.gathered_matmul` for the contract; `implementation` picks the kernel. With `layer`, w is a
    stack [R, G, K, N] and `groups` index w[layer]: every implementation sees the flat stack [R * G, K, N] and
    the groups offset into it, so that XLA too gathers only the chosen matrices."""
    if layer is not None:  # a group outside this layer's [0, G) must stay outside the flat stack too
        G = w.shape[1]
        groups = jnp.where((groups >= 0) & (groups < G), groups + layer * G, -1)
        w = w.reshape(-1, *w.shape[2:])
    return dispatch.call("gathered_matmul", GATHERED_IMPLEMENTATIONS, (x, w, groups),
                         implementation=implementation, interpret=interpret)
