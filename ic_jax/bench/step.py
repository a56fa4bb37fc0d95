"""python -m ic_jax.bench step: the time of one decode step, or of one prefill chunk, per IndexCache pattern at a
long context, without prefilling that context.

Random weights of a preset (default: the 30B GLM-4.7-Flash + DSA shape) are made on the device and the cache
(`--batch` sequences of `--context` tokens) is filled with random values instead of being prefilled, so a 200K
point takes seconds where `bench e2e` first prefills the whole context. With `--chunk 1` (the default) each step is the
model's `decode_step` (cache donated) at positions from `--context` on, timed over `--steps` steps issued back to
back, as `generate` runs them. With `--chunk N` each step is `prefill_chunk` of N tokens at positions `--context`
to `--context` + N - 1: the last chunk of a prompt that long, the costliest of a chunked prefill. Speedups are
against the first pattern, in the same run. With --profile, three more steps are traced (jax.profiler) and the
table shows where the device time goes: kernel time and count per step, and the kernels (XLA fusions by name,
Pallas kernels by function) with the most time.
"""

from __future__ import annotations

import collections
import functools
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData
from tqdm import tqdm

from ic_jax.bench.e2e import (
    add_model_arguments,
    mesh_json,
    model_config,
    peak_bytes,
    peak_text,
)
from ic_jax.bench.flags import one_size
from ic_jax.cli import SIZE_HELP, ArgumentParser, entry, positive_int
from ic_jax.errors import UserError
from ic_jax.files import atomic_write_text, check_output_file
from ic_jax.model.pattern import parse_pattern
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.engine import Engine, decode_step, prefill_chunk
from ic_jax.runtime.loading import random_model
from ic_jax.runtime.memory import check_fits
from ic_jax.runtime.sampling import Sampling
from ic_jax.runtime.sharding import check_data_split, mesh_from_args

PROFILED_STEPS = 3


def random_cache(cache, seed: int):
    """The cache with every float entry drawn from N(0, 1) (the FP8 key scales keep their 1s), one leaf at a time,
    each drawn where it lies (its shards on their devices)."""
    leaves, tree = jax.tree.flatten(cache)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def draw(key, shape, dtype, sharding):
        return jax.lax.with_sharding_constraint(jax.random.normal(key, shape, jnp.bfloat16).astype(dtype), sharding)

    return jax.tree.unflatten(tree, [x if x.dtype == jnp.float32 else draw(k, x.shape, x.dtype, x.sharding)
                                     for k, x in zip(keys, leaves)])


