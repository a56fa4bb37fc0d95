"""python -m ic_jax.bench e2e: end-to-end prefill time and decode speed per IndexCache pattern.

Random weights of a preset (default: the 30B GLM-4.7-Flash + DSA shape, 47 layers) are made on the device;
for each pattern and context length it times one chunked prefill of a random prompt (after compiling
on its first chunk) and then `--decode-steps` decode steps, and reports the speedup of every pattern
over the first one, measured in the same run. Compare with the paper's SGLang figures (indexcache.md
section 4): 200K prefill 19.5 s all-F -> 10.7 s at 1/4; decode 58 -> 86 tok/s. --indexer-fp8 scores the keys
with FP8 indexer logits (the config's `indexer_fp8`); compare it with a run without the flag. With --mesh the params
are born sharded and the ops run per shard. Each row also reports the peak memory of the fullest device so far in
the process (the allocator's high-water mark, on GPU/TPU), to set beside `python -m ic_jax.plan`; run one pattern
and one context per process for a peak of that point alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from ic_jax.cli import (
    SIZE_HELP,
    ArgumentParser,
    add_impl_argument,
    add_mesh_arguments,
    add_seed_argument,
    entry,
    positive_int,
    size_list,
)
from ic_jax.errors import UserError
from ic_jax.files import atomic_write_text, check_output_file
from ic_jax.model.config import load_config
from ic_jax.model.pattern import parse_pattern
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.engine import Engine, decode_step
from ic_jax.runtime.loading import random_model
from ic_jax.runtime.memory import check_fits
from ic_jax.runtime.sampling import Sampling
from ic_jax.runtime.sharding import (
    check_data_split,
    mesh_from_args,
)

PAPER = {  # context -> (prefill all-F s, prefill 1/4 s, decode all-F tok/s, decode 1/4 tok/s), SGLang on H100
    10_000: (0.57, 0.45, 73.5, 91.0), 60_000: (3.38, 2.59, 67.0, 89.5),
    120_000: (8.57, 5.66, 63.0, 88.0), 200_000: (19.5, 10.7, 58.0, 86.0),
}


def add_model_arguments(p: ArgumentParser) -> None:
    """The model and parallelism flags of the whole-model benchmarks (e2e, step); `model_config` and
    `mesh_from_args` read them."""
    p.add_argument("--config", default="glm47_flash_dsa", help="preset or config JSON (default glm47_flash_dsa)")
    p.add_argument("--layers", type=positive_int, help="override num_hidden_layers (quick checks)")
    add_impl_argument(p)
    p.add_argument("--indexer-fp8", action="store_true",
                   help="FP8 indexer logits (e4m3, a scale per vector) for top-k selection (default bf16)")
    add_seed_argument(p, what="the random weights, prompts and cache")
    add_mesh_arguments(p)


def model_config(a):
    cfg = load_config(a.config)
    if a.layers is not None:
        cfg = cfg.first_layers(a.layers)
    return cfg.replace(indexer_fp8=True) if a.indexer_fp8 else cfg


def peak_bytes() -> int | None:
    """The allocator's peak bytes in use so far in this process on the fullest local device; None where the backend
    does not report it (CPU)."""
    stats = [d.memory_stats() for d in jax.local_devices() if hasattr(d, "memory_stats")]
    peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
    return max(peaks) if peaks else None


def peak_text(row: dict) -> str:
    """A row's peak memory per device in GB (10^9 bytes, as `python -m ic_jax.plan` prints), "-" where unknown."""
    peak = row["peak_bytes_per_device"]
    return "-" if peak is None else f"{peak / 1e9:.2f}"


def mesh_json(mesh: Mesh | None) -> dict[str, int] | None:
    """The mesh's axis sizes, as the JSON headers of the benchmarks record it (None: no mesh)."""
    return dict(mesh.shape) if mesh is not None else None


