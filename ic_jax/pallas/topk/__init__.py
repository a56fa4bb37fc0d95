"""Top-k selection: one entry point over every implementation."""

from __future__ import annotations

from ic_jax.pallas import dispatch
from ic_jax.pallas.topk import gpu, reference, tpu

# fewer rows: XLA's sort beats one kernel program per row (H100: 0.13 vs 0.17 ms at 1 x 200K; the kernel wins at 64
# rows, 0.23 vs 1.7 ms; BENCHMARKS.md, kernels table)
SMALL_ROWS = 16
IMPLEMENTATIONS = {"xla": reference.topk_indices, "pallas_gpu": gpu.topk_indices, "pallas_tpu": tpu.topk_indices}


def topk_indices(logits, k: int, *, implementation: str | None = None, interpret: bool = False):
    """See `reference.topk_indices` for the contract; kernels may return each row's set in another order."""
    return dispatch.call("topk", IMPLEMENTATIONS, (logits, k),
                         implementation=implementation, interpret=interpret, small=logits.shape[0] * logits.shape[1] < SMALL_ROWS)
