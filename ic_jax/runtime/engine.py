"""Inference: chunked prefill and decode steps over a batch of prompts of different lengths.

Prompts are right-padded; every sequence writes its tokens at its own positions in the cache, and each
query sees only cache entries at or before its position, so padding never leaks into real tokens.
Prefill runs in chunks of `chunk_size` tokens (one compiled program for all chunks); a chunk attends over
everything already in the cache, so chunked and one-shot prefill compute the same function. Decode
steps run with the cache donated, so it is updated in place.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ic_jax.model.cache import init_cache
from ic_jax.model.dsa import DSAModel
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.sampling import Sampling, sample
from ic_jax.runtime.sharding import cache_batch, cache_shardings, chunk_sharding, splitting_chunk


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"), donate_argnames=("cache",))
def prefill_chunk(graphdef, params, tokens, positions, cache, last, opts: RunOptions):
    """Runs one chunk; returns the logits at row `last[b]` of each sequence, and the cache."""
    model = nnx.merge(graphdef, params)
    if opts.mesh is not None:
        placed = chunk_sharding(opts.mesh, *tokens.shape)
        tokens, positions = (jax.lax.with_sharding_constraint(x, placed) for x in (tokens, positions))
    h, cache, _ = model(tokens, positions, cache, opts)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    return model.logits(h_last), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "opts", "sampling"), donate_argnames=("cache",))
def decode_step(graphdef, params, token, position, cache, key, opts: RunOptions, sampling: Sampling):
    """Feeds token[b] at position[b]; returns the sampled next token, its logits, and the cache."""
    model = nnx.merge(graphdef, params)
    h, cache, _ = model(token[:, None], position[:, None], cache, opts)
    logits = model.logits(h[:, 0])
    return sample(logits, key, sampling), logits, cache


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of `x` in this process, also where other processes hold some of its shards (multi-host)."""
    return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0

    decode_steps: int = 0  # timed steps: all but the first, which carries the decode compilation

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second per sequence over the timed decode steps."""
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s > 0 else 0.0


class Engine:
    def __init__(self, model: DSAModel, opts: RunOptions = RunOptions(), mesh=None):
        """With a mesh, the params should already be placed (`sharding.shard_model`); caches follow the batch and
        the ops run per shard (`RunOptions.mesh`)."""
        self.cfg = model.cfg
        self.model = model
        self.opts = opts if mesh is None else dataclasses.replace(opts, mesh=mesh)
        self.mesh = mesh
        self.graphdef, self.params = nnx.split(model)
        self.cache_builders: dict[tuple[int, int], Callable] = {}

    def new_cache(self, batch: int, max_len: int):
        """A zeroed cache, made by one compiled program per (batch, max_len), kept for the next request of that size;
        under a mesh born sharded (each device makes only its own shards), for a batch that splits over the mesh
        (`sharding.cache_batch`)."""
        if (batch, max_len) not in self.cache_builders:
            build = functools.partial(init_cache, self.cfg, self.model.stage_specs, batch, max_len)
            placed = None if self.mesh is None else cache_shardings(jax.eval_shape(build), self.mesh)
            self.cache_builders[batch, max_len] = jax.jit(build, out_shardings=placed)
        return self.cache_builders[batch, max_len]()

    def prefill(self, prompts: list[list[int]], max_len: int, chunk_size: int | None = None):
        """Returns (last-token logits [B, V], cache, lengths [B]). chunk_size None or 0 = one shot.

        Under a mesh B is the batch the cache splits for (`sharding.cache_batch`): rows past len(prompts) are
        one-token copies of the first prompt's first token, whose outputs the caller drops."""
        prompts = list(prompts) + [prompts[0][:1]] * (cache_batch(len(prompts), self.mesh) - len(prompts))
        lengths = np.array([len(p) for p in prompts], np.int32)
        if lengths.min() < 1:
            raise ValueError("every prompt needs at least one token")
        longest = int(lengths.max())
        chunk = min(chunk_size or longest, longest)
        chunk = splitting_chunk(chunk, self.mesh)
        n_chunks = -(-longest // chunk)
        tokens = np.zeros((len(prompts), n_chunks * chunk), np.int32)
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = p
        cache = self.new_cache(len(prompts), max_len)
        logits = None
        for c in range(n_chunks):
            start = c * chunk
            positions = np.broadcast_to(np.arange(start, start + chunk, dtype=np.int32), (len(prompts), chunk))
            last = np.clip(lengths - 1 - start, 0, chunk - 1)
            chunk_logits, cache = prefill_chunk(self.graphdef, self.params, jnp.asarray(tokens[:, start:start + chunk]),
                                                jnp.asarray(positions), cache, jnp.asarray(last), self.opts)
            here = jnp.asarray((lengths - 1 >= start) & (lengths - 1 < start + chunk))[:, None]
            logits = chunk_logits if logits is None else jnp.where(here, chunk_logits, logits)
        return logits, cache, lengths

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(), seed: int = 0,
                 chunk_size: int | None = None, eos_id: int | None = None,
                 on_token: Callable[[np.ndarray], None] | None = None,
                 warmup: bool = False) -> tuple[list[list[int]], Stats]:
        """Samples up to max_new_tokens per prompt (any number of prompts, see `prefill`); calls on_token with each
        step's tokens [B].

        warmup: compile prefill and decode first, so that TTFT excludes compilation.
        """
        stats = Stats(prompt_tokens=sum(map(len, prompts)))
        max_len = max(map(len, prompts)) + max_new_tokens
        key = jax.random.key(seed)
        if warmup:
            logits, cache, lengths = self.prefill(prompts, max_len, chunk_size)
            token = sample(logits, key, sampling)
            jax.block_until_ready(decode_step(self.graphdef, self.params, token, jnp.asarray(lengths), cache, key,
                                              self.opts, sampling))
        key, sub = jax.random.split(key)  # before the clock: its first call compiles, which warmup does not cover
        t0 = time.perf_counter()
        logits, cache, lengths = self.prefill(prompts, max_len, chunk_size)
        token = jax.block_until_ready(sample(logits, sub, sampling))
        stats.ttft_s = time.perf_counter() - t0
        out = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        t1 = None
        for step in range(max_new_tokens):
            tok = to_host(token)[: len(prompts)]  # without the padding rows of `prefill`
            for b in np.flatnonzero(~done):
                out[b].append(int(tok[b]))
            if on_token is not None:
                on_token(np.where(done, -1, tok))
            stats.new_tokens = step + 1
            if eos_id is not None:
                done |= tok == eos_id
            if done.all() or step == max_new_tokens - 1:
                break
            key, sub = jax.random.split(key)
            token, _, cache = decode_step(self.graphdef, self.params, token, jnp.asarray(lengths + step), cache, sub,
                                          self.opts, sampling)
            if t1 is None:
                jax.block_until_ready(token)
                t1 = time.perf_counter()
            else:
                stats.decode_steps += 1
        if t1 is not None:
            stats.decode_s = time.perf_counter() - t1
        return out, stats
