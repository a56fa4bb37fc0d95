"""python -m ic_jax.bench throughput: saturated decode throughput per IndexCache pattern, the device full of requests.

Random weights of a preset (default: the 30B GLM-4.7-Flash + DSA shape) are made on the device. For each pattern,
as many requests of `--context` random tokens as fit the free memory by the memory plan (or `--slots N`) are
prefilled one at a time into their cache slots, as a server admits them (`runtime.batching.SlotCache`), then
decoded together for `--decode-steps` steps. Reported: the total decode tokens per second of all slots (the first
two steps, which compile, untimed), the batch that fit, the time of one request's prefill, and the peak memory of the
fullest device so far in the process (GPU/TPU; run one pattern per process for the peak of that pattern alone).
Compare with the paper (indexcache.md): at 200K, 197 tok/s all-F -> 297 tok/s at 1/4 of the indexers (1.51x).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from ic_jax.bench.e2e import (
    add_model_arguments,
    mesh_json,
    model_config,
    peak_bytes,
)
from ic_jax.bench.flags import one_size
from ic_jax.bench.timing import print_table, write_json
from ic_jax.cli import SIZE_HELP, ArgumentParser, entry, positive_int
from ic_jax.errors import UserError
from ic_jax.files import check_output_file
from ic_jax.model.pattern import parse_pattern
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.batching import SlotCache, max_slots
from ic_jax.runtime.engine import Engine, to_host
from ic_jax.runtime.loading import random_model
from ic_jax.runtime.memory import check_fits
from ic_jax.runtime.sharding import check_data_split, mesh_from_args

PAPER_200K = {"all-F": 197.0, "1/4": 297.0}  # total decode tok/s at saturation, SGLang on H100
MAX_SLOTS = 1024  # the search bound when the memory plan picks the batch
WARMUP_STEPS = 2  # untimed decode steps before the timed ones


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ic_jax.bench throughput", description=__doc__)
    add_model_arguments(p)
    p.add_argument("--patterns", nargs="+", default=["F", "FSSS"],
                   help="patterns in any --pattern form; ratios are against the first (default: F FSSS)")
    p.add_argument("--context", type=one_size, default=200_000, help=f"prompt length per request ({SIZE_HELP}; "
                                                                      f"default 200k)")
    p.add_argument("--slots", type=positive_int,
                   help="requests decoded together (default: as many as fit the free memory, by the memory plan)")
    p.add_argument("--chunk-size", type=positive_int, default=16384, help="prefill chunk (default 16384)")
    p.add_argument("--decode-steps", type=positive_int, default=32,
                   help=f"timed decode steps of all slots together, after {WARMUP_STEPS} untimed ones (default 32)")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    return p


def measure(cfg, pattern: str, a, opts: RunOptions, mesh, bar) -> dict:
    """Fills the slots of one pattern's model with requests and times their decode steps."""
    t = time.perf_counter()
    engine = Engine(random_model(cfg, pattern, a.seed, mesh), opts, mesh)
    jax.block_until_ready(engine.params)
    bar.write(f"{pattern}: random init {time.perf_counter() - t:.1f}s")
    max_len = a.context + WARMUP_STEPS + a.decode_steps
    chunk = min(a.chunk_size, a.context)
    if a.slots:
        check_fits(engine.model, mesh, a.slots, max_len, chunk, engine.opts, "lower --slots, --context or --chunk-size")
        slots = a.slots
    else:
        slots = max_slots(engine.model, mesh, max_len, chunk, engine.opts, MAX_SLOTS)
        if slots == 0:
            raise UserError(f"not one request of {a.context} tokens fits the free memory; lower --context or shard "
                            f"over more devices (--mesh)")
    bar.write(f"  {slots} slots of {max_len} positions")
    rng = np.random.default_rng(a.seed)
    slot_cache = SlotCache(engine, slots, max_len, a.chunk_size)
    # compiles the chunk programs: the first chunk's (a fresh row) and the next ones' (the row a chunk returned)
    to_host(slot_cache.prefill(0, [1] * min(a.context, 2 * chunk)).argmax(-1))
    first = np.zeros(slots, np.int32)
    t = time.perf_counter()
    for slot in range(slots):
        prompt = rng.integers(0, min(cfg.vocab_size, 32000), a.context).tolist()
        first[slot] = int(to_host(slot_cache.prefill(slot, prompt).argmax(-1))[0])
    prefill_s = (time.perf_counter() - t) / slots
    positions = np.full(slots, a.context, np.int32)
    token = first
    for i in range(WARMUP_STEPS):  # the first takes host tokens, the next the device's own: each compiles
        token, _ = slot_cache.decode(token, positions + i)
    jax.block_until_ready(token)
    t = time.perf_counter()
    for i in range(WARMUP_STEPS, WARMUP_STEPS + a.decode_steps):
        token, _ = slot_cache.decode(token, positions + i)
    jax.block_until_ready(token)
    decode_s = time.perf_counter() - t
    steps = a.decode_steps
    bar.update(1)
    return {"pattern": pattern, "indexers": pattern.count("F"), "context": a.context, "slots": slots,
            "prefill_s_per_request": prefill_s, "decode_step_s": decode_s / steps,
            "decode_tok_s": slots * steps / decode_s, "decode_tok_s_per_request": steps / decode_s,
            "peak_bytes_per_device": peak_bytes()}


