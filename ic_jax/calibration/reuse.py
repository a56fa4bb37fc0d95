"""Any IndexCache pattern as runtime data: one compiled program evaluates every pattern.

A pattern normally compiles into its own scans (`ic_jax.model.pattern.build_stages`), so N patterns cost N
compilations (seconds to minutes each for a deep model). Here the model is kept all-F and the pattern is a
boolean array `own[N]` given to the model's forward (see `ic_jax.model.dsa`): layer i selects with its own indexer
where own[i], else it keeps the indices carried from the last layer that did. Search, evaluation and training's
held-out report use it.

Calibration batches are mapped inside the jitted program, and several patterns are stacked into one call
(`mean_losses`), so a greedy-search step is a few dispatches of one program. With a mesh (`RunOptions.mesh`, the
params already placed on it) every batch splits over "data" and the ops run per shard.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ic_jax.calibration.losses import token_losses
from ic_jax.model.dsa import DSAModel, repattern
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.sharding import put_batch


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(graphdef, opts, params, batches, own):
    """(token losses [n, T-1], argmax [n, T]) of every batch, under one pattern."""
    model = nnx.merge(graphdef, params)

    def one(tokens):
        logits = model.forward(tokens, opts, own).logits
        return token_losses(logits, tokens), jnp.argmax(logits, -1)

    losses, argmax = jax.lax.map(one, batches)
    out = losses.reshape(-1, losses.shape[-1]), argmax.reshape(-1, argmax.shape[-1])
    if opts.mesh is not None:  # whole on every device, so that every process can read it
        out = jax.lax.with_sharding_constraint(out, NamedSharding(opts.mesh, PartitionSpec()))
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _many(graphdef, opts, params, batches, owns):
    return jax.lax.map(lambda own: _run(graphdef, opts, params, batches, own)[0].mean(), owns)


def checked_flags(own) -> np.ndarray:
    """Runtime flags as a bool array [..., N]; layer 0 has no earlier top-k to keep, so it runs its own."""
    own = np.asarray(own, bool)
    if not own[..., 0].all():
        raise ValueError("a runtime pattern has layer 0 keeping indices: layer 0 must run its own indexer")
    return own


class ReuseEvaluator:
    """Per-token losses and argmaxes of one all-F model under runtime patterns, `batch` sequences at a time.
    Models of one config share the compiled programs. Under `opts.mesh` the batch must split over "data"."""

    def __init__(self, model: DSAModel, batch: int = 8, opts: RunOptions | None = None):
        if "S" in model.pattern:
            model = repattern(model, "F" * model.cfg.num_hidden_layers)
        self.graphdef, self.params = nnx.split(model)
        self.batch = batch
        self.opts = opts or RunOptions()
        if self.opts.mesh is not None and batch % self.opts.mesh.shape["data"]:
            raise ValueError(f"a batch of {batch} does not split over the {self.opts.mesh.shape['data']} devices "
                             f"of the data axis")

    def _batched(self, tokens):
        tokens = np.asarray(tokens, np.int32)
        pad = -len(tokens) % self.batch
        tokens = np.concatenate([tokens, np.repeat(tokens[:1], pad, 0)])
        return put_batch(tokens.reshape(-1, self.batch, tokens.shape[-1]), self.opts.mesh, axis=1), len(tokens) - pad

    def run(self, own, tokens):
        batches, n = self._batched(tokens)
        losses, argmax = _run(self.graphdef, self.opts, self.params, batches, jnp.asarray(checked_flags(own)))
        return np.asarray(losses)[:n], np.asarray(argmax)[:n]

    def token_losses(self, own, tokens) -> np.ndarray:
        return self.run(own, tokens)[0]

    def mean_losses(self, owns, tokens, chunk: int = 4) -> np.ndarray:
        """Mean token loss of each pattern in `owns` [P, N]: `chunk` patterns per call (the last chunk is
        padded), so any number of candidates runs on one compiled program."""
        owns = checked_flags(owns)
        batches, n = self._batched(tokens)
        if n != len(tokens):
            raise ValueError(f"the calibration set ({len(tokens)} sequences) must be a multiple of the batch")
        padded = np.concatenate([owns, np.repeat(owns[:1], -len(owns) % chunk, 0)])
        out = [_many(self.graphdef, self.opts, self.params, batches, jnp.asarray(padded[i:i + chunk]))
               for i in range(0, len(padded), chunk)]
        return np.concatenate([np.asarray(o) for o in out])[: len(owns)]
