"""The command-line layer every `python -m ic_jax.<command>` shares: one-line errors with exit code 2, flag types
that name their flag, one size parser, UTF-8 input reading and the flags that mean the same in every command."""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys

from ic_jax.errors import UserError
from ic_jax.ops.dispatch import MODEL_IMPLS

IMPL_HELP = ("op implementation: auto = Pallas kernels on GPU/TPU (XLA for decode-sized calls where it measured "
             "faster), XLA on CPU; xla = the jnp references; pallas = always the kernels (interpret mode on CPU, slow)")
SIZE_HELP = "k = 1000, Ki = 1024, M = 10^6, Mi = 2^20"
MAX_SEED = 2**31 - 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (usage stays available through --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def entry(main):
    """Wraps a `main(argv) -> int` so that bad input ends the process with one line and exit code 2: a UserError,
    and the device running out of memory (the message names what to lower). argparse's exits (bad flags, --help)
    become return values too, so `main` always returns the exit code."""

    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except SystemExit as e:
            return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - only the out-of-memory kind is caught, the rest re-raised
            if "RESOURCE_EXHAUSTED" not in str(e) and not isinstance(e, MemoryError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: out of memory ({first[:200]}); lower --batch, --seq-len, --chunk-size or the context, "
                  f"or use more devices", file=sys.stderr)
        return 2

    return wrapped


# ----------------------------------------------------------------------------------------------------------
# flag types: argparse reports their ArgumentTypeError as "argument --flag: <message>"


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def nonneg_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def seed(text: str) -> int:
    v = _int(text)
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_SEED}, got {v}")
    return v


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def positive_float(text: str) -> float:
    v = _float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v:g}")
    return v


def nonneg_float(text: str) -> float:
    v = _float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v:g}")
    return v


def fraction(low_open: bool = False, high_open: bool = False):
    """A number in [0, 1], with either end open."""

    def parse(text: str) -> float:
        v = _float(text)
        if v < 0 or v > 1 or (low_open and v == 0) or (high_open and v == 1):
            interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {v:g}")
        return v

    return parse


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)(k|ki|m|mi)?$")
_UNITS = {None: 1, "k": 1000, "ki": 1024, "m": 10**6, "mi": 2**20}


def parse_size(text: str) -> int:
    """'200k' -> 200000, '128Ki' -> 131072, '1.5M' -> 1500000, '4096' -> 4096; at least 1."""
    m = _SIZE.match(text.strip().lower())
    value = float(m.group(1)) * _UNITS[m.group(2)] if m else 0
    if not m or value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write a whole number of tokens like 4096, "
                                         f"200k or 128Ki ({SIZE_HELP})")
    return int(value)


def size_list(text: str) -> list[int]:
    """A comma-separated list of sizes, like '10k,60k,200k'."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more sizes like 10k,60k,200k ({SIZE_HELP})")
    return [parse_size(p) for p in parts]


# ----------------------------------------------------------------------------------------------------------
# shared flags


def add_impl_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--impl", choices=MODEL_IMPLS, default="auto", help=IMPL_HELP + " (default auto)")


def add_seed_argument(p: argparse.ArgumentParser, default: int = 0, what: str = "random init and sampling") -> None:
    p.add_argument("--seed", type=seed, default=default, help=f"seed for {what} (default {default})")


def add_mesh_arguments(p: argparse.ArgumentParser) -> None:
    """The parallelism flags of every command that runs a model; `runtime.sharding.mesh_from_args` reads them."""
    par = p.add_argument_group("parallelism")
    par.add_argument("--mesh", default="", help="device mesh as axis=size over data,tensor,expert (e.g. "
                     "data=2,tensor=4); params are sharded by their logical axes. Default: no sharding")
    add_expert_parallel_data_argument(par)
    par.add_argument("--distributed", action="store_true",
                     help="multi-host: join a job first (one process per host; only process 0 prints)")
    par.add_argument("--coordinator", help="with --distributed: HOST:PORT of process 0 (default: "
                                          "JAX_COORDINATOR_ADDRESS, or detected under SLURM / on a TPU pod)")
    par.add_argument("--num-processes", type=positive_int, help="with --distributed: processes in the job")
    par.add_argument("--process-id", type=nonneg_int, help="with --distributed: this process's rank")


def add_expert_parallel_data_argument(p) -> None:
    """--expert-parallel-data, with --mesh: `runtime.sharding.make_mesh(expert_parallel_data=...)` reads it."""
    p.add_argument("--expert-parallel-data", action="store_true",
                   help="split the routed experts over the data axis of --mesh too, so that each device holds "
                        "1/(data x expert) of them instead of a whole copy per data shard (SGLang's data-parallel "
                        "attention with expert-parallel MoE; vLLM's --enable-expert-parallel beside "
                        "--data-parallel-size): attention stays data-parallel, and each MoE layer gathers the tokens "
                        "of its data shards, runs its own experts and scatters the sums back. Frees the experts' "
                        "memory for more cache slots (jobs, bench throughput) or longer contexts, for two collectives "
                        "per MoE layer; needs --mesh data=N with N > 1")