def main(argv=None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.json:
        check_output_file(a.json, "--json")
    cfg = model_config(a)
    if a.context + WARMUP_STEPS + a.decode_steps > cfg.max_position_embeddings:
        raise UserError(f"--context {a.context} plus {WARMUP_STEPS + a.decode_steps} decode steps exceeds the model's "
                        f"max_position_embeddings {cfg.max_position_embeddings}; give a shorter context")
    patterns = [parse_pattern(s, cfg.num_hidden_layers) for s in a.patterns]
    mesh = mesh_from_args(a)
    if a.slots:
        check_data_split(a.slots, mesh, "--slots")
    opts = RunOptions.for_impl(a.impl)
    device = jax.devices()[0].device_kind
    rows: list[dict] = []

    def save() -> None:
        """Writes every pattern measured so far, so an interrupted run keeps its numbers."""
        if a.json:
            write_json(a.json, {"device": device, "jax": jax.__version__, "impl": opts.implementation or "auto",
                                "config": a.config, "layers": cfg.num_hidden_layers, "indexer_fp8": cfg.indexer_fp8,
                                "mesh": mesh_json(mesh), "devices": mesh.size if mesh is not None else 1,
                                "chunk_size": a.chunk_size, "decode_steps": a.decode_steps, "rows": rows})

    with tqdm(total=len(patterns), desc="throughput", unit="pattern") as bar:
        for pattern in patterns:
            rows.append(measure(cfg, pattern, a, opts, mesh, bar))
            for r in rows:
                r["speedup"] = r["decode_tok_s"] / rows[0]["decode_tok_s"]
            save()
            gc.collect()  # the last pattern's params and cache go before the next one's are made
    for r in rows:
        r["peak_gb_per_device"] = None if r["peak_bytes_per_device"] is None else r["peak_bytes_per_device"] / 1e9
    print(f"\n{cfg.num_hidden_layers} layers, {device}, jax {jax.__version__}, impl {opts.implementation or 'auto'}, "
          f"context {a.context}, mesh {a.mesh or 'none'}; paper at 200K: {PAPER_200K['all-F']:.0f} tok/s all-F, "
          f"{PAPER_200K['1/4']:.0f} tok/s at 1/4 (1.51x)")
    print_table(rows, [("pattern", "pattern"), ("indexers", "indexers"), ("slots", "slots"),
                       ("prefill_s_per_request", "prefill s/req"), ("decode_step_s", "step s"),
                       ("decode_tok_s", "decode tok/s"), ("speedup", "speedup"), ("peak_gb_per_device", "peak GB/dev")])
    return 0


main = entry(main)
