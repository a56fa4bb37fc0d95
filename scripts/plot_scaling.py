"""Scaling over GPUs, from `bench throughput` and `bench e2e` JSONs (one run per device count and layout): the
saturated decode throughput and the batch-1 prefill time against the number of GPUs, one line per pattern and
layout (data-parallel, or with the experts over data too). A one-GPU run starts every line of its pattern.

    python scripts/plot_scaling.py results/scaling_200k_h200 results/h200x4_throughput_200k_*.json \
        results/h200x4_e2e_200k_*.json

writes results/scaling_200k_h200_throughput.png and results/scaling_200k_h200_prefill.png.
"""

import json
import sys
from pathlib import Path

from ic_jax.calibration.plots import curves


def name(row: dict, layers: int) -> str:
    return "all F" if row["indexers"] == layers else row["pattern"][:4]


def layout(run: dict) -> str:
    """The JSON's mesh names the size-1 axis "expert_parallel_data" when the experts split over data too."""
    return "experts over data" if "expert_parallel_data" in (run["mesh"] or {}) else "data-parallel"


def points(runs: list[dict], value: str) -> dict[str, dict[int, float]]:
    """{pattern, layout: {GPUs: value}}; one-GPU values go to every layout of their pattern."""
    by_line: dict[str, dict[int, float]] = {}
    ones: dict[str, float] = {}
    for run in runs:
        for row in run["rows"]:
            if run["devices"] == 1:
                ones[name(row, run["layers"])] = row[value]
            else:
                by_line.setdefault(f"{name(row, run['layers'])}, {layout(run)}", {})[run["devices"]] = row[value]
    for line, values in by_line.items():
        one = ones.get(line.split(",")[0])
        if one is not None:
            values[1] = one
    return by_line


def series(lines: dict[str, dict[int, float]]) -> dict[str, tuple[list, list]]:
    return {line: (sorted(v), [v[n] for n in sorted(v)]) for line, v in sorted(lines.items())}


def main(prefix: str, *files: str) -> None:
    runs = [json.loads(Path(f).read_text()) for f in files]
    device, context = runs[0]["device"], runs[0]["rows"][0]["context"]
    throughput = points([r for r in runs if "slots" in r["rows"][0]], "decode_tok_s")
    prefill = points([r for r in runs if "prefill_s" in r["rows"][0]], "prefill_s")
    if throughput:
        curves(series(throughput), Path(f"{prefix}_throughput.png"),
               f"saturated decode, {context} tokens per request, {device}", "GPUs", "total decode tok/s")
    if prefill:
        curves(series(prefill), Path(f"{prefix}_prefill.png"), f"prefill of one {context}-token prompt, {device}",
               "GPUs", "prefill s", logy=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
