"""Checking that a compiled program fits the device's free memory before it runs: work too large ends with one
line naming the memory needed and free, instead of an allocator crash or the operating system's OOM killer."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ic_jax.errors import UserError
from ic_jax.model.config import ModelConfig
from ic_jax.model.dsa import DSAModel
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.engine import decode_step, prefill_chunk
from ic_jax.runtime.sampling import Sampling
from ic_jax.runtime.sharding import cache_batch, cache_shardings, is_variable, param_shardings

GIB = 2**30


def free_bytes(device: jax.Device) -> int | None:
    """Bytes the device can still allocate: the allocator's limit on GPU/TPU, MemAvailable on a Linux CPU."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    meminfo = Path("/proc/meminfo")
    if device.platform == "cpu" and meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def needed_bytes(compiled) -> int:
    """Peak bytes of one call of a compiled program: its arguments, outputs and temporaries (donated outputs
    reuse their arguments' buffers)."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def compile_within_memory(fn, args: tuple, what: str, fix: str):
    """`fn` (a jax.jit function) compiled for `args`, after checking its peak memory against what is free.
    Arguments already on the device count as free there, since they are part of what the call needs."""
    compiled = fn.lower(*args).compile()
    device = jax.local_devices()[0]  # in a multi-host job the first global device may be another host's
    free = free_bytes(device)
    if free is not None:
        resident = sum(x.nbytes for x in jax.tree.leaves(args) if isinstance(x, jax.Array))
        need = needed_bytes(compiled)
        if need > free + resident:
            raise UserError(f"{what} needs {need / GIB:.1f} GiB of memory but {(free + resident) / GIB:.1f} GiB "
                            f"is free on {device.platform}; {fix}")
    return compiled


# ----------------------------------------------------------------------------------------------------------
# memory plans: what one device holds for a model, a mesh, a batch and a context, with nothing allocated

GB = 10**9
DEVICE_MEMORY = {"h200": 141 * GB, "h100": 80 * GB, "v5p": 95 * GB, "v6e": 32 * GB}  # per chip, as sold


def shard_bytes(tree) -> int:
    """Bytes one device holds of the arrays or ShapeDtypeStructs in `tree`: each leaf's shard under its sharding,
    the whole leaf where it has none."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def abstract_model(cfg: ModelConfig, pattern: str) -> DSAModel:
    """The model with ShapeDtypeStructs for parameters: its shapes, nothing allocated."""
    return nnx.eval_shape(lambda: DSAModel(cfg, pattern, nnx.Rngs(0)))


def abstract_params(model: DSAModel, mesh: Mesh | None):
    """The model's state as ShapeDtypeStructs placed by `param_shardings` (unplaced without a mesh)."""
    state = nnx.state(model)
    if mesh is None:
        return state
    return jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                                                    sharding=s)),
                        state, param_shardings(model, mesh), is_leaf=is_variable)


def abstract_cache(model: DSAModel, batch: int, max_len: int, mesh: Mesh | None):
    """The cache of `Engine.prefill` as ShapeDtypeStructs: for the batch padded to split over the mesh
    (`cache_batch`), each buffer placed by `cache_shardings`."""
    cache = jax.eval_shape(lambda: model.init_cache(cache_batch(batch, mesh), max_len))
    if mesh is None:
        return cache
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache,
                        cache_shardings(cache, mesh))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of one model on one mesh at one batch and context. Params and caches are exact (shapes
    and shardings); temporaries are what XLA's compiler reserves for the prefill chunk and the decode step."""

    batch: int
    context: int
    chunk: int
    params: int
    cache: int
    prefill_temp: int
    decode_temp: int

    @property
    def temp(self) -> int:
        return max(self.prefill_temp, self.decode_temp)

    @property
    def total(self) -> int:
        return self.params + self.cache + self.temp


