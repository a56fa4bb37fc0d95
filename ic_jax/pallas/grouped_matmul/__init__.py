"""Grouped matmul (one weight matrix per group of sorted rows) and its decode form, the gathered matmul (one
chosen matrix per row): one entry point each over every implementation."""

from __future__ import annotations

from ic_jax.pallas import dispatch
from ic_jax.pallas.grouped_matmul import gpu, reference

IMPLEMENTATIONS = {"xla": reference.grouped_matmul, "pallas_gpu": gpu.grouped_matmul}
GATHERED_IMPLEMENTATIONS = {"xla": reference.gathered_matmul, "pallas_gpu": gpu.gathered_matmul}


def grouped_matmul(x, w, group_sizes, *, implementation: str | None = None, interpret: bool = False):
    """See `reference.grouped_matmul` for the contract; `implementation` picks the kernel."""
    return dispatch.call("grouped_matmul", IMPLEMENTATIONS, (x, w, group_sizes),
                         implementation=implementation, interpret=interpret)


def gathered_matmul(x, w, groups, *, implementation: str | None = None, interpret: bool = False):
    """See `reference.gathered_matmul` for the contract; `implementation` picks the kernel."""
    return dispatch.call("gathered_matmul", GATHERED_IMPLEMENTATIONS, (x, w, groups),
                         implementation=implementation, interpret=interpret)
