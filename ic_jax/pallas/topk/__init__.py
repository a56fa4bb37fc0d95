"""Top-k selection: one entry point over every implementation."""

from __future__ import annotations

from ic_jax.pallas import dispatch
from ic_jax.pallas.topk import gpu, reference, tpu

IMPLEMENTATIONS = {"xla": reference.topk_indices, "pallas_gpu": gpu.topk_indices, "pallas_tpu": tpu.topk_indices}


def topk_indices(logits, k: int, *, implementation: str | None = None, interpret: bool = False):
    """See `reference.topk_indices` for the contract; kernels may return each row's set in another order."""
    fn = dispatch.select("topk", implementation, IMPLEMENTATIONS)
    if fn is reference.topk_indices:
        return fn(logits, k)
    return fn(logits, k, interpret=interpret)
