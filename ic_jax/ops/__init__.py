"""The DSA ops, one folder each: a jnp reference, Pallas kernels, and one dispatching entry point (`dispatch`).
`indexer_topk` joins two of them, the indexer logits and their top-k, into the one op the model calls."""

from ic_jax.ops.grouped_matmul import gathered_matmul, grouped_matmul
from ic_jax.ops.indexer_logits import indexer_logits
from ic_jax.ops.indexer_topk import indexer_topk
from ic_jax.ops.sparse_mla import sparse_mla
from ic_jax.ops.topk import topk_indices

__all__ = ["gathered_matmul", "grouped_matmul", "indexer_logits", "indexer_topk", "sparse_mla", "topk_indices"]
