"""One eval metric (default: held-out loss) against the number of F layers, one line per pattern family,
from an `ic_jax.eval` JSON as scripts/experiment.sh writes it (labels: keep:X = uniform, @...search... =
searched, distill_* = distilled).

    python scripts/plot_eval.py results/eval.json results/eval_by_retention.png [retrieval@1024 | retrieval | answer_nll]

"retrieval" and "answer_nll" are the means over the evaluated lengths.
"""

import json
import sys
from pathlib import Path

from ic_jax.calibration.plots import curves


def family(label: str) -> str:
    return "distilled uniform" if "distill" in label else "searched" if label.startswith("@") else "uniform"


LABELS = {"loss": "held-out LM loss (nats/byte)", "retrieval": "retrieval accuracy, mean over lengths",
          "answer_nll": "answer-digit loss (nats), mean over lengths"}


def value(row: dict, metric: str) -> float:
    if metric in ("retrieval", "answer_nll"):
        vals = [v for k, v in row.items() if k.startswith(metric + "@")]
        return sum(vals) / len(vals)
    return row[metric]


def main(src: str, dst: str, metric: str = "loss") -> None:
    rows = json.loads(Path(src).read_text())["rows"]
    n = max(r["indexers"] for r in rows)
    full = next(value(r, metric) for r in rows if r["indexers"] == n)
    series: dict[str, tuple[list, list]] = {}
    for r in sorted(rows, key=lambda r: -r["indexers"]):
        if r["indexers"] < n:
            x, y = series.setdefault(family(r["label"]), ([n], [full]))
            x.append(r["indexers"])
            y.append(value(r, metric))
    curves(series, Path(dst), f"{metric} by number of indexers ({n} layers)", f"F layers (of {n})",
           LABELS.get(metric, metric), hline=full)


if __name__ == "__main__":
    main(*sys.argv[1:4])
