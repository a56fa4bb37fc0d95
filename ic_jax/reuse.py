"""Any IndexCache pattern as runtime data: one compiled program evaluates every pattern.

A pattern normally compiles into its own scans (`ic_jax.pattern.build_stages`), so N patterns cost N
compilations (seconds to minutes each for a deep model). Here the model is kept all-F and the pattern is a
boolean array `own[N]`: layer i selects with its own indexer where own[i], else it keeps the indices
carried from the last layer that did. That is the same function as the pattern's model (S layers' own
indexers run but are ignored); tests check the two agree. Search, evaluation and the overlap analysis use it.

Calibration batches are mapped inside the jitted program, and several patterns are stacked into one call
(`mean_losses`), so a greedy-search step is a few dispatches of one program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ic_jax.attention import RunOptions
from ic_jax.losses import token_losses
from ic_jax.model import DSAModel, repattern


def reuse_logits(model: DSAModel, tokens, own, opts: RunOptions):
    """Logits [B, T, V] of the all-F `model` under the pattern `own` (bool [N]; own[0] must be True)."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    kv_len = jnp.full((B,), T, jnp.int32)
    x = model.embed[...][tokens]
    indices = jnp.zeros((B, T, model.cfg.index_topk), jnp.int32)
    for group, stage, cache in zip(model.groups, model.stage_specs, model.init_cache(B, T)):
        graphdef, params = nnx.split(group)

        def body(carry, p, stage=stage, graphdef=graphdef):
            x, caches, indices, rep = carry
            caches = list(caches)
            for pos, block in enumerate(nnx.merge(graphdef, p).blocks):
                flag = own[stage.first_layer + rep * len(stage.kinds) + pos]
                x, caches[pos], indices, _ = block(x, positions, kv_len, caches[pos], rep, indices, opts, flag)
            return (x, caches, indices, rep + 1), None

        (x, _, indices, _), _ = jax.lax.scan(body, (x, cache, indices, jnp.int32(0)), params)
    return model.logits(model.final_norm(x))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(graphdef, opts, params, batches, own):
    """(token losses [n, T-1], argmax [n, T]) of every batch, under one pattern."""
    model = nnx.merge(graphdef, params)

    def one(tokens):
        logits = reuse_logits(model, tokens, own, opts)
        return token_losses(logits, tokens), jnp.argmax(logits, -1)

    losses, argmax = jax.lax.map(one, batches)
    return losses.reshape(-1, losses.shape[-1]), argmax.reshape(-1, argmax.shape[-1])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _many(graphdef, opts, params, batches, owns):
    return jax.lax.map(lambda own: _run(graphdef, opts, params, batches, own)[0].mean(), owns)


class ReuseEvaluator:
    """Per-token losses and argmaxes of one all-F model under runtime patterns, `batch` sequences at a time.
    Models of one config share the compiled programs."""

    def __init__(self, model: DSAModel, batch: int = 8, opts: RunOptions | None = None):
        model = model if all(k.full for s in model.stage_specs for k in s.kinds) else repattern(
            model, "F" * model.cfg.num_hidden_layers)
        self.graphdef, self.params = nnx.split(model)
        self.batch = batch
        self.opts = opts or RunOptions()

    def _batched(self, tokens):
        tokens = np.asarray(tokens, np.int32)
        pad = -len(tokens) % self.batch
        tokens = np.concatenate([tokens, np.repeat(tokens[:1], pad, 0)])
        return jnp.asarray(tokens.reshape(-1, self.batch, tokens.shape[-1])), len(tokens) - pad

    def run(self, own, tokens):
        batches, n = self._batched(tokens)
        losses, argmax = _run(self.graphdef, self.opts, self.params, batches, jnp.asarray(own, bool))
        return np.asarray(losses)[:n], np.asarray(argmax)[:n]

    def token_losses(self, own, tokens) -> np.ndarray:
        return self.run(own, tokens)[0]

    def mean_losses(self, owns, tokens, chunk: int = 4) -> np.ndarray:
        """Mean token loss of each pattern in `owns` [P, N]: `chunk` patterns per call (the last chunk is
        padded), so any number of candidates runs on one compiled program."""
        owns = np.asarray(owns, bool)
        batches, n = self._batched(tokens)
        if n != len(tokens):
            raise ValueError(f"the calibration set ({len(tokens)} sequences) must be a multiple of the batch")
        padded = np.concatenate([owns, np.repeat(owns[:1], -len(owns) % chunk, 0)])
        out = [_many(self.graphdef, self.opts, self.params, batches, jnp.asarray(padded[i:i + chunk]))
               for i in range(0, len(padded), chunk)]
        return np.concatenate([np.asarray(o) for o in out])[: len(owns)]
