"""The DSA ops, one folder each: a jnp reference, Pallas kernels, and one dispatching entry point."""

from ic_jax.pallas.indexer_logits import indexer_logits
from ic_jax.pallas.sparse_mla import sparse_mla
from ic_jax.pallas.topk import topk_indices

__all__ = ["indexer_logits", "sparse_mla", "topk_indices"]
