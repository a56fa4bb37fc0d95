"""The DSA transformer with an IndexCache pattern compiled into static scans over layer groups.

A pattern such as FSSS on 8 MoE layers becomes one stage: a `jax.lax.scan` of length 2 over a group of
four stacked blocks [F S S S]. Inside a group the F block runs the indexer and hands its top-k indices
to the S blocks, which hold no indexer weights and no indexer key cache, so their trace has no indexer
ops. The caches (latent c_kv, RoPE key, indexer key) are stacked the same way and updated in place.

A pattern can also be runtime data: an all-F model given a flag array `own[N]` runs layer i's top-k where
own[i] and otherwise keeps the indices carried from the last layer that ran its own. That is the same function
as the pattern's model (the ignored indexers still run), and one compiled program serves every pattern
(search, evaluation: `ic_jax.calibration.reuse`).
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from ic_jax import ops
from ic_jax.model.attention import MLA, Indexer, dense_attention, select_topk, sparse_attention
from ic_jax.model.cache import Cache, LayerCache, init_cache, max_positions
from ic_jax.model.config import ModelConfig
from ic_jax.model.layers import DenseFFN, MoE, RMSNorm, dtype_of, param
from ic_jax.model.pattern import LayerKind, Stage, build_stages
from ic_jax.model.run_options import RunOptions
from ic_jax.ops.indexer_logits.reference import quantize_fp8


class Output(NamedTuple):
    """What the forward pass returns in every mode (see `RunOptions`)."""

    logits: Float[Array, "B T V"]
    aux: list[dict]  # one dict per layer, in layer order (see `Block.__call__`); empty dicts in "infer" mode


def moe_layers(cfg: ModelConfig) -> list[bool]:
    return [cfg.is_moe(i) for i in range(cfg.num_hidden_layers)]


class Block(nnx.Module):
    """One DSA layer. Only F blocks (kind.full) own an indexer."""

    def __init__(self, cfg: ModelConfig, kind: LayerKind, rngs: nnx.Rngs, stack=()):
        out_std = (2 * cfg.num_hidden_layers * cfg.hidden_size) ** -0.5
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs, stack)
        self.attn = MLA(cfg, rngs, stack, out_std)
        self.indexer = Indexer(cfg, rngs, stack) if kind.full else None
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs, stack)
        self.ffn = (MoE(cfg, rngs, stack, out_std) if kind.moe
                    else DenseFFN(cfg.hidden_size, cfg.intermediate_size, dtype_of(cfg), rngs, stack, out_std))

    def __call__(self, x: Float[Array, "B T D"], positions: Int[Array, "B T"], kv_len: Int[Array, "B"],
                 cache: LayerCache, layer, indices: Int[Array, "B T K"], opts: RunOptions, own: Array | None = None,
                 experts: tuple | None = None):
        """Returns (x, cache, indices, aux). An F block selects its own top-k, unless the traced runtime flag
        `own` is given and False: then it keeps the carried `indices` (see the module docstring).
        In "train" mode aux holds "attn" (head-averaged probabilities [B, T, S]), "indices", and for F blocks
        the indexer "logits" [B, T, S], computed from detached inputs; in "infer" mode it is empty.
        `experts`: the layer group's stacked routed-expert weights, for a MoE block (see `MoE.__call__`)."""
        cfg = self.cfg
        h = self.attn_norm(x)
        cq, q_lat, q_rope = self.attn.queries(h, positions)
        c_kv, k_rope = self.attn.latents(h, positions)
        cache = cache.written(layer, positions, kv=c_kv, k_rope=k_rope)
        train, aux = opts.mode == "train", {}
        if self.indexer is not None:
            with jax.named_scope("indexer"):
                h_i, cq_i = jax.lax.stop_gradient((h, cq))  # the indexer learns only from its own loss
                new_keys = self.indexer.keys(h_i, positions)
                cache = cache.written(layer, positions, index_k=new_keys)
                q_idx, w_idx = self.indexer.queries(h_i, cq_i, positions)
                if cfg.indexer_fp8:  # keys are quantized once, as they enter the cache
                    k8, k_scale = quantize_fp8(jax.lax.stop_gradient(new_keys), cfg.scale_fmt == "ue8m0")
                    cache = cache.written(layer, positions, index_k8=k8, index_k_scale=k_scale[..., None])
                    selected = select_topk(q_idx, cache.index_k8, w_idx, positions, kv_len, cfg.index_topk, opts,
                                           layer, k_scale=cache.index_k_scale[..., 0], scale_fmt=cfg.scale_fmt)
                else:
                    selected = select_topk(q_idx, cache.index_k, w_idx, positions, kv_len, cfg.index_topk, opts,
                                           layer)
                indices = selected if own is None else jnp.where(own, selected, indices)
                if train:  # the KL loss differentiates these: bf16 even with cfg.indexer_fp8
                    aux["logits"] = ops.indexer_logits(q_idx, cache.index_k[layer], w_idx, positions, kv_len,
                                                       implementation="xla")
        if train:
            o_lat, aux["attn"] = dense_attention(q_lat, q_rope, cache.kv[layer], cache.k_rope[layer], indices, cfg)
            aux["indices"] = indices
        else:
            o_lat = sparse_attention(q_lat, q_rope, cache.kv, cache.k_rope, layer, indices, cfg, opts)
        x = x + self.attn.output(o_lat)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            stacked = None if experts is None else (*experts, layer)
            x = x + self.ffn(h, opts.implementation, opts.interpret, stacked, opts.mesh)
        else:
            x = x + self.ffn(h)
        return x, cache, indices, aux


