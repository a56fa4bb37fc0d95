"""python -m ic_jax.bench roofline KERNELS_JSON: the table of `python -m ic_jax.bench kernels --json KERNELS_JSON`
as a roofline plot. Each op and shape with a FLOP rate is a point at its FLOP per byte moved and its achieved
TFLOP/s, under the ceilings measured in the same run: the bf16 matmul rate, the copy bandwidth, and the rate of
gathering sparse MLA's rows (which bounds sparse MLA prefill; "% roof" in the table). Top-k has no FLOP rate and
is left out. Runs anywhere (no GPU needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ic_jax.cli import ArgumentParser, entry
from ic_jax.errors import UserError
from ic_jax.files import check_output_file, read_text


def is_rate(v) -> bool:
    """A finite positive number (JSON allows NaN and Infinity)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def points(payload: dict) -> list[dict]:
    """The rows with a FLOP rate: op, mode, B x Tq, Tk, FLOP per byte moved and TFLOP/s."""
    out = []
    for r in payload["rows"]:
        tflops, gbs = r.get("tflops"), r.get("gbs")
        if is_rate(tflops) and is_rate(gbs):
            batch = r["shape"].split(" x ")[0] if r["mode"] == "decode" else None
            out.append({"group": f"{r['op']} {r['mode']}" + (f" B={batch}" if batch else ""), "tk": r["tk"],
                        "intensity": tflops * 1e3 / gbs, "tflops": tflops})
    return out


def load(path: Path) -> dict:
    """The payload of `bench kernels --json`: rows (each with op, mode, tk and shape) and ceilings."""
    if not path.exists():
        raise UserError(f"{path}: no such file; write one with `python -m ic_jax.bench kernels --json {path}`")
    try:
        payload = json.loads(read_text(path, f"kernels JSON {path}"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e.msg}, line {e.lineno}); give the file of `bench kernels --json`")
    rows = payload.get("rows") if isinstance(payload, dict) else None
    if not isinstance(rows, list) or not isinstance(payload.get("ceilings"), dict):
        raise UserError(f"{path}: no rows and ceilings; give the file of `python -m ic_jax.bench kernels --json`")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("shape"), str) or not is_rate(r.get("tk")) \
                or not {"op", "mode"} <= r.keys():
            raise UserError(f"{path}: row {i} lacks op, mode, tk or shape; give the file of `bench kernels --json`")
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
    ceil = payload["ceilings"]
    if not (is_rate(ceil.get("matmul_flops")) and is_rate(ceil.get("copy_bytes_s"))):
        raise UserError(f"{a.json}: its ceilings lack matmul_flops or copy_bytes_s; give the file of "
                        f"`bench kernels --json`")
    out = a.out or a.json.with_suffix(".png")
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the plot is a PNG; give a path ending in .png")
    check_output_file(out, "--out")
    from ic_jax.calibration import plots  # matplotlib only here

    gathers = sorted({round(r["gather_tbs"], 2) for r in payload["rows"] if is_rate(r.get("gather_tbs"))})
    plots.roofline(pts, ceil["matmul_flops"] / 1e12, ceil["copy_bytes_s"] / 1e12, gathers[:1] + gathers[-1:], out,
                   f"{payload.get('device', '?')}, jax {payload.get('jax', '?')}, {payload.get('date', '?')}")
    print(f"wrote {out}: {len(pts)} points")
    return 0


main = entry(main)
