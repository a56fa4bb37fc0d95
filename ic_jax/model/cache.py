"""The inference cache: typed buffers per layer, each dim named by a logical axis.

Every layer caches MLA's normalised latent c_kv and its shared RoPE key (`LayerCache`); an F layer also caches its
indexer key, and with `cfg.indexer_fp8` an e4m3 copy of it with one scale per key (`IndexedLayerCache`). The
buffers of a layer group are stacked like its params: each is [layers, batch, positions, dim], the batch always
at axis 1 (a scheduler slices request slots there). The caches of a model are a list per stage of one cache per
group position (`Cache`). `ic_jax.runtime.sharding` maps the logical axes to mesh axes by the rules it uses for
params.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from ic_jax.model.config import ModelConfig
from ic_jax.model.layers import dtype_of
from ic_jax.model.pattern import LayerKind, Stage

BATCH_AXIS = 1  # of every buffer


def buffer(*axes: str, optional: bool = False):
    """A cache field whose dims carry the logical axes `axes`; an optional one may be None (not cached)."""
    return dataclasses.field(metadata={"axes": axes}, **({"default": None} if optional else {}))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """What every layer caches (all an S layer needs)."""

    kv: Array = buffer("layers", "batch", "positions", "kv_lora")
    k_rope: Array = buffer("layers", "batch", "positions", "rope_dim")

    def buffers(self) -> dict[str, tuple[Array, tuple[str, ...]]]:
        """Name -> (buffer, its logical axes), for the buffers this layer caches."""
        return {f.name: (getattr(self, f.name), f.metadata["axes"]) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    def written(self, layer, positions: Int[Array, "B T"], **new: Array):
        """This cache with each named buffer's new entries [B, T, X] written at (layer, b, positions[b, t])."""
        return dataclasses.replace(self, **{name: write(getattr(self, name), layer, x, positions)
                                            for name, x in new.items()})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IndexedLayerCache(LayerCache):
    """An F layer's cache: also the indexer key, and with indexer_fp8 the e4m3 copy that top-k selection reads
    (the KL loss reads `index_k`) with one scale per key."""

    index_k: Array = buffer("layers", "batch", "positions", "index_dim")
    index_k8: Array | None = buffer("layers", "batch", "positions", "index_dim", optional=True)
    index_k_scale: Array | None = buffer("layers", "batch", "positions", "scale", optional=True)


Cache = list  # per stage, one LayerCache or IndexedLayerCache per group position


def is_layer_cache(x) -> bool:
    return isinstance(x, LayerCache)


def write(buf: Array, layer, new: Array, positions: Int[Array, "B T"]) -> Array:
    """Writes new [B, T, X] into buf [R, B, T_max, X] at (layer, b, positions[b, t]); out-of-range is dropped."""
    b = jnp.arange(new.shape[0])[:, None]
    return buf.at[layer, b, positions].set(new.astype(buf.dtype), mode="drop")


def max_positions(cache: Cache) -> int:
    return cache[0][0].kv.shape[2]


def init_cache(cfg: ModelConfig, stages: tuple[Stage, ...], batch: int, max_len: int) -> Cache:
    dt = dtype_of(cfg)

    def zeros(reps: int, dim: int, dtype=dt):
        return jnp.zeros((reps, batch, max_len, dim), dtype)

    def layer_cache(kind: LayerKind, reps: int) -> LayerCache:
        latent = dict(kv=zeros(reps, cfg.kv_lora_rank), k_rope=zeros(reps, cfg.qk_rope_head_dim))
        if not kind.full:
            return LayerCache(**latent)
        if not cfg.indexer_fp8:
            return IndexedLayerCache(**latent, index_k=zeros(reps, cfg.index_head_dim))
        return IndexedLayerCache(**latent, index_k=zeros(reps, cfg.index_head_dim),
                                 index_k8=zeros(reps, cfg.index_head_dim, jnp.float8_e4m3fn),
                                 index_k_scale=jnp.ones((reps, batch, max_len, 1), jnp.float32))

    return [[layer_cache(k, s.repeats) for k in s.kinds] for s in stages]
