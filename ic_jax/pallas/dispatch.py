"""Choosing an op implementation: "xla" (the pure-jnp reference), "pallas_gpu" (Triton lowering),
"pallas_tpu" (Mosaic TPU), or None for the best one on the current backend."""

from __future__ import annotations

from typing import Callable

import jax

from ic_jax.errors import UserError

MODEL_IMPLS = ("auto", "xla", "pallas")


def backend() -> str:
    return jax.default_backend()


def pallas_name() -> str:
    """The Pallas implementation for this backend; on CPU the GPU kernels run in interpret mode."""
    return "pallas_tpu" if backend() == "tpu" else "pallas_gpu"


def op_implementation(impl: str) -> tuple[str | None, bool]:
    """Maps the model-level choice (auto | xla | pallas) to (op implementation, interpret).

    auto is None on GPU/TPU: each op then picks per call (see `call`); on CPU it is XLA.
    """
    if impl not in MODEL_IMPLS:
        raise UserError(f"--impl {impl!r} is not one of {', '.join(MODEL_IMPLS)}")
    if impl == "xla" or (impl == "auto" and backend() == "cpu"):
        return "xla", False
    if impl == "auto":
        return None, False
    return pallas_name(), backend() == "cpu"


def resolve(table: dict[str, Callable], implementation: str | None, small: bool = False) -> str:
    """The implementation `call` runs. None picks the backend's Pallas kernel, except for `small` (decode-sized)
    calls on GPU, where one kernel program per row leaves most of the chip idle and XLA measured faster
    (BENCHMARKS.md, kernels table). An op with no kernel for the requested Pallas backend (the grouped matmul and
    the FP8 indexer logits on TPU) runs its XLA reference."""
    if implementation in ("pallas_gpu", "pallas_tpu") and implementation not in table:
        return "xla"
    if implementation is None:
        cpu_or_small = backend() == "cpu" or (small and backend() == "gpu")
        return "xla" if cpu_or_small or pallas_name() not in table else pallas_name()
    return implementation


def call(op: str, table: dict[str, Callable], args: tuple, *, implementation: str | None, interpret: bool,
         small: bool = False):
    """Runs `op` with the implementation `resolve` picks."""
    implementation = resolve(table, implementation, small)
    if implementation not in table:
        raise UserError(f"{op}: implementation {implementation!r} is not available; choose from {', '.join(table)}")
    fn = table[implementation]
    return fn(*args) if implementation == "xla" else fn(*args, interpret=interpret)
