"""Indexer logits: one entry point over every implementation."""

from __future__ import annotations

from ic_jax.pallas import dispatch
from ic_jax.pallas.indexer_logits import gpu, reference, tpu

IMPLEMENTATIONS = {"xla": reference.indexer_logits, "pallas_gpu": gpu.indexer_logits, "pallas_tpu": tpu.indexer_logits}
# no TPU kernel: not every TPU has an fp8 MXU, so pallas_tpu runs the XLA reference (see `dispatch.call`)
FP8_IMPLEMENTATIONS = {"xla": reference.indexer_logits_fp8, "pallas_gpu": gpu.indexer_logits_fp8}


def indexer_logits(q, k, w, q_pos, kv_len, *, fp8: bool = False, implementation: str | None = None,
                   interpret: bool = False):
    """See `reference.indexer_logits` for the contract; `implementation` picks the kernel. `fp8` quantizes q and k
    to e4m3 with a scale per vector (`reference.indexer_logits_fp8`): for top-k selection only, since the
    rounding has no useful gradient (differentiating it raises)."""
    op, table = ("indexer_logits_fp8", FP8_IMPLEMENTATIONS) if fp8 else ("indexer_logits", IMPLEMENTATIONS)
    return dispatch.call(op, table, (q, k, w, q_pos, kv_len), implementation=implementation, interpret=interpret)
