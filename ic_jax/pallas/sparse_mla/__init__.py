"""Sparse MLA attention: one entry point over every implementation."""

from __future__ import annotations

from ic_jax.pallas import dispatch
from ic_jax.pallas.sparse_mla import gpu, reference, tpu

# decode batches up to this run XLA (H100: 0.076 vs 0.083 ms at 1 x 200K; the kernel wins at 64, 0.078 vs 0.27 ms;
# BENCHMARKS.md, kernels table)
SMALL_QUERIES = 16
IMPLEMENTATIONS = {"xla": reference.sparse_mla, "pallas_gpu": gpu.sparse_mla, "pallas_tpu": tpu.sparse_mla}


def sparse_mla(q_lat, q_rope, kv, k_rope, indices, scale: float, *, implementation: str | None = None,
               interpret: bool = False):
    """See `reference.sparse_mla` for the contract; `implementation` picks the kernel."""
    small = q_lat.shape[0] * q_lat.shape[1] <= SMALL_QUERIES
    return dispatch.call("sparse_mla", IMPLEMENTATIONS, (q_lat, q_rope, kv, k_rope, indices, scale),
                         implementation=implementation, interpret=interpret, small=small)
