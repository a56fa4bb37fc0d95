"""Multi-head latent attention (MLA) and the lightning indexer of DeepSeek Sparse Attention.

MLA keeps a latent cache per token: c_kv (kv_lora_rank) and one shared RoPE key (qk_rope_head_dim).
Attention runs in the absorbed form: q_nope is mapped into the latent space through W_UK, the latent
output is mapped back through W_UV. The indexer scores every visible key with
    I[t, s] = sum_h w[t, h] * relu(q_I[t, h] . k_I[s])
and its top-k picks the keys that MLA attends to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from ic_jax import ops
from ic_jax.ops.indexer_topk.sharding import indexer_topk_sharded
from ic_jax.ops.sparse_mla.sharding import sparse_mla_sharded
from ic_jax.model.config import ModelConfig
from ic_jax.model.layers import LayerNorm, RMSNorm, apply_rope, dtype_of, hadamard, param, rope_inv_freq
from ic_jax.model.run_options import RunOptions


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack=(), out_std: float | None = None):
        D, H, dt = cfg.hidden_size, cfg.num_attention_heads, dtype_of(cfg)
        C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.cfg = cfg
        self.wq_a = param(rngs, (D, cfg.q_lora_rank), ("embed", "q_lora"), dt, stack)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, rngs, stack)
        self.wq_b = param(rngs, (cfg.q_lora_rank, H, cfg.qk_head_dim), ("q_lora", "heads", "head_dim"), dt, stack)
        self.wkv_a = param(rngs, (D, C + R), ("embed", "kv_lora"), dt, stack)
        self.kv_norm = RMSNorm(C, cfg.rms_norm_eps, rngs, stack)
        self.wkv_b = param(rngs, (C, H, cfg.qk_nope_head_dim + cfg.v_head_dim), ("kv_lora", "heads", "head_dim"),
                           dt, stack)
        self.wo = param(rngs, (H, cfg.v_head_dim, D), ("heads", "head_dim", "embed"), dt, stack,
                        std=out_std or (H * cfg.v_head_dim) ** -0.5)

    def queries(self, x: Float[Array, "B T D"], positions: Int[Array, "B T"]):
        """Returns the q latent (for the indexer) and the absorbed queries: latent part and RoPE part."""
        cfg = self.cfg
        cq = self.q_norm(x @ self.wq_a[...])
        q = jnp.einsum("btq,qhd->bthd", cq, self.wq_b[...])
        q_nope, q_rope = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        q_rope = apply_rope(q_rope, positions, rope_inv_freq(cfg, cfg.qk_rope_head_dim), cfg.rope_interleave)
        w_uk = self.wkv_b[...][..., : cfg.qk_nope_head_dim]
        q_lat = jnp.einsum("bthd,chd->bthc", q_nope, w_uk)
        return cq, q_lat, q_rope

    def latents(self, x: Float[Array, "B T D"], positions: Int[Array, "B T"]):
        """The per-token cache entries: normalised c_kv [B, T, C] and the shared RoPE key [B, T, R]."""
        cfg = self.cfg
        kv = x @ self.wkv_a[...]
        c_kv = self.kv_norm(kv[..., : cfg.kv_lora_rank])
        k_rope = apply_rope(kv[..., cfg.kv_lora_rank:], positions, rope_inv_freq(cfg, cfg.qk_rope_head_dim),
                            cfg.rope_interleave)
        return c_kv, k_rope

    def output(self, o_lat: Float[Array, "B T H C"]) -> Float[Array, "B T D"]:
        w_uv = self.wkv_b[...][..., self.cfg.qk_nope_head_dim:]
        o = jnp.einsum("bthc,chv->bthv", o_lat, w_uv)
        return jnp.einsum("bthv,hvd->btd", o, self.wo[...])


class Indexer(nnx.Module):
    """The lightning indexer: H_I query heads from the q latent, one LayerNorm'd key head, fp32 head weights."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack=()):
        D, HI, DI, dt = cfg.hidden_size, cfg.index_n_heads, cfg.index_head_dim, dtype_of(cfg)
        self.cfg = cfg
        self.wq = param(rngs, (cfg.q_lora_rank, HI, DI), ("q_lora", "index_heads", "index_dim"), dt, stack)
        self.wk = param(rngs, (D, DI), ("embed", "index_dim"), dt, stack)
        self.k_norm = LayerNorm(DI, 1e-6, rngs, stack)
        self.w_heads = param(rngs, (D, HI), ("embed", "index_heads"), jnp.float32, stack)

    def _rotate(self, x, positions):
        cfg = self.cfg
        R = cfg.qk_rope_head_dim
        x_rope = apply_rope(x[..., :R], positions, rope_inv_freq(cfg, R), cfg.indexer_rope_interleave)
        x = jnp.concatenate([x_rope, x[..., R:]], axis=-1)
        if cfg.indexer_hadamard:
            x = (x.astype(jnp.float32) @ hadamard(cfg.index_head_dim)).astype(x.dtype)
        return x

    def keys(self, x: Float[Array, "B T D"], positions: Int[Array, "B T"]) -> Float[Array, "B T DI"]:
        return self._rotate(self.k_norm(x @ self.wk[...]), positions)

    def queries(self, x: Float[Array, "B T D"], cq: Float[Array, "B T Q"], positions: Int[Array, "B T"]):
        """Indexer queries [B, T, H_I, D_I] and head weights [B, T, H_I] (fp32, scaled by H_I^-1/2 D_I^-1/2)."""
        cfg = self.cfg
        q = self._rotate(jnp.einsum("btq,qhd->bthd", cq, self.wq[...]), positions)
        w = (x.astype(jnp.float32) @ self.w_heads[...]) * (cfg.index_n_heads * cfg.index_head_dim) ** -0.5
        return q, w


