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


def op_implementation(impl: str) -> tuple[str, bool]:
    """Maps the model-level choice (auto | xla | pallas) to (op implementation, interpret)."""
    if impl not in MODEL_IMPLS:
        raise UserError(f"--impl {impl!r} is not one of {', '.join(MODEL_IMPLS)}")
    if impl == "xla" or (impl == "auto" and backend() == "cpu"):
        return "xla", False
    return pallas_name(), backend() == "cpu"


def select(op: str, implementation: str | None, table: dict[str, Callable]) -> Callable:
    if implementation is None:
        implementation = pallas_name() if backend() != "cpu" else "xla"
        if implementation not in table:
            implementation = "xla"
    if implementation not in table:
        raise UserError(f"{op}: implementation {implementation!r} is not available; choose from {', '.join(table)}")
    return table[implementation]
