"""python -m ic_jax.bench roofline KERNELS_JSON: the table of `python -m ic_jax.bench kernels --json KERNELS_JSON`
as a roofline plot. Each op and shape with a FLOP rate is a point at its FLOP per byte moved and its achieved
TFLOP/s, under the ceilings measured in the same run: the bf16 matmul rate, the copy bandwidth, and the rate of
gathering sparse MLA's rows (which bounds sparse MLA prefill; "% roof" in the table). Top-k has no FLOP rate and
is left out. Runs anywhere (no GPU needed)."""

from __future__ import annotations

import json
from pathlib import Path

from ic_jax.errors import ArgumentParser, UserError, cli_entry


def points(payload: dict) -> list[dict]:
    """The rows with a FLOP rate: op, mode, B x Tq, Tk, FLOP per byte moved and TFLOP/s."""
    out = []
    for r in payload["rows"]:
        tflops, gbs = r.get("tflops"), r.get("gbs")
        if isinstance(tflops, (int, float)) and isinstance(gbs, (int, float)) and gbs > 0:
            batch = r["shape"].split(" x ")[0] if r["mode"] == "decode" else None
            out.append({"group": f"{r['op']} {r['mode']}" + (f" B={batch}" if batch else ""), "tk": r["tk"],
                        "intensity": tflops * 1e3 / gbs, "tflops": tflops})
    return out


def load(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: no such file; write one with `python -m ic_jax.bench kernels --json {path}`")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e.msg}, line {e.lineno}); give the file of `bench kernels --json`")
    if not isinstance(payload, dict) or not {"rows", "ceilings"} <= payload.keys():
        raise UserError(f"{path}: no rows and ceilings; give the file of `python -m ic_jax.bench kernels --json`")
    return payload


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m ic_jax.bench roofline", description=__doc__)
    p.add_argument("json", type=Path, help="the JSON written by `python -m ic_jax.bench kernels --json`")
    p.add_argument("--out", type=Path, help="PNG to write (default: the JSON's path with .png)")
    a = p.parse_args(argv)
    payload = load(a.json)
    pts = points(payload)
    if not pts:
        raise UserError(f"{a.json}: no row has a FLOP rate (top-k alone?); run `bench kernels` with indexer or mla")
    from ic_jax import plots  # matplotlib only here

    ceil = payload["ceilings"]
    gathers = sorted({round(r["gather_tbs"], 2) for r in payload["rows"] if "gather_tbs" in r})
    out = a.out or a.json.with_suffix(".png")
    plots.roofline(pts, ceil["matmul_flops"] / 1e12, ceil["copy_bytes_s"] / 1e12, gathers[:1] + gathers[-1:], out,
                   f"{payload.get('device', '?')}, jax {payload.get('jax', '?')}, {payload.get('date', '?')}")
    print(f"wrote {out}: {len(pts)} points")
    return 0


main = cli_entry(main)
