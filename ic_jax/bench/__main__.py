"""python -m ic_jax.bench COMMAND [flags]: kernels (per-op speed against measured ceilings and XLA), e2e
(end-to-end prefill and decode per IndexCache pattern), step (a decode step or a prefill chunk at a long random
cache, with a kernel profile), grouped-matmul (the MoE kernels), sweep (kernel tuning variants), roofline (the
kernels JSON as a plot) or throughput (saturated decode, the device full of requests). `python -m ic_jax.bench
COMMAND --help` for flags."""

from __future__ import annotations

import importlib
import sys

from ic_jax.cli import ArgumentParser

COMMANDS = {"kernels": "ic_jax.bench.kernels", "e2e": "ic_jax.bench.e2e", "step": "ic_jax.bench.step",
            "grouped-matmul": "ic_jax.bench.grouped_matmul", "sweep": "ic_jax.bench.sweep",
            "roofline": "ic_jax.bench.roofline", "throughput": "ic_jax.bench.throughput"}
HELP = {
    "kernels": "time the Pallas kernels (indexer logits, top-k, sparse MLA) at the 30B shapes, beside XLA",
    "e2e": "time chunked prefill and decode of a whole model for several IndexCache patterns",
    "step": "time a decode step or a prefill chunk at a long context (random cache); --profile: where time goes",
    "grouped-matmul": "time the MoE grouped and gathered matmuls (Pallas variants) against XLA on the 30B shapes",
    "sweep": "time tuning variants (blocks, warps, stages) of the Pallas GPU kernels, to pick defaults",
    "roofline": "draw the JSON of `kernels --json` as a roofline plot (no GPU needed)",
    "throughput": "total decode tok/s per pattern with as many long requests as fit, prefilled into slots one by one",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = ArgumentParser(prog="python -m ic_jax.bench", description=__doc__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in HELP.items():
        sub.add_parser(name, help=text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        p.parse_args(argv[:1] or ["--help"])
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
