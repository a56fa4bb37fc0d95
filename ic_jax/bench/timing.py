"""Shared benchmark helpers: a median timer, the device's measured ceilings, a table printer, a JSON writer."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from ic_jax.files import atomic_write_text


def median_time(fn, *args, warmup: int = 2, reps: int = 10, budget_s: float = 2.0, sample_s: float = 0.02) -> float:
    """Median time (s) per call of `fn(*args)`, after `warmup` calls (the first compiles). Each sample runs
    enough calls back to back to last about `sample_s` and waits for the last one: dispatch is asynchronous, so
    an op shorter than its host dispatch is timed on the device, as it runs inside a jitted model step, not as
    the host's launch latency. Stops early once `budget_s` of samples have run (at least 3)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls = max(1, int(sample_s / max(time.perf_counter() - t0, 1e-6)))
    times = []
    while len(times) < reps and (len(times) < 3 or sum(times) * calls < budget_s):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def measure_ceilings(n: int = 8192, copy_bytes: int = 1 << 30) -> dict:
    """bf16 matmul rate (FLOP/s) on n x n x n and copy bandwidth (bytes read + written per s)."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.bfloat16)
    b = jax.random.normal(key_b, (n, n), jnp.bfloat16)
    mm = median_time(jax.jit(jnp.dot), a, b)
    x = jax.random.normal(key_a, (copy_bytes // 4,), jnp.float32)
    cp = median_time(jax.jit(lambda x: x + 1.0), x)
    return {"matmul_flops": 2 * n**3 / mm, "copy_bytes_s": 2 * copy_bytes / cp}


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """columns: (key, header). Missing values print as '-'."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)), flush=True)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))
