"""How one compiled forward pass runs: what it computes (the mode) and how its ops run.

The options are static (hashable): a jitted function takes them as a static argument, and each distinct
value compiles its own program.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh

from ic_jax.ops.dispatch import op_implementation

MODES = ("infer", "train")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Static choices for one compiled forward.

    `mode` says what the forward computes; the model returns (logits, aux) in both, aux holding one dict per layer:
      "infer": sparse attention over each query's selected keys through the ops (`implementation`); every
               layer's aux dict is empty. Prefill, decode, evaluation and search.
      "train": the same function computed densely with the selection as a mask (differentiable, fine at training
               lengths), and each layer's aux dict holds what the indexer losses need: "attn" (head-averaged
               attention probabilities [B, T, S]), "indices" [B, T, K], and for layers that run their indexer
               the indexer "logits" [B, T, S] (see `ic_jax.model.dsa.Block`). Training, distillation, the overlap
               analysis.
    """

    mode: str = "infer"
    implementation: str | None = "xla"  # xla | pallas_gpu | pallas_tpu | None (each op picks per call)
    interpret: bool = False  # run Pallas kernels in interpret mode (CPU)
    index_block: int = 256  # queries per indexer block: logits are [block, Tk] at a time
    remat: bool = False  # rematerialise each layer group in the backward pass
    mesh: Mesh | None = None  # the device mesh the params and caches lie on: ops then run per shard (inference)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"RunOptions mode {self.mode!r} is not one of {', '.join(MODES)}")

    @classmethod
    def for_impl(cls, impl: str = "auto") -> "RunOptions":
        """Inference options for a model-level --impl choice (auto | xla | pallas) on the current backend."""
        implementation, interpret = op_implementation(impl)
        on_accelerator = jax.default_backend() != "cpu"
        return cls(implementation=implementation, interpret=interpret, index_block=2048 if on_accelerator else 256)
