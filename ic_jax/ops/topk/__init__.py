"""Top-k selection: one entry point over every implementation."""

from __future__ import annotations

import functools

from ic_jax.ops import dispatch
from ic_jax.ops.topk import gpu, reference, tpu

# few and short rows (decode at short context): XLA's sort beats the kernel's fixed cost; from LONG_ROW on, the
# kernel's filter, which splits few rows into segments, wins even at one row (BENCHMARKS.md, "Top-k")
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