def select_topk(q: Float[Array, "B T H D"], keys: Float[Array, "L B S D"], w: Float[Array, "B T H"],
                q_pos: Int[Array, "B T"], kv_len: Int[Array, "B"], topk: int, opts: RunOptions, layer,
                k_scale: Float[Array, "L B S"] | None = None, scale_fmt: str | None = None) -> Int[Array, "B T K"]:
    """Top-k key indices per query (-1 padded) over layer `layer` of the stacked key cache, read in place
    (`ops.indexer_topk`), `opts.index_block` queries at a time, per shard of `opts.mesh` when there is one.
    With `k_scale` the keys are e4m3 (an FP8 key cache) and the logits FP8, q scaled as `scale_fmt` says."""
    fp8 = (scale_fmt or True) if k_scale is not None else False  # True: exact amax / 448 scales
    args = (q, keys, w, q_pos, kv_len, topk)
    kw = dict(fp8=fp8, k_scale=k_scale, layer=layer, block_q=opts.index_block,
              implementation=opts.implementation, interpret=opts.interpret)
    if opts.mesh is not None:
        return indexer_topk_sharded(opts.mesh, *args, **kw)
    return ops.indexer_topk(*args, **kw)


def sparse_attention(q_lat: Float[Array, "B T H C"], q_rope: Float[Array, "B T H R"],
                     kv: Float[Array, "L B S C"], k_rope: Float[Array, "L B S R"], layer,
                     indices: Int[Array, "B T K"], cfg: ModelConfig, opts: RunOptions) -> Float[Array, "B T H C"]:
    """Sparse MLA of layer `layer` of the stacked cache, read in place (`ops.sparse_mla`), per shard of
    `opts.mesh` when there is one."""
    args = (q_lat, q_rope, kv, k_rope, indices, cfg.softmax_scale)
    kw = dict(layer=layer, implementation=opts.implementation, interpret=opts.interpret)
    o, _ = sparse_mla_sharded(opts.mesh, *args, **kw) if opts.mesh is not None else ops.sparse_mla(*args, **kw)
    return o


def selection_mask(indices: Int[Array, "B T K"], tk: int) -> Array:
    """Boolean [B, T, tk]: True at the selected keys (-1 entries select nothing)."""
    B, T, _ = indices.shape
    safe = jnp.where(indices >= 0, indices, tk)  # out of range: dropped
    return jnp.zeros((B, T, tk), bool).at[jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None], safe].set(
        True, mode="drop")


def dense_attention(q_lat: Float[Array, "B T H C"], q_rope: Float[Array, "B T H R"], kv: Float[Array, "B S C"],
                    k_rope: Float[Array, "B S R"], indices: Int[Array, "B T K"], cfg: ModelConfig):
    """The same function as `sparse_attention`, computed densely with the selection as a mask.

    Also returns the head-averaged attention probabilities [B, T, S] (L1-normalised over the selected
    keys): the indexer's training target. Fine at training lengths: the scores are [B, H, T, S].
    """
    s = jnp.einsum("bthc,bsc->bhts", q_lat, kv, preferred_element_type=jnp.float32)
    s += jnp.einsum("bthr,bsr->bhts", q_rope, k_rope, preferred_element_type=jnp.float32)
    mask = selection_mask(indices, kv.shape[1])[:, None]
    p = jax.nn.softmax(jnp.where(mask, s * cfg.softmax_scale, -jnp.inf), axis=-1)
    p = jnp.where(mask, p, 0.0)
    o = jnp.einsum("bhts,bsc->bthc", p, kv.astype(jnp.float32)).astype(q_lat.dtype)
    return o, p.mean(axis=1)
