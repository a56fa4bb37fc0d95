"""Indexer logits: one entry point over every implementation, and the logits with their block maxima (the seed
of the GPU top-k, `ic_jax.ops.indexer_topk`)."""

from __future__ import annotations

import functools

from ic_jax.ops import dispatch
from ic_jax.ops.indexer_logits import gpu, reference, tpu

IMPLEMENTATIONS = {"xla": reference.indexer_logits, "pallas_gpu": gpu.indexer_logits, "pallas_tpu": tpu.indexer_logits}
# no TPU kernel: not every TPU has an fp8 MXU, so pallas_tpu runs the XLA reference (see `dispatch.candidates`)
FP8_IMPLEMENTATIONS = {"xla": reference.indexer_logits_fp8, "pallas_gpu": gpu.indexer_logits_fp8}


def indexer_logits(q, k, w, q_pos, kv_len, *, fp8: bool | str = False, k_scale=None, layer=None,
                   implementation: str | None = None, interpret: bool = False):
    """See `reference.indexer_logits` for the contract; `implementation` picks the kernel. `fp8` quantizes q and k
    to e4m3 with a scale per vector (`reference.indexer_logits_fp8`; fp8="ue8m0": power-of-two scales, as
    DeepSeek's `scale_fmt`): for top-k selection only, since the
    rounding has no useful gradient (differentiating it raises). With `k_scale` [B, Tk] (and fp8), k is already
    e4m3, as an FP8 key cache holds it, and only q is quantized. With `layer` (an int, traced or not), k is a
    stacked cache [L, B, Tk, D] (k_scale [L, B, Tk]) and k[layer] is scored: the GPU kernel reads it in place,
    the others slice it."""
    op, table, args = _variant(q, k, w, q_pos, kv_len, fp8, k_scale)
    return dispatch.call(op, table, args, implementation=implementation, interpret=interpret, layer=layer)


def indexer_logits_and_maxima(q, k, w, q_pos, kv_len, block_max: int, *, fp8: bool | str = False, k_scale=None,
                              layer=None, implementation: str | None = None, interpret: bool = False):
    """(`indexer_logits(...)`, `reference.block_maxima(logits, block_max)`): the maxima of each `block_max`-long
    run of keys per query, the seed of the GPU top-k. The GPU kernel writes them with the logits, the others
    compute them after."""
    op, table, args = _variant(q, k, w, q_pos, kv_len, fp8, k_scale)

    def then_maxima(fn):
        def run(*a, **kw):
            logits = fn(*a, **kw)
            return logits, reference.block_maxima(logits, block_max)
        return run

    table = {name: functools.partial(fn, block_max=block_max) if name == "pallas_gpu" else then_maxima(fn)
             for name, fn in table.items()}
    return dispatch.call(op, table, args, implementation=implementation, interpret=interpret, layer=layer)


def _variant(q, k, w, q_pos, kv_len, fp8: bool | str, k_scale):
    """(op name, implementations, arguments) of the bf16 or the FP8 logits."""
    if not fp8:
        if k_scale is not None:
            raise ValueError("indexer_logits: k_scale is for pre-quantized keys; pass fp8=True with it")
        return "indexer_logits", IMPLEMENTATIONS, (q, k, w, q_pos, kv_len)
    if fp8 not in (True, "ue8m0"):
        raise ValueError(f"indexer_logits: fp8 is False, True or 'ue8m0', got {fp8!r}")
    table = {name: functools.partial(fn, pow2=fp8 == "ue8m0") for name, fn in FP8_IMPLEMENTATIONS.items()}
    return "indexer_logits_fp8", table, (q, k, w, q_pos, kv_len, k_scale)
