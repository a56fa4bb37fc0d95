"""python -m ic_jax.bench grouped-matmul: the MoE matmuls on the 30B shapes (top-4 of 64 experts, gate/up and
down projections). Prefill (8192 tokens): the grouped matmul's Pallas block-size variants against
jax.lax.ragged_dot and a dense matmul of the same FLOPs. Decode (batches of 1 and 8 tokens, 4 and 32 routed
rows): the gathered matmul's variants against XLA (gather the chosen experts, then one einsum), as GB/s of
expert weights read and the share of the copy bandwidth measured in the same run. Each variant is first
checked against a float32 reference.
"""

from __future__ import annotations

import datetime
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ic_jax.bench.timing import measure_ceilings, median_time, write_json
from ic_jax.cli import ArgumentParser, entry
from ic_jax.errors import UserError
from ic_jax.files import check_output_file
from ic_jax.ops.grouped_matmul import gpu, reference

TOKENS, TOPK, EXPERTS = 8192, 4, 64
SHAPES = {"gate/up": (2048, 1536), "down": (1536, 2048)}
VARIANTS = [  # bm, bn, bk, num_warps, num_stages
    (128, 128, 64, 8, 4), (128, 128, 64, 8, 5), (128, 256, 64, 8, 4), (64, 256, 64, 8, 4),
]
DECODE_ROWS = (4, 32)  # routed rows of decode batches 1 and 8 at top-4
GATHERED_VARIANTS = [  # bn, bk, num_warps, num_stages; the first is the kernel's default
    (64, 128, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 256, 8, 3), (128, 64, 4, 4), (16, 256, 2, 4),
]


def routed_sizes(rng) -> np.ndarray:
    """Group sizes of top-4 routing with skewed expert popularity."""
    p = rng.dirichlet(np.ones(EXPERTS) * 2.0)
    choice = np.argsort(-np.log(rng.random((TOKENS, EXPERTS))) / p, axis=1)[:, :TOPK]
    return np.bincount(choice.ravel(), minlength=EXPERTS).astype(np.int32)


