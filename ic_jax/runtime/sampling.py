"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), all inside jit.

`sample` applies one setting to the whole batch (a static `Sampling`); `sample_rows` gives every row its own
settings and random key (`RowSampling`, arrays [B]), as a server batching requests of different users does."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off


def sample(logits: Float[Array, "B V"], key: Array, s: Sampling) -> Int[Array, "B"]:
    if s.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / s.temperature
    if s.top_k > 0:
        kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        sorted_logits = jnp.where(before < s.top_p, sorted_logits, -jnp.inf)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """One `Sampling` per row, as arrays [B] (same meanings: temperature 0 = greedy, top_k 0 and top_p 1 = off)."""

    temperature: Float[Array, "B"]
    top_k: Int[Array, "B"]
    top_p: Float[Array, "B"]

    @classmethod
    def of(cls, settings: list[Sampling]) -> RowSampling:
        return cls(jnp.asarray([s.temperature for s in settings], jnp.float32),
                   jnp.asarray([s.top_k for s in settings], jnp.int32),
                   jnp.asarray([s.top_p for s in settings], jnp.float32))


def row_keys(seeds: Int[Array, "B"], counters: Int[Array, "B"]) -> Array:
    """One key per row from its seed and a counter (the row's token number), so that a request samples the same
    tokens whatever batch or slot it runs in."""
    return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, counters)


def sample_rows(logits: Float[Array, "B V"], keys: Array, s: RowSampling) -> Int[Array, "B"]:
    """`sample` with row b's settings taken from s[b] and its randomness from keys[b]. Works on the logits sorted
    once per row: top-k keeps what is at least the k-th largest, top-p the smallest prefix reaching p."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    scaled = logits.astype(jnp.float32) / temperature
    order = jnp.argsort(-scaled, axis=-1)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    k = jnp.clip(s.top_k, 1, logits.shape[-1])[:, None]
    kth = jnp.take_along_axis(ranked, k - 1, axis=-1)
    ranked = jnp.where((s.top_k[:, None] > 0) & (ranked < kth), -jnp.inf, ranked)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    ranked = jnp.where((s.top_p[:, None] >= 1.0) | (before < s.top_p[:, None]), ranked, -jnp.inf)
    pick = jax.vmap(jax.random.categorical)(keys, ranked)
    sampled = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(s.temperature > 0, sampled, greedy)