class LayerGroup(nnx.Module):
    """The blocks of one stage, each stacked `stage.repeats` times."""

    def __init__(self, cfg: ModelConfig, stage: Stage, rngs: nnx.Rngs):
        self.stage = stage
        self.blocks = nnx.List([Block(cfg, kind, rngs, stack=(stage.repeats,)) for kind in stage.kinds])

    def run(self, x, positions, kv_len, caches: list[LayerCache], indices, opts: RunOptions, own: Array | None = None):
        """Scans the group; `indices` (the last F layer's top-k before this stage) flow through it.
        `own`: the runtime flags of all layers (see the module docstring), or None."""
        graphdef, params = nnx.split(self)
        tags = [k.tag for k in self.stage.kinds]
        # closed over whole, so that the expert kernels read each layer's experts in place (see `MoE.__call__`)
        experts = [(b.ffn.w_gate[...], b.ffn.w_up[...], b.ffn.w_down[...]) if isinstance(b.ffn, MoE) else None
                   for b in self.blocks]

        def body(carry, p):
            x, caches, indices, rep = carry
            group = nnx.merge(graphdef, p)
            caches, aux = list(caches), []
            for pos, block in enumerate(group.blocks):
                flag = None if own is None else own[self.stage.layer_id(rep, pos)]
                with jax.named_scope(f"layer_{tags[pos]}"):
                    x, caches[pos], indices, a = block(x, positions, kv_len, caches[pos], rep, indices, opts, flag,
                                                       experts=experts[pos])
                aux.append(a)
            return (x, caches, indices, rep + 1), aux

        if opts.remat:
            body = jax.checkpoint(body)
        (x, caches, indices, _), aux = jax.lax.scan(body, (x, caches, indices, jnp.int32(0)), params)
        return x, caches, indices, aux


class DSAModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, pattern: str, rngs: nnx.Rngs):
        self.cfg, self.pattern = cfg, pattern
        self.stage_specs = build_stages(pattern, moe_layers(cfg))
        dt = dtype_of(cfg)
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt, std=1.0)
        self.groups = nnx.List([LayerGroup(cfg, s, rngs) for s in self.stage_specs])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs)
        self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dt)

    def __call__(self, tokens: Int[Array, "B T"], positions: Int[Array, "B T"], cache: Cache,
                 opts: RunOptions, own: Array | None = None):
        """Runs all layers on a chunk of tokens at `positions`, writing the chunk into the cache.

        Each query sees cache entries s <= its position: prefill chunks, one-shot prefill and decode
        steps are all this call. Returns the final-normed hidden states, the cache, and one aux dict per
        layer, in layer order (see `Block.__call__`). `own` (bool [N], own[0] True) runs the all-F model
        under that pattern (see the module docstring).
        """
        if own is not None:
            own = self._checked_flags(own)
        x = self.embed[...][tokens]
        t_max = max_positions(cache)
        kv_len = jnp.minimum(jnp.max(positions, axis=1) + 1, t_max).astype(jnp.int32)
        new_cache, aux = [], [None] * self.cfg.num_hidden_layers
        indices = jnp.full((*tokens.shape, self.cfg.index_topk), -1, jnp.int32)  # layer 0 is F: never read
        for group, stage, c in zip(self.groups, self.stage_specs, cache):
            x, c, indices, ys = group.run(x, positions, kv_len, c, indices, opts, own)
            new_cache.append(c)
            for pos, rep in itertools.product(range(len(stage.kinds)), range(stage.repeats)):
                aux[stage.layer_id(rep, pos)] = jax.tree.map(lambda a: a[rep], ys[pos])
        return self.final_norm(x), new_cache, aux

    def _checked_flags(self, own) -> Array:
        n = self.cfg.num_hidden_layers
        if "S" in self.pattern:
            raise ValueError(f"runtime flags need the all-F model (repattern it to {'F' * n!r}), not {self.pattern!r}")
        own = jnp.asarray(own, bool)
        if own.shape != (n,):
            raise ValueError(f"runtime flags have shape {own.shape}, the model needs ({n},)")
        return own

    def logits(self, h: Float[Array, "... D"]) -> Float[Array, "... V"]:
        return jnp.einsum("...d,dv->...v", h, self.lm_head[...], preferred_element_type=jnp.float32)

    def init_cache(self, batch: int, max_len: int) -> Cache:
        return init_cache(self.cfg, self.stage_specs, batch, max_len)

    def forward(self, tokens: Int[Array, "B T"], opts: RunOptions = RunOptions(), own: Array | None = None
                ) -> Output:
        """Full-sequence logits and per-layer aux with a fresh cache: the plain forward pass (training,
        evaluation, tests). `own`: runtime flags, as in `__call__`."""
        B, T = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        h, _, aux = self(tokens, positions, self.init_cache(B, T), opts, own)
        return Output(self.logits(h), aux)


# Re-patterning: a checkpoint stores the all-F layout; any pattern is built from its per-layer params.

def layer_params(model: DSAModel) -> list[dict[str, Any]]:
    """Every layer's parameters as a plain nested dict, in layer order (S layers have no "indexer")."""
    out: list[dict[str, Any] | None] = [None] * model.cfg.num_hidden_layers
    for group, stage in zip(model.groups, model.stage_specs):
        for pos, block in enumerate(group.blocks):
            state = nnx.to_pure_dict(nnx.state(block, nnx.Param))
            for rep in range(stage.repeats):
                out[stage.layer_id(rep, pos)] = jax.tree.map(lambda a: a[rep], state)
    return out


def build_model(cfg: ModelConfig, pattern: str, layers: list[dict[str, Any]], top: dict[str, Any]) -> DSAModel:
    """A model for `pattern` from per-layer params (as `layer_params` returns) and the top-level params.

    S layers drop their indexer; F layers need one.
    """
    model = nnx.eval_shape(lambda: DSAModel(cfg, pattern, nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    abstract = nnx.to_pure_dict(state)
    pure = nnx.to_pure_dict(state)
    for name in ("embed", "lm_head", "final_norm"):
        pure[name] = top[name]
    for g, stage in enumerate(model.stage_specs):
        for pos, kind in enumerate(stage.kinds):
            per_rep = []
            for rep in range(stage.repeats):
                lp = dict(layers[stage.layer_id(rep, pos)])
                if kind.full and "indexer" not in lp:
                    raise ValueError(f"layer {stage.layer_id(rep, pos)} is F in the pattern but has no indexer weights")
                if not kind.full:
                    lp.pop("indexer", None)
                per_rep.append(lp)
            pure["groups"][g]["blocks"][pos] = jax.tree.map(lambda *a: jnp.stack(a), *per_rep)
    want = jax.tree_util.tree_flatten_with_path(abstract)[0]
    got = jax.tree_util.tree_flatten_with_path(pure)[0]
    if [p for p, _ in want] != [p for p, _ in got]:
        raise ValueError("parameter names differ from what the config builds")
    for (p, w), (_, g) in zip(want, got):
        if tuple(w.shape) != tuple(g.shape):
            raise ValueError(f"{jax.tree_util.keystr(p)} has shape {tuple(g.shape)}, the config needs {tuple(w.shape)}")
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda w, g: jnp.asarray(g, w.dtype), abstract, pure))
    nnx.update(model, state)
    return model


def top_params(model: DSAModel) -> dict[str, Any]:
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {name: pure[name] for name in ("embed", "lm_head", "final_norm")}


def repattern(model: DSAModel, pattern: str) -> DSAModel:
    """The same weights under another pattern (indexers of new S layers are dropped)."""
    return build_model(model.cfg, pattern, layer_params(model), top_params(model))
