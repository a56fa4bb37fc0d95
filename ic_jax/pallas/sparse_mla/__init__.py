"""Sparse MLA attention: one entry point over every implementation."""

from __future__ import annotations

from ic_jax.pallas import dispatch
from ic_jax.pallas.sparse_mla import gpu, reference, tpu

IMPLEMENTATIONS = {"xla": reference.sparse_mla, "pallas_gpu": gpu.sparse_mla, "pallas_tpu": tpu.sparse_mla}


def sparse_mla(q_lat, q_rope, kv, k_rope, indices, scale: float, *, implementation: str | None = None,
               interpret: bool = False):
    """See `reference.sparse_mla` for the contract; `implementation` picks the kernel."""
    fn = dispatch.select("sparse_mla", implementation, IMPLEMENTATIONS)
    if fn is reference.sparse_mla:
        return fn(q_lat, q_rope, kv, k_rope, indices, scale)
    return fn(q_lat, q_rope, kv, k_rope, indices, scale, interpret=interpret)
