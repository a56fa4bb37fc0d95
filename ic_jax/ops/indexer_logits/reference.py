"""Lightning-indexer logits in plain jnp: the definition of correct for every kernel of this op, in bf16 and in
FP8 (e4m3 with one fp32 scale per vector, as DeepSeek quantizes the indexer)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ic_jax.ops.common import layer_slice

FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def indexer_logits(
    q: Float[Array, "B Tq H D"],
    k: Float[Array, "B Tk D"],
    w: Float[Array, "B Tq H"],
    q_pos: Int[Array, "B Tq"],
    kv_len: Int[Array, "B"],
    *,
    layer=None,
) -> Float[Array, "B Tq Tk"]:
    """I[b, t, s] = sum_h w[b, t, h] * relu(q[b, t, h] . k[b, s]), in fp32.

    Key s is visible to query t iff s <= q_pos[b, t] and s < kv_len[b]; invisible keys get -inf.
    The heads are reduced one at a time, so no [Tq, H, Tk] intermediate exists.
    With `layer` (an int, traced or not), k is a stacked key cache [L, B, Tk, D] and k[layer] is scored.
    """
    k = layer_slice(k, layer)
    w = w.astype(jnp.float32)

    def add_head(acc, qw):
        qh, wh = qw
        s = jnp.einsum("btd,bsd->bts", qh, k, preferred_element_type=jnp.float32)
        return acc + wh[..., None] * jax.nn.relu(s), None

    B, Tq, H, _ = q.shape
    acc = jnp.zeros((B, Tq, k.shape[1]), jnp.float32)
    acc, _ = jax.lax.scan(add_head, acc, (jnp.moveaxis(q, 2, 0), jnp.moveaxis(w, 2, 0)))
    return jnp.where(visible_mask(q_pos, kv_len, k.shape[1]), acc, -jnp.inf)


def indexer_logits_fp8(q, k, w, q_pos, kv_len, k_scale=None, *, layer=None, pow2: bool = False
                       ) -> Float[Array, "B Tq Tk"]:
    """The FP8 variant of `indexer_logits`: q and k quantized by `fp8_inputs`, the formula evaluated on the
    dequantized e4m3 values in fp32 (their products are exact, so a kernel differs in summation order, and on
    Hopper's fp8 MMA in the precision of each dot's accumulator). With `k_scale` [B, Tk], k is already
    quantized (e4m3, as an FP8 key cache holds it). `layer` as for `indexer_logits` (k_scale then [L, B, Tk]);
    `pow2` as for `quantize_fp8`."""
    q8, k8, wq, k_scale = fp8_inputs(q, layer_slice(k, layer), w, layer_slice(k_scale, layer), pow2=pow2)
    # the barrier keeps XLA (GPU, excess precision allowed) from folding the f32 -> e4m3 -> f32 round trip away
    q8, k8 = jax.lax.optimization_barrier((q8, k8))
    return indexer_logits(q8.astype(jnp.float32), k8.astype(jnp.float32), wq, q_pos, kv_len) * k_scale[:, None, :]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def quantize_fp8(x: Float[Array, "... D"], pow2: bool = False) -> tuple[Array, Float[Array, "..."]]:
    """Per-vector e4m3: x ~ x8 * scale[..., None] with scale = amax / 448 over the last axis (1 for zero vectors),
    rounded up to a power of two with `pow2` (`scale_fmt: ue8m0`, as DeepSeek quantizes its indexer's inputs).

    Not differentiable (JAX would pass gradients straight through the rounding, silently): FP8 logits are for
    top-k selection, and differentiating them raises."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    if pow2:  # up, so that amax / scale stays within e4m3's range
        scale = jnp.exp2(jnp.ceil(jnp.log2(scale)))
    return jnp.clip(x / scale[..., None], -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn), scale


@quantize_fp8.defjvp
def _no_gradient(pow2, primals, tangents):
    raise TypeError("FP8 indexer logits have no gradient; differentiate the bf16 logits (fp8=False) instead")


def fp8_inputs(q: Float[Array, "B Tq H D"], k: Float[Array, "B Tk D"], w: Float[Array, "B Tq H"], k_scale=None,
               pow2: bool = False):
    """(q8, k8, w * q_scale, k_scale); k is taken as quantized when `k_scale` is given, and then passes through
    as it is (a stacked cache too). The scales are positive, so relu(sq sk x) = sq sk relu(x): the logits are
    k_scale[s] * sum_h (w * q_scale)[h] relu(q8[h] . k8[s]), the k scale applied once after the head sum.
    `pow2` as for `quantize_fp8`."""
    q8, q_scale = quantize_fp8(q, pow2)
    k8, k_scale = quantize_fp8(k, pow2) if k_scale is None else (k, k_scale.astype(jnp.float32))
    return q8, k8, w.astype(jnp.float32) * q_scale, k_scale


def block_maxima(logits: Float[Array, "B Tq Tk"], block: int) -> Float[Array, "B Tq nb"]:
    """The maximum of each `block`-long run of keys per query (the last run ragged): the seed of the GPU top-k,
    which the GPU kernel computes as it writes the logits."""
    B, Tq, Tk = logits.shape
    nb = -(-Tk // block)
    padded = jnp.pad(logits, [(0, 0), (0, 0), (0, nb * block - Tk)], constant_values=-jnp.inf)
    return padded.reshape(B, Tq, nb, block).max(-1)


def visible_mask(q_pos: Int[Array, "B Tq"], kv_len: Int[Array, "B"], tk: int) -> Array:
    s = jnp.arange(tk, dtype=jnp.int32)
    return (s[None, None, :] <= q_pos[:, :, None]) & (s[None, None, :] < kv_len[:, None, None])
