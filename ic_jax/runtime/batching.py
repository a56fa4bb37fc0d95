"""Continuous batching: a fixed number of cache slots (rows of the batch axis, axis 1 of every cache buffer), each
holding one request; when a request finishes, the next one is prefilled into its slot while the others keep
decoding, so the device stays full.

A slot is refilled by prefilling the new prompt into a fresh one-row cache and writing that row over the slot's
(`SlotCache.prefill`; `write_slot` runs under jit with the big cache donated, so XLA updates it in place and never
copies it, and on a mesh each device writes only its own rows). Nothing of the slot's previous request survives,
so a refilled slot gives its prompt the same tokens as a fresh cache. Rows decode together through
`engine.decode_step` (per-row positions) and sample with their own settings (`sampling.sample_rows`), keyed by the
request's seed and token number, not by the slot.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ic_jax.model.cache import BATCH_AXIS
from ic_jax.model.dsa import DSAModel
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.engine import Engine, decode_step, prefill_chunk, to_host
from ic_jax.runtime.memory import (
    abstract_cache,
    free_bytes,
    largest,
    make_plan,
    shard_bytes,
)
from ic_jax.runtime.sampling import RowSampling, Sampling, row_keys, sample_rows
from ic_jax.runtime.sharding import splitting_chunk

MIN_CHUNK = 16  # shortest prefill chunk: prompts are padded to a power of two up to --chunk-size, so few compile
HEADROOM = 0.95  # of the free memory that slots may plan to use: the allocator needs some slack
CPU_SLOTS = 4  # slots on a CPU when none are asked for: its "free memory" is the host's, not a sensible limit


def chunk_for(length: int, chunk_size: int) -> int:
    """The prefill chunk of a prompt: the next power of two (at least MIN_CHUNK), at most chunk_size."""
    return min(chunk_size, max(MIN_CHUNK, 1 << (length - 1).bit_length()))


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnames=("cache",))
def write_slot(cache, row, slot, mesh=None):
    """The cache with row `slot` (of axis BATCH_AXIS of every buffer) replaced by the one-row cache `row`, updated in
    place. `mesh`: the mesh whose "data" axis splits the cache's rows; each device then writes only into its own
    rows (a dynamic update of a split axis would first gather the whole cache onto every device)."""
    if mesh is None:
        return jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r.astype(c.dtype), slot, BATCH_AXIS),
                            cache, row)

    def local(cache, row, slot):
        rows = jax.tree.leaves(cache)[0].shape[BATCH_AXIS]
        i = slot - jax.lax.axis_index("data") * rows
        mine = (i >= 0) & (i < rows)
        i = jnp.clip(i, 0, rows - 1)

        def put(c, r):  # another device's row: its own row i written back unchanged
            keep = jax.lax.dynamic_slice_in_dim(c, i, 1, BATCH_AXIS)
            return jax.lax.dynamic_update_slice_in_dim(c, jnp.where(mine, r.astype(c.dtype), keep), i, BATCH_AXIS)

        return jax.tree.map(put, cache, row)

    split = PartitionSpec(*[None] * BATCH_AXIS, "data")
    return jax.shard_map(local, mesh=mesh, in_specs=(split, PartitionSpec(), PartitionSpec()), out_specs=split,
                         check_vma=False)(cache, row, slot)


class SlotCache:
    """A cache of `slots` rows of `context` positions, decoded together and refilled one row at a time."""

    def __init__(self, engine: Engine, slots: int, context: int, chunk_size: int):
        self.engine, self.slots, self.context, self.chunk_size = engine, slots, context, chunk_size
        self.cache = engine.new_cache(slots, context)
        mesh = engine.mesh
        whole = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None  # a row on every device
        self._fresh_row = jax.jit(functools.partial(engine.model.init_cache, 1, context), out_shardings=whole)
        self._split = mesh if mesh is not None and mesh.shape["data"] > 1 else None

    def prefill(self, slot: int, prompt: list[int]) -> jax.Array:
        """Prefills `prompt` into a fresh one-row cache, chunk by chunk (`prefill_chunk`), then writes the row over
        row `slot`; returns the logits [1, V] of the prompt's last token."""
        engine = self.engine
        chunk = splitting_chunk(chunk_for(len(prompt), self.chunk_size), engine.mesh)
        n_chunks = -(-len(prompt) // chunk)
        tokens = np.zeros((1, n_chunks * chunk), np.int32)
        tokens[0, : len(prompt)] = prompt
        row = self._fresh_row()
        for start in range(0, n_chunks * chunk, chunk):
            positions = np.arange(start, start + chunk, dtype=np.int32)[None]
            last = np.asarray([min(max(len(prompt) - 1 - start, 0), chunk - 1)], np.int32)
            logits, row = prefill_chunk(engine.graphdef, engine.params, tokens[:, start:start + chunk], positions,
                                        row, last, engine.opts)
        self.cache = write_slot(self.cache, row, np.int32(slot), mesh=self._split)
        return logits  # the last token lies in the last chunk

    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """One decode step of every row (`engine.decode_step`): feeds tokens[b] at positions[b]; returns the greedy
        next tokens [slots] and the logits [slots, V]."""
        e = self.engine
        greedy, logits, self.cache = decode_step(e.graphdef, e.params, tokens, positions, self.cache,
                                                 jax.random.key(0), e.opts, Sampling())
        return greedy, logits


@jax.jit
def _pick(logits, seeds, counters, settings: RowSampling):
    return sample_rows(logits, row_keys(seeds, counters), settings)


# ----------------------------------------------------------------------------------------------------------
# how many slots fit


def max_slots(model: DSAModel, mesh, context: int, chunk: int, opts: RunOptions, limit: int) -> int:
    """The most slots of `context` positions (a multiple of the mesh's "data" size, at most `limit`) whose caches
    and the compiled temporaries of a slot prefill and a decode step fit HEADROOM of the free memory of a device,
    with the params already placed (0 if not one fits). On a CPU: min(CPU_SLOTS, limit)."""
    device = jax.local_devices()[0]
    free = free_bytes(device)
    step = mesh.shape["data"] if mesh is not None else 1
    if device.platform == "cpu" or free is None:
        return max(step, min(CPU_SLOTS, limit) // step * step)
    plan = make_plan(model, mesh, step, context, chunk, opts)  # one row per data shard; temporaries compiled

    def fits(n: int) -> bool:
        caches = shard_bytes(abstract_cache(model, n * step, context, mesh))
        slot_prefill = plan.prefill_temp + plan.cache  # its temporaries and the fresh row it fills
        return caches + max(slot_prefill, plan.decode_temp * n) <= HEADROOM * free

    return step * largest(fits, 1, max(1, limit // step))


# ----------------------------------------------------------------------------------------------------------
# the scheduler


@dataclasses.dataclass(frozen=True)
class Request:
    id: object  # the caller's id, returned with the result
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    seed: int = 0


@dataclasses.dataclass
class Finished:
    request: Request
    tokens: list[int]  # generated, the EOS token included when it ended the request
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens, or the slot's context is full)
    ttft_s: float  # from the start of its prefill to its first token
    total_s: float  # from the start of its prefill to its last token


@dataclasses.dataclass
class _Running:
    request: Request
    started: float
    ttft_s: float
    tokens: list[int]

    @property
    def position(self) -> int:
        """Where the last token goes into the cache when it is fed back."""
        return len(self.request.prompt) + len(self.tokens) - 1


class Batcher:
    """Runs requests through `slots` rows of one cache of `context` positions. A request's prompt plus its
    completion never exceeds `context` tokens (it then ends with finish_reason "length")."""

    def __init__(self, engine: Engine, slots: int, context: int, chunk_size: int, eos_id: int | None):
        self.slots, self.context, self.eos_id = slots, context, eos_id
        self.slot_cache = SlotCache(engine, slots, context, chunk_size)

    def run(self, requests: Iterable[Request]) -> Iterator[Finished]:
        """Yields each request's result as it finishes (not in input order). Every prompt must hold fewer than
        `context` tokens."""
        pending = iter(requests)
        running: list[_Running | None] = [None] * self.slots
        while True:
            for slot in range(self.slots):
                while running[slot] is None and (request := next(pending, None)) is not None:
                    running[slot] = self._admit(slot, request)
                    if (done := self._finished(running[slot])) is not None:
                        running[slot] = None
                        yield done
            if all(r is None for r in running):
                return
            for slot, token in enumerate(self._step(running)):
                if running[slot] is not None:
                    running[slot].tokens.append(int(token))
                    if (done := self._finished(running[slot])) is not None:
                        running[slot] = None
                        yield done

    def _admit(self, slot: int, request: Request) -> _Running:
        if not 0 < len(request.prompt) < self.context:
            raise ValueError(f"request {request.id!r}: a prompt of {len(request.prompt)} tokens does not leave room "
                             f"for a token in {self.context} positions")
        started = time.perf_counter()
        logits = self.slot_cache.prefill(slot, request.prompt)
        first = to_host(_pick(logits, np.asarray([request.seed], np.int32), np.zeros(1, np.int32),
                              RowSampling.of([request.sampling])))
        return _Running(request, started, time.perf_counter() - started, [int(first[0])])

    def _step(self, running: list[_Running | None]) -> np.ndarray:
        """One decode step of every slot (a free slot feeds token 0 at position 0 of its own row: the next request
        prefilled there rewrites it); returns the next token of each slot."""
        tokens = np.asarray([r.tokens[-1] if r else 0 for r in running], np.int32)
        positions = np.asarray([r.position if r else 0 for r in running], np.int32)
        greedy, logits = self.slot_cache.decode(tokens, positions)
        if all(r is None or r.request.sampling.temperature <= 0 for r in running):
            return to_host(greedy)
        seeds = np.asarray([r.request.seed if r else 0 for r in running], np.int32)
        counters = np.asarray([len(r.tokens) if r else 0 for r in running], np.int32)
        settings = RowSampling.of([r.request.sampling if r else Sampling() for r in running])
        return to_host(_pick(logits, seeds, counters, settings))

    def _finished(self, r: _Running) -> Finished | None:
        if self.eos_id is not None and r.tokens[-1] == self.eos_id:
            reason = "stop"
        elif len(r.tokens) >= r.request.max_new_tokens or len(r.request.prompt) + len(r.tokens) >= self.context:
            reason = "length"
        else:
            return None
        return Finished(r.request, r.tokens, reason, r.ttft_s, time.perf_counter() - r.started)
