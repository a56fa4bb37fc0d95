"""Indexer logits: one entry point over every implementation."""

from __future__ import annotations

from ic_jax.pallas import dispatch
from ic_jax.pallas.indexer_logits import gpu, reference, tpu

IMPLEMENTATIONS = {"xla": reference.indexer_logits, "pallas_gpu": gpu.indexer_logits, "pallas_tpu": tpu.indexer_logits}
# no TPU kernel: not every TPU has an fp8 MXU, so pallas_tpu runs the XLA reference (see `dispatch.call`)
FP8_IMPLEMENTATIONS = {"xla": reference.indexer_logits_fp8, "pallas_gpu": gpu.indexer_logits_fp8}


def indexer_logits(q, k, w, q_pos, kv_len, *, fp8: bool = False, k_scale=None, implementation: str | None = None,
                   interpret: bool = False):
    """See `reference.indexer_logits` for the contract; `implementation` picks the kernel. `fp8` quantizes q and k
    to e4m3 with a scale per vector (`reference.indexer_logits_fp8`): for top-k selection only, since the
    rounding has no useful gradient (differentiating it raises). With `k_scale` [B, Tk] (and fp8), k is already
    e4m3, as an FP8 key cache holds it, and only q is quantized."""
    if not fp8:
        if k_scale is not None:
            raise ValueError("indexer_logits: k_scale is for pre-quantized keys; pass fp8=True with it")
        return dispatch.call("indexer_logits", IMPLEMENTATIONS, (q, k, w, q_pos, kv_len),
                             implementation=implementation, interpret=interpret)
    return dispatch.call("indexer_logits_fp8", FP8_IMPLEMENTATIONS, (q, k, w, q_pos, kv_len, k_scale),
                         implementation=implementation, interpret=interpret)