def compiled_temps(model: DSAModel, mesh: Mesh | None, batch: int, context: int, chunk: int,
                   opts: RunOptions) -> tuple[int, int]:
    """Temporary bytes per device of the prefill chunk and the decode step, compiled ahead of time for abstract
    params and caches (on the devices of `mesh`, or the default device), the batch padded as `Engine.prefill`
    pads it and the ops run per shard of `mesh` as the `Engine` runs them."""
    batch = cache_batch(batch, mesh)
    opts = dataclasses.replace(opts, mesh=mesh)
    graphdef, params = nnx.graphdef(model), abstract_params(model, mesh)
    cache = abstract_cache(model, batch, context, mesh)
    whole = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None

    def ints(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=whole)

    prefill = prefill_chunk.lower(graphdef, params, ints(batch, chunk), ints(batch, chunk), cache, ints(batch),
                                  opts).compile()
    key = jax.eval_shape(lambda: jax.random.key(0))
    decode = decode_step.lower(graphdef, params, ints(batch), ints(batch), cache, key, opts, Sampling()).compile()
    return (prefill.memory_analysis().temp_size_in_bytes, decode.memory_analysis().temp_size_in_bytes)


def make_plan(model: DSAModel, mesh: Mesh | None, batch: int, context: int, chunk: int, opts: RunOptions) -> Plan:
    chunk = min(chunk, context)
    prefill_temp, decode_temp = compiled_temps(model, mesh, batch, context, chunk, opts)
    return Plan(batch, context, chunk, shard_bytes(abstract_params(model, mesh)),
                shard_bytes(abstract_cache(model, batch, context, mesh)), prefill_temp, decode_temp)


def scaled(plan: Plan, model: DSAModel, mesh: Mesh | None, batch: int, context: int) -> Plan:
    """The plan at another batch and context without compiling again: caches exact, temporaries scaled in
    proportion to batch x context (their size grows with both; above the compiled point this overestimates
    the part that does not)."""
    factor = (batch * context) / (plan.batch * plan.context)
    return dataclasses.replace(plan, batch=batch, context=context,
                               cache=shard_bytes(abstract_cache(model, batch, context, mesh)),
                               prefill_temp=math.ceil(plan.prefill_temp * factor),
                               decode_temp=math.ceil(plan.decode_temp * factor))


def max_batch(plan: Plan, model: DSAModel, mesh: Mesh | None, capacity: int, limit: int = 2**16) -> int:
    """The largest batch at the plan's context whose plan fits `capacity` bytes (0 if none). Only multiples of the
    "data" axis are candidates: any other batch is padded up to the next multiple (`cache_batch`)."""
    step = mesh.shape["data"] if mesh is not None else 1
    return step * largest(lambda n: scaled(plan, model, mesh, n * step, plan.context).total <= capacity, 1,
                          limit // step)


def max_context(plan: Plan, model: DSAModel, mesh: Mesh | None, capacity: int) -> int:
    """The longest context at the plan's batch whose plan fits `capacity` bytes, up to the model's
    max_position_embeddings (0 if none)."""
    return largest(lambda t: scaled(plan, model, mesh, plan.batch, t).total <= capacity, 1,
                   model.cfg.max_position_embeddings)


def largest(fits, low: int, high: int) -> int:
    """The largest n in [low, high] with fits(n), given that fits is monotone (true then false); low - 1 if none."""
    if not fits(low):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def check_fits(model: DSAModel, mesh: Mesh | None, batch: int, context: int, chunk: int, opts: RunOptions,
               fix: str) -> None:
    """Before the caches are made (the params already placed): the caches and, on an accelerator, the temporaries
    of the prefill chunk and the decode step (compiled ahead of time) against what the first device has free.
    Work that cannot fit ends here with one line, instead of an allocator failure mid-run."""
    device = jax.local_devices()[0]
    free = free_bytes(device)
    if free is None:
        return
    caches = shard_bytes(abstract_cache(model, batch, context, mesh))
    temps = max(compiled_temps(model, mesh, batch, context, min(chunk, context), opts)) if device.platform != "cpu" \
        else 0
    if caches + temps > free:
        raise UserError(f"batch {batch} x {context} tokens needs {(caches + temps) / GIB:.1f} GiB per device "
                        f"({caches / GIB:.1f} GiB caches + {temps / GIB:.1f} GiB temporaries) but "
                        f"{free / GIB:.1f} GiB is free on {device.platform}; {fix}")