def group_loop(x, w, sizes) -> np.ndarray:
    """f32 reference at full precision: rows gathered into [G, largest group, K], one batched matmul."""
    starts, cap = np.cumsum(sizes) - sizes, int(sizes.max())
    idx = np.minimum(starts[:, None] + np.arange(cap), x.shape[0] - 1)
    valid = np.arange(cap) < sizes[:, None]
    y = jnp.einsum("gmk,gkn->gmn", x[idx].astype(jnp.float32), w.astype(jnp.float32), precision="highest")
    out = np.zeros((x.shape[0], w.shape[2]), np.float32)
    out[idx[valid]] = np.asarray(y)[valid]
    return out


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m ic_jax.bench grouped-matmul", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the rows and the device as JSON here")
    a = p.parse_args(argv)
    if a.json:
        check_output_file(a.json, "--json")
    if jax.default_backend() != "gpu":
        raise UserError("the grouped-matmul benchmark needs a GPU (its Pallas kernel is Triton-only)")
    rng = np.random.default_rng(0)
    device = jax.devices()[0].device_kind
    print(device, jax.__version__)
    rows = []
    for name, (K, N) in SHAPES.items():
        M = TOKENS * TOPK
        sizes = routed_sizes(rng)
        sizes[[3, 40]] = 0  # empty groups
        sizes[sizes.argmax()] += M - 64 - sizes.sum()  # 64 rows past the groups
        x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((EXPERTS, K, N)) * K**-0.5, jnp.bfloat16)
        g = jnp.asarray(sizes)
        flops = 2 * (M - 64) * K * N
        ref = group_loop(x, w, sizes)
        ms = median_time(jax.jit(reference.grouped_matmul), x, w, g) * 1e3
        rows.append((name, "ragged_dot", ms, flops / ms / 1e9, rel_err(reference.grouped_matmul(x, w, g), ref)))
        print(*rows[-1], flush=True)
        dense = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
        ms = median_time(dense, x, w[0]) * 1e3
        rows.append((name, "dense same FLOPs", ms, 2 * M * K * N / ms / 1e9, float("nan")))
        print(*rows[-1], flush=True)
        for bm, bn, bk, warps, stages in VARIANTS:
            label = f"pallas bm{bm} bn{bn} bk{bk} w{warps} s{stages}"
            fn = jax.jit(functools.partial(gpu.grouped_matmul, bm=bm, bn=bn, bk=bk, num_warps=warps,
                                           num_stages=stages))
            try:
                err = rel_err(fn(x, w, g), ref)
                ms = median_time(fn, x, w, g) * 1e3
            except Exception as e:  # a variant that fails to compile should not end the run
                print(label, "FAILED:", str(e).splitlines()[0][:300])
                continue
            rows.append((name, label, ms, flops / ms / 1e9, err))
            print(*rows[-1], flush=True)
    decode = decode_rows(rng, measure_ceilings()["copy_bytes_s"])
    print(f"\nprefill, {TOKENS} tokens\n{'shape':8} {'variant':36} {'ms':>8} {'TFLOP/s':>8} {'rel err':>9}")
    for name, label, ms, tflops, err in rows:
        print(f"{name:8} {label:36} {ms:8.3f} {tflops:8.1f} {err:9.2e}")
    print(f"\ndecode (gathered matmul)\n{'shape':8} {'rows':>4} {'variant':28} {'ms':>8} {'GB/s':>7} {'% copy':>7} "
          f"{'vs XLA':>7} {'rel err':>9}")
    for r in decode:
        print(f"{r['shape']:8} {r['rows']:4} {r['variant']:28} {r['ms']:8.4f} {r['gb_s']:7.0f} {r['pct_copy']:7.1f} "
              f"{r['vs_xla']:6.2f}x {r['rel_err']:9.2e}")
    if a.json:
        write_json(a.json, {"device": device, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
                            "rows": [dict(zip(("shape", "variant", "ms", "tflops", "rel_err"), r)) for r in rows],
                            "decode_rows": decode})
    return 0


def decode_rows(rng, copy_bytes_s: float) -> list[dict]:
    """The gathered matmul at decode sizes, distinct experts per row (every row reads its own matrix)."""
    out = []
    for name, (K, N) in SHAPES.items():
        w = jnp.asarray(rng.standard_normal((EXPERTS, K, N)) * K**-0.5, jnp.bfloat16)
        for M in DECODE_ROWS:
            x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
            groups = jnp.asarray(rng.choice(EXPERTS, M, replace=False).astype(np.int32))
            ref = jnp.einsum("mk,mkn->mn", x.astype(jnp.float32), w[groups].astype(jnp.float32), precision="highest")
            nbytes = M * K * N * w.dtype.itemsize
            xla = jax.jit(reference.gathered_matmul)
            xla_ms = median_time(xla, x, w, groups) * 1e3
            cases = [("xla gather + einsum", xla)] + [
                (f"pallas bn{bn} bk{bk} w{warps} s{stages}",
                 jax.jit(functools.partial(gpu.gathered_matmul, bn=bn, bk=bk, num_warps=warps, num_stages=stages)))
                for bn, bk, warps, stages in GATHERED_VARIANTS]
            for label, fn in cases:
                try:
                    err = rel_err(fn(x, w, groups), ref)
                    ms = xla_ms if fn is xla else median_time(fn, x, w, groups) * 1e3
                except Exception as e:  # a variant that fails to compile should not end the run
                    print(label, "FAILED:", str(e).splitlines()[0][:300])
                    continue
                gb_s = nbytes / ms / 1e6
                out.append({"shape": name, "rows": M, "variant": label, "ms": ms, "gb_s": gb_s,
                            "pct_copy": 100 * gb_s * 1e9 / copy_bytes_s, "vs_xla": xla_ms / ms, "rel_err": err})
                print(*out[-1].values(), flush=True)
    return out


main = entry(main)