def time_pattern(cfg, pattern: str, contexts: list[int], a, opts: RunOptions, mesh, bar, save) -> list[dict]:
    t = time.perf_counter()
    engine = Engine(random_model(cfg, pattern, a.seed, mesh), opts, mesh)
    opts = engine.opts  # with the mesh: the ops run per shard
    jax.block_until_ready(engine.params)
    bar.write(f"{pattern}: random init {time.perf_counter() - t:.1f}s")
    rng = np.random.default_rng(a.seed)
    rows = []
    for ctx in contexts:
        prompts = [list(rng.integers(0, min(cfg.vocab_size, 32000), ctx)) for _ in range(a.batch)]
        max_len = ctx + a.decode_steps + 1
        chunk = min(a.chunk_size, ctx)
        t = time.perf_counter()
        check_fits(engine.model, mesh, a.batch, max_len, chunk, opts, "lower --batch, --chunk-size or --contexts")
        # compile on the first two chunks, so the timed prefill below is all execution: the first chunk takes a
        # fresh cache, the later ones the cache a chunk returned, whose placement may compile another program
        jax.block_until_ready(engine.prefill([p[:2 * chunk] for p in prompts], max_len, chunk)[0])
        bar.write(f"  {ctx}: compile + first chunks {time.perf_counter() - t:.1f}s")
        t0 = time.perf_counter()
        logits, cache, lengths = engine.prefill(prompts, max_len, chunk)
        jax.block_until_ready(logits)
        prefill_s = time.perf_counter() - t0
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        key = jax.random.key(0)
        token, _, cache = decode_step(engine.graphdef, engine.params, token, jnp.asarray(lengths), cache, key,
                                      opts, Sampling())
        jax.block_until_ready(token)
        t1 = time.perf_counter()
        for i in range(1, a.decode_steps):
            token, _, cache = decode_step(engine.graphdef, engine.params, token, jnp.asarray(lengths + i), cache,
                                          key, opts, Sampling())
        jax.block_until_ready(token)
        decode_tok_s = (a.decode_steps - 1) / (time.perf_counter() - t1)
        bar.write(f"  {ctx}: prefill {prefill_s:.2f}s, decode {decode_tok_s:.1f} tok/s")
        rows.append({"pattern": pattern, "indexers": pattern.count("F"), "context": ctx, "batch": a.batch,
                     "prefill_s": prefill_s, "decode_tok_s": decode_tok_s, "peak_bytes_per_device": peak_bytes()})
        save(rows)
        bar.update(1)
        del cache
    return rows


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ic_jax.bench e2e", description=__doc__)
    add_model_arguments(p)
    p.add_argument("--patterns", nargs="+", default=["F", "@configs/patterns/glm47_flash_dsa_1of2.json",
                                                    "@configs/patterns/glm47_flash_dsa_1of4.json"],
                   help="patterns in any --pattern form; speedups are against the first (default: all-F and the "
                        "paper's searched 1/2 and 1/4 patterns)")
    p.add_argument("--contexts", type=size_list, default="10k,60k,120k,200k",
                   help=f"prompt lengths ({SIZE_HELP}; default 10k,60k,120k,200k)")
    p.add_argument("--chunk-size", type=positive_int, default=16384, help="prefill chunk (default 16384)")
    p.add_argument("--decode-steps", type=positive_int, default=32,
                   help="decode steps timed per point, at least 2 (default 32)")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences per request batch (default 1)")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    return p


def main(argv=None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.decode_steps < 2:
        p.error(f"argument --decode-steps: must be >= 2, got {a.decode_steps}")
    if a.json:
        check_output_file(a.json, "--json")
    cfg = model_config(a)
    if max(a.contexts) + a.decode_steps > cfg.max_position_embeddings:
        raise UserError(f"--contexts {max(a.contexts)} plus --decode-steps {a.decode_steps} exceeds the model's "
                        f"max_position_embeddings {cfg.max_position_embeddings}; give shorter contexts")
    patterns = [parse_pattern(s, cfg.num_hidden_layers) for s in a.patterns]
    mesh = mesh_from_args(a)
    check_data_split(a.batch, mesh, "--batch", one_prompt_ok=True)
    opts = RunOptions.for_impl(a.impl)
    impl = opts.implementation or "auto"
    device = jax.devices()[0].device_kind
    rows: list[dict] = []

    def save(more: list[dict]) -> None:
        """Writes every point measured so far, so an interrupted run keeps its numbers."""
        if a.json:
            atomic_write_text(a.json, json.dumps({"device": device, "jax": jax.__version__, "impl": impl,
                                                  "config": a.config, "layers": cfg.num_hidden_layers,
                                                  "indexer_fp8": cfg.indexer_fp8, "mesh": mesh_json(mesh),
                                                  "devices": mesh.size if mesh is not None else 1,
                                                  "rows": rows + more}, indent=2))

    with tqdm(total=len(patterns) * len(a.contexts), desc="e2e", unit="point") as bar:
        for pattern in patterns:
            rows += time_pattern(cfg, pattern, a.contexts, a, opts, mesh, bar, save)
    base = {r["context"]: r for r in rows if r["pattern"] == patterns[0]}
    for r in rows:
        r["prefill_speedup"] = base[r["context"]]["prefill_s"] / r["prefill_s"]
        r["decode_speedup"] = r["decode_tok_s"] / base[r["context"]]["decode_tok_s"]
    save([])
    print(f"\n{cfg.num_hidden_layers} layers, {device}, jax {jax.__version__}, impl {impl}, batch {a.batch}, "
          f"chunk {a.chunk_size}, indexer {'fp8' if cfg.indexer_fp8 else 'bf16'}, mesh {a.mesh or 'none'}")
    print(f"{'context':>8} {'indexers':>9} {'prefill s':>10} {'speedup':>8} {'decode tok/s':>13} {'speedup':>8}"
          f" {'peak GB/dev':>11} | paper all-F/1/4 prefill s, decode tok/s")
    for r in rows:
        ref = PAPER.get(r["context"])
        paper = f"{ref[0]}/{ref[1]} s, {ref[2]}/{ref[3]}" if ref else "-"
        print(f"{r['context']:>8} {r['indexers']:>5}/{cfg.num_hidden_layers:<3} {r['prefill_s']:>10.3f} "
              f"{r['prefill_speedup']:>7.2f}x {r['decode_tok_s']:>13.1f} {r['decode_speedup']:>7.2f}x "
              f"{peak_text(r):>11} | {paper}")
    return 0


main = entry(main)
