"""Small helpers shared by the Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

NEG_INF_KEY = -(2**31) + 0x7FFFFF  # order_key(-inf): finite values (logits hold no NaN) have larger keys


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def prev_pow2(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def order_key(x: jax.Array) -> jax.Array:
    """float32 -> int32 whose signed order is the float order (-0.0 sorts just below +0.0)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def layer_slice(x: jax.Array | None, layer) -> jax.Array | None:
    """x[layer] of a stack [L, ...] (`layer` an int, traced or not); x itself when `layer` (or x) is None."""
    return x if layer is None or x is None else jax.lax.dynamic_index_in_dim(x, layer, keepdims=False)


def tpu_interpret(interpret: bool):
    """interpret=True runs a TPU kernel on CPU in the TPU interpreter, which raises on out-of-bounds reads."""
    return pltpu.InterpretParams(out_of_bounds_reads="raise") if interpret else False


def split_axes(mesh, dim: int, *axes: str) -> tuple[str, ...] | None:
    """The mesh axes among `axes` (in order, each of size > 1) whose product divides `dim`: one array dim split
    over them, for a PartitionSpec entry; None (the dim stays whole) when none does."""
    chosen, size = [], 1
    for axis in axes:
        n = mesh.shape.get(axis, 1)
        if n > 1 and dim % (size * n) == 0:
            chosen.append(axis)
            size *= n
    return tuple(chosen) or None


def per_shard(fn, mesh, in_specs, out_specs):
    """`fn` run on each device's shards (`jax.shard_map`, the same API on jax 0.10 and 0.11). Operands are cut by
    `in_specs` and never gathered whole; Pallas kernels inside see only their shard. The replication check is off:
    it has no rules for Pallas calls."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
