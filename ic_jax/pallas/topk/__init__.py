"""Top-k selection: one entry point over every implementation."""

from __future__ import annotations

import functools

from ic_jax.pallas import dispatch
from ic_jax.pallas.topk import gpu, reference, tpu

# few and short rows (decode at short context): XLA's sort beats the kernel's fixed cost (H100: 0.047 vs 0.085 ms at
# 1 x 8K). From 32K on the kernel, whose filter splits few rows into segments, wins at 1 row (0.083 vs 0.146 ms at
# 32K, 0.113 vs 0.149 at 200K) and at 64 (0.15 vs 1.7 ms at 200K); BENCHMARKS.md, "Top-k"
SMALL_ROWS, LONG_ROW = 16, 32768
IMPLEMENTATIONS = {"xla": reference.topk_indices, "pallas_gpu": gpu.topk_indices, "pallas_tpu": tpu.topk_indices}


def topk_indices(logits, k: int, *, lengths=None, block_maxima=None, implementation: str | None = None,
                 interpret: bool = False):
    """See `reference.topk_indices` for the contract; kernels may return each row's set in another order.
    `lengths` [B, Tq]: each row holds only -inf from there on (the keys its query does not see; the caller's
    promise), so the GPU kernel need not read further. `block_maxima`: the maxima of `seed_block`-long runs of
    each row, the GPU kernel's seed. The others ignore both."""
    table = {**IMPLEMENTATIONS,
             "pallas_gpu": functools.partial(gpu.topk_indices, lengths=lengths, block_maxima=block_maxima)}
    return dispatch.call("topk", table, (logits, k), implementation=implementation, interpret=interpret,
                         small=_small(logits.shape))


def seed_block(shape: tuple[int, int, int], k: int, implementation: str | None = None) -> int | None:
    """For logits of `shape` [B, Tq, Tk]: the block length whose maxima `topk_indices` takes as `block_maxima`
    (only the GPU kernel takes them), or None."""
    if dispatch.candidates("topk", IMPLEMENTATIONS, implementation, _small(shape))[0] != "pallas_gpu":
        return None
    return gpu.seed_block(shape[-1], k)


def _small(shape) -> bool:
    B, Tq, Tk = shape
    return B * Tq < SMALL_ROWS and Tk < LONG_ROW
