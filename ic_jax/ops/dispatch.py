"""Choosing an op implementation: "xla" (the pure-jnp reference), "pallas_gpu" (Triton lowering),
"pallas_tpu" (Mosaic TPU), or None for the best one on the current backend.

Ops raise ValueError for a broken contract (shapes, arguments that do not go together) and NotImplementedError
where an implementation cannot take an input (a kernel's block or dtype constraint): `call` then runs the next
implementation in its order, down to the XLA reference.
"""

from __future__ import annotations

from typing import Callable

import jax

MODEL_IMPLS = ("auto", "xla", "pallas")
PALLAS = ("pallas_gpu", "pallas_tpu")


def backend() -> str:
    return jax.default_backend()


def pallas_name() -> str:
    """The Pallas implementation for this backend; on CPU the GPU kernels run in interpret mode."""
    return "pallas_tpu" if backend() == "tpu" else "pallas_gpu"


def op_implementation(impl: str) -> tuple[str | None, bool]:
    """Maps the model-level choice (auto | xla | pallas) to (op implementation, interpret).

    auto is None on GPU/TPU: each op then picks per call (see `candidates`); on CPU it is XLA.
    """
    if impl not in MODEL_IMPLS:
        raise ValueError(f"model implementation {impl!r} is not one of {', '.join(MODEL_IMPLS)}")
    if impl == "xla" or (impl == "auto" and backend() == "cpu"):
        return "xla", False
    if impl == "auto":
        return None, False
    return pallas_name(), backend() == "cpu"


def candidates(op: str, table: dict[str, Callable], implementation: str | None, small: bool = False) -> list[str]:
    """The implementations `call` tries, in order; each but the last may decline the input (NotImplementedError).

    None: the backend's Pallas kernel, then XLA; only XLA on CPU and for `small` (decode-sized) calls on GPU,
    where one kernel program per row leaves most of the chip idle and XLA measured faster (BENCHMARKS.md,
    kernels table). A Pallas name: that kernel, then XLA; only XLA for an op with no kernel for that backend
    (the grouped matmul and the FP8 indexer logits on TPU)."""
    if implementation is None:
        first = "xla" if backend() == "cpu" or (small and backend() == "gpu") else pallas_name()
    elif implementation in table or implementation in PALLAS:
        first = implementation
    else:
        known = ", ".join(sorted({*table, *PALLAS}))
        raise ValueError(f"{op}: implementation {implementation!r} is not one of {known}, or None")
    return [name for name in dict.fromkeys((first, "xla")) if name in table]


def call(op: str, table: dict[str, Callable], args: tuple, *, implementation: str | None, interpret: bool,
         small: bool = False, **kwargs):
    """Runs `op` with the first of its `candidates` that takes the input; `kwargs` go to every implementation,
    `interpret` to the Pallas ones."""
    *tried, last = candidates(op, table, implementation, small)
    for name in tried:
        try:
            return _run(table[name], name, args, kwargs, interpret)
        except NotImplementedError:
            continue
    return _run(table[last], last, args, kwargs, interpret)


def _run(fn: Callable, name: str, args: tuple, kwargs: dict, interpret: bool):
    return fn(*args, **kwargs) if name == "xla" else fn(*args, **kwargs, interpret=interpret)
