"""Indexer logits: one entry point over every implementation."""

from __future__ import annotations

from ic_jax.pallas import dispatch
from ic_jax.pallas.indexer_logits import gpu, reference, tpu

IMPLEMENTATIONS = {"xla": reference.indexer_logits, "pallas_gpu": gpu.indexer_logits, "pallas_tpu": tpu.indexer_logits}


def indexer_logits(q, k, w, q_pos, kv_len, *, implementation: str | None = None, interpret: bool = False):
    """See `reference.indexer_logits` for the contract; `implementation` picks the kernel."""
    return dispatch.call("indexer_logits", IMPLEMENTATIONS, (q, k, w, q_pos, kv_len),
                         implementation=implementation, interpret=interpret)
