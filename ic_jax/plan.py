"""python -m ic_jax.plan: how much memory one device needs to serve a model on a mesh, before any device is used.

The prefill chunk and the decode step are compiled ahead of time for abstract params and caches (shapes only,
nothing allocated) on fake CPU devices shaped like the mesh: the command re-runs itself in a child process with
XLA_FLAGS=--xla_force_host_platform_device_count=N. It reports per-device bytes for params and caches (exact, from
the shapes and shardings), the temporaries XLA reserves for each program, and the largest batch at --context and
the longest context at --batch that fit one device (temporaries scaled in proportion to batch x context).
With --backend local the programs are compiled for this machine's own devices instead (still nothing allocated):
on a GPU host that gives the GPU compiler's temporaries for the GPU kernels, to check a plan against a measured peak.

Examples:
  python -m ic_jax.plan --config deepseek_v32 --mesh tensor=8 --context 128k --batch 4 --device h200
  python -m ic_jax.plan --config glm5 --mesh data=2,tensor=8 --context 128k --device v5p --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

from ic_jax.cli import (
    SIZE_HELP,
    ArgumentParser,
    add_expert_parallel_data_argument,
    entry,
    parse_size,
    positive_int,
)
from ic_jax.errors import UserError
from ic_jax.runtime.sharding import check_expert_parallel_data, parse_mesh, splits_as_is

DEVICES = ("h200", "h100", "v5p", "v6e")
IMPLS = {"xla": ("xla", False), "pallas": ("pallas_gpu", True)}  # the kernels compile in interpret mode on CPU
CHILD = "IC_JAX_PLAN_DEVICES"


def parse_args(argv):
    p = ArgumentParser(prog="python -m ic_jax.plan", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config JSON or preset name (tiny, glm47_flash_dsa, deepseek_v32, "
                                                   "glm5)")
    p.add_argument("--layers", type=positive_int,
                   help="plan the model's first N layers only (as bench --layers: a model too large for the devices "
                        "at hand, measured on fewer layers)")
    p.add_argument("--pattern", help="IndexCache pattern (as in generate; default all F)")
    p.add_argument("--mesh", default="", help="device mesh as axis=size over data,tensor,expert (default: one device)")
    add_expert_parallel_data_argument(p)
    p.add_argument("--context", type=parse_size, default=parse_size("128k"),
                   help=f"tokens per sequence in the cache (default 128k; {SIZE_HELP})")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences (default 1)")
    p.add_argument("--chunk-size", type=positive_int, default=2048, help="prefill chunk (default 2048)")
    p.add_argument("--device", choices=DEVICES, default="h200",
                   help="device whose memory the plan is checked against (H200 141 GB, H100 80 GB, TPU v5p 95 GB, "
                        "v6e 32 GB; default h200)")
    p.add_argument("--impl", choices=("auto", *sorted(IMPLS)), default="auto",
                   help="op implementation compiled: xla (the jnp references) or pallas (the GPU kernels, compiled "
                        "in interpret mode on fake CPU devices); default auto: xla on fake CPU devices, and with "
                        "--backend local what generate would run there (the Pallas kernels on a GPU)")
    p.add_argument("--backend", choices=("cpu", "local"), default="cpu",
                   help="compile for fake CPU devices shaped like the mesh (cpu, default: runs anywhere) or for this "
                        "machine's own devices (local: needs as many as the mesh; the real compiler's temporaries)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p.parse_args(argv)


def checked(a):
    """The config and pattern, checked before any compiling."""
    from ic_jax.model.config import check_context, load_config
    from ic_jax.model.pattern import parse_pattern

    cfg = load_config(a.config)
    if a.layers is not None:
        cfg = cfg.first_layers(a.layers)
    check_context(a.context, cfg, "--context")
    sizes = parse_mesh(a.mesh)
    if a.expert_parallel_data:
        check_expert_parallel_data(sizes)
    data = sizes["data"]
    if not splits_as_is(a.batch, data):
        raise UserError(f"--batch {a.batch} does not split over the {data} devices of the data axis; give a multiple "
                        f"of {data}")
    return cfg, parse_pattern(a.pattern, cfg.num_hidden_layers)


def plan(a) -> dict:
    import jax

    from ic_jax.model.run_options import RunOptions
    from ic_jax.runtime.memory import DEVICE_MEMORY, abstract_model, make_plan, max_batch, max_context
    from ic_jax.runtime.sharding import make_mesh

    cfg, pattern = checked(a)
    sizes = parse_mesh(a.mesh)
    if len(jax.devices()) < math.prod(sizes.values()):
        raise UserError(f"--mesh {a.mesh} needs {math.prod(sizes.values())} devices but this machine has "
                        f"{len(jax.devices())}; drop --backend local to plan on fake CPU devices")
    mesh = make_mesh(sizes, jax.devices()[: math.prod(sizes.values())], a.expert_parallel_data)
    if a.backend == "local":
        opts = RunOptions.for_impl(a.impl)
        opts = dataclasses.replace(opts, index_block=min(opts.index_block, a.chunk_size))
    else:
        implementation, interpret = IMPLS["xla" if a.impl == "auto" else a.impl]
        opts = RunOptions(implementation=implementation, interpret=interpret, index_block=min(2048, a.chunk_size))
    model = abstract_model(cfg, pattern)
    t0 = time.perf_counter()
    p = make_plan(model, mesh, a.batch, a.context, a.chunk_size, opts)
    compile_s = time.perf_counter() - t0
    capacity = DEVICE_MEMORY[a.device]
    return {"config": a.config, "layers": cfg.num_hidden_layers, "pattern": pattern,
            "mesh": {k: v for k, v in sizes.items() if v > 1} or {"data": 1},
            "expert_parallel_data": a.expert_parallel_data, "devices": mesh.size, "device": a.device,
            "device_bytes": capacity, "batch": p.batch, "context": p.context,
            "chunk": p.chunk, "impl": opts.implementation or "auto", "params_bytes": p.params, "cache_bytes": p.cache,
            "prefill_temp_bytes": p.prefill_temp, "decode_temp_bytes": p.decode_temp, "total_bytes": p.total,
            "fits": p.total <= capacity, "max_batch": max_batch(p, model, mesh, capacity),
            "max_context": max_context(p, model, mesh, capacity), "compile_s": round(compile_s, 1),
            "backend": a.backend, "compiled_for": jax.devices()[0].device_kind, "jax": jax.__version__}


def table(r: dict) -> str:
    gb = 1e9
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    rows = [("params", r["params_bytes"]), ("caches", r["cache_bytes"]),
            ("prefill chunk temporaries", r["prefill_temp_bytes"]), ("decode step temporaries", r["decode_temp_bytes"]),
            ("total (params + caches + larger temporaries)", r["total_bytes"])]
    layout = ", experts over data too" if r["expert_parallel_data"] else ""
    lines = [f"{r['config']} ({r['layers']} layers) on {r['devices']} x {r['device']} ({mesh}{layout}), batch "
             f"{r['batch']} x context {r['context']}, chunk {r['chunk']}, impl {r['impl']}, compiled for "
             f"{r['compiled_for']}: per device"]
    lines += [f"  {name:<46} {v / gb:10.2f} GB" for name, v in rows]
    verdict = "fits" if r["fits"] else "does NOT fit"
    if r["backend"] == "cpu":
        floor = r["params_bytes"] + r["cache_bytes"]
        lines.append(f"  params + caches alone: {floor / gb:.2f} GB ({'within' if floor <= r['device_bytes'] else 'over'} "
                     f"{r['device']}'s {r['device_bytes'] / gb:.0f} GB). The temporaries are the CPU compiler's, an "
                     f"upper bound far above what the GPU kernels need: plan on the target devices with --backend "
                     f"local for theirs")
    lines.append(f"  {r['device']} has {r['device_bytes'] / gb:.0f} GB: {verdict}; largest batch at context "
                 f"{r['context']}: {r['max_batch']}; longest context at batch {r['batch']}: {r['max_context']}")
    return "\n".join(lines)


def run_with_devices(argv, n: int) -> int:
    """Runs this command again in a child process whose CPU backend has n devices (fixed when jax starts)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{CHILD: str(n)})
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
    return subprocess.run([sys.executable, "-m", "ic_jax.plan", *argv], env=env).returncode


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    n = math.prod(parse_mesh(a.mesh).values())
    if a.backend == "cpu" and os.environ.get(CHILD) != str(n):
        checked(a)  # bad input ends here, before a child starts
        return run_with_devices(argv, n)
    r = plan(a)
    print(json.dumps(r) if a.json else table(r))
    return 0


main = entry(main)

if __name__ == "__main__":
    raise SystemExit(main())