def device_profile(run, steps: int, top: int) -> dict:
    """Traces `run()` (which issues `steps` steps and waits) and sums its kernels per step: on the first
    accelerator every kernel of its streams (the nodes of a CUDA graph may overlap, so the kernel time can exceed
    the span), or the innermost XLA ops of the host's CPU client where there is none."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            run()
        data = ProfileData.from_file(str(next(Path(tmp).rglob("*.xplane.pb"))))
    planes = list(data.planes)
    device = [p for p in planes if p.name.startswith(("/device:GPU", "/device:TPU"))][:1]
    events = []
    for plane in device:
        events += [ev for line in plane.lines if line.name.startswith("Stream") for ev in line.events]
    for plane in [] if device else [p for p in planes if p.name == "/host:CPU"]:
        for line in plane.lines:
            ops = sorted((ev for ev in line.events if "hlo_op" in dict(ev.stats)), key=lambda e: e.start_ns)
            # leaves only: a loop's event encloses those of its body
            events += [ev for ev, nxt in zip(ops, ops[1:] + [None])
                       if nxt is None or nxt.start_ns >= ev.start_ns + ev.duration_ns]
    if not events:
        raise RuntimeError("the profiler trace holds no kernel events")
    time_ns, calls = collections.Counter(), collections.Counter()
    for ev in events:
        time_ns[ev.name] += ev.duration_ns
        calls[ev.name] += 1
    first = min(ev.start_ns for ev in events)
    last = max(ev.start_ns + ev.duration_ns for ev in events)
    return {"kernel_ms": sum(time_ns.values()) / steps / 1e6, "span_ms": (last - first) / steps / 1e6,
            "kernels": len(events) / steps,
            "top": [{"name": name, "ms": ns / steps / 1e6, "calls": calls[name] / steps}
                    for name, ns in time_ns.most_common(top)]}


def cache_length(a) -> int:
    """Decode advances one position per step (timed, warm-up and profiled); a prefill chunk repeats its positions."""
    return a.context + (a.chunk if a.chunk > 1 else a.steps + PROFILED_STEPS + 8)


def time_pattern(cfg, spec: str, a, opts: RunOptions, mesh) -> dict:
    pattern = parse_pattern(spec, cfg.num_hidden_layers)
    t = time.perf_counter()
    engine = Engine(random_model(cfg, pattern, a.seed, mesh), opts, mesh)
    opts = engine.opts  # with the mesh: the ops run per shard
    check_fits(engine.model, mesh, a.batch, cache_length(a), a.chunk, opts, "lower --batch, --context or --chunk")
    cache = random_cache(engine.new_cache(a.batch, cache_length(a)), a.seed)
    jax.block_until_ready(cache)
    setup_s = time.perf_counter() - t
    key = jax.random.key(a.seed)
    state = {"token": jnp.zeros(a.batch, jnp.int32), "cache": cache, "pos": a.context}
    tokens = jnp.zeros((a.batch, a.chunk), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(a.context, a.context + a.chunk, dtype=jnp.int32), tokens.shape)
    last = jnp.full(a.batch, a.chunk - 1, jnp.int32)

    def steps(n: int) -> None:
        for _ in range(n):
            if a.chunk > 1:
                state["token"], state["cache"] = prefill_chunk(engine.graphdef, engine.params, tokens, positions,
                                                               state["cache"], last, opts)
                continue
            pos = jnp.full(a.batch, state["pos"], jnp.int32)
            state["token"], _, state["cache"] = decode_step(engine.graphdef, engine.params, state["token"], pos,
                                                            state["cache"], key, opts, Sampling())
            state["pos"] += 1
        jax.block_until_ready(state["token"])

    t = time.perf_counter()
    steps(1)
    compile_s = time.perf_counter() - t
    steps(2)
    t = time.perf_counter()
    steps(a.steps)
    ms = (time.perf_counter() - t) / a.steps * 1e3
    row = {"pattern": pattern, "spec": spec, "indexers": pattern.count("F"), "ms_per_step": ms,
           "tok_s": 1e3 * a.chunk / ms, "setup_s": setup_s, "compile_s": compile_s,
           "peak_bytes_per_device": peak_bytes()}
    if a.profile:
        row["profile"] = device_profile(lambda: steps(PROFILED_STEPS), PROFILED_STEPS, a.top)
    return row


def print_profile(row: dict) -> None:
    prof = row["profile"]
    print(f"\n{row['spec']}: {prof['kernels']:.0f} kernels, {prof['kernel_ms']:.2f} ms of kernel time and "
          f"{prof['span_ms']:.2f} ms from first to last kernel per step (traced; the untraced step is "
          f"{row['ms_per_step']:.2f} ms)")
    print(f"{'ms/step':>9} {'share':>6} {'calls':>6}  kernel")
    for k in prof["top"]:
        print(f"{k['ms']:9.3f} {100 * k['ms'] / prof['kernel_ms']:5.1f}% {k['calls']:6.1f}  {k['name'][:100]}")


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ic_jax.bench step", description=__doc__)
    add_model_arguments(p)
    p.add_argument("--patterns", nargs="+", default=["F", "FSSS"],
                   help="patterns in any --pattern form; speedups are against the first (default: F FSSS)")
    p.add_argument("--context", type=one_size, default="200k",
                   help=f"tokens already in the cache ({SIZE_HELP}; default 200k)")
    p.add_argument("--chunk", type=positive_int, default=1,
                   help="tokens per step: 1 times decode steps (the default), N > 1 a prefill chunk of N tokens")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences run together (default 1)")
    p.add_argument("--steps", type=positive_int,
                   help="steps timed per pattern (default 32 decode steps, or 3 prefill chunks)")
    p.add_argument("--profile", action="store_true",
                   help="trace 3 more steps and print the kernels with the most device time")
    p.add_argument("--top", type=positive_int, default=25,
                   help="kernels listed per pattern with --profile (default 25)")
    p.add_argument("--json", type=Path, help="write the rows (and profiles) as JSON here")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.steps is None:
        a.steps = 32 if a.chunk == 1 else 3
    if a.json:
        check_output_file(a.json, "--json")
    cfg = model_config(a)
    if cache_length(a) > cfg.max_position_embeddings:
        raise UserError(f"--context {a.context} plus the {'chunk' if a.chunk > 1 else 'steps'} exceeds "
                        f"max_position_embeddings {cfg.max_position_embeddings}; give a shorter context")
    for spec in a.patterns:
        parse_pattern(spec, cfg.num_hidden_layers)  # bad patterns fail before any model is built
    mesh = mesh_from_args(a)
    check_data_split(a.batch, mesh, "--batch", one_prompt_ok=True)
    opts = RunOptions.for_impl(a.impl)
    device = jax.devices()[0].device_kind
    what = "decode step" if a.chunk == 1 else f"prefill chunk of {a.chunk}"
    rows: list[dict] = []
    for spec in tqdm(a.patterns, desc=what, unit="pattern"):
        rows.append(time_pattern(cfg, spec, a, opts, mesh))
        rows[-1]["speedup"] = rows[0]["ms_per_step"] / rows[-1]["ms_per_step"]
        if a.json:  # every pattern measured so far, so an interrupted run keeps its numbers
            atomic_write_text(a.json, json.dumps({
                "device": device, "jax": jax.__version__, "impl": opts.implementation or "auto", "config": a.config,
                "layers": cfg.num_hidden_layers, "context": a.context, "chunk": a.chunk, "batch": a.batch,
                "indexer_fp8": cfg.indexer_fp8, "mesh": mesh_json(mesh), "rows": rows}, indent=2))
    print(f"\n{cfg.num_hidden_layers} layers, {device}, jax {jax.__version__}, impl {opts.implementation or 'auto'}, "
          f"batch {a.batch}, context {a.context}, {what}, indexer {'fp8' if cfg.indexer_fp8 else 'bf16'}, "
          f"mesh {a.mesh or 'none'}")
    print(f"{'pattern':>10} {'indexers':>9} {'ms/step':>9} {'tok/s':>9} {'speedup':>8} {'peak GB/dev':>11}")
    for r in rows:
        print(f"{r['spec'][:10]:>10} {r['indexers']:>5}/{cfg.num_hidden_layers:<3} {r['ms_per_step']:9.2f} "
              f"{r['tok_s']:9.1f} {r['speedup']:7.2f}x {peak_text(r):>11}")
    if a.profile:
        for r in rows:
            print_profile(r)
    return 0


main = entry(main)
