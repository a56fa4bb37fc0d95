"""Checking that a compiled program fits the device's free memory before it runs: work too large ends with one
line naming the memory needed and free, instead of an allocator crash or the operating system's OOM killer."""

from __future__ import annotations

from pathlib import Path

import jax

from ic_jax.errors import UserError

GIB = 2**30


def free_bytes(device: jax.Device) -> int | None:
    """Bytes the device can still allocate: the allocator's limit on GPU/TPU, MemAvailable on a Linux CPU."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    meminfo = Path("/proc/meminfo")
    if device.platform == "cpu" and meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def needed_bytes(compiled) -> int:
    """Peak bytes of one call of a compiled program: its arguments, outputs and temporaries (donated outputs
    reuse their arguments' buffers)."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def compile_within_memory(fn, args: tuple, what: str, fix: str):
    """`fn` (a jax.jit function) compiled for `args`, after checking its peak memory against what is free.
    Arguments already on the device count as free there, since they are part of what the call needs."""
    compiled = fn.lower(*args).compile()
    device = jax.devices()[0]
    free = free_bytes(device)
    if free is not None:
        resident = sum(x.nbytes for x in jax.tree.leaves(args) if isinstance(x, jax.Array))
        need = needed_bytes(compiled)
        if need > free + resident:
            raise UserError(f"{what} needs {need / GIB:.1f} GiB of memory but {(free + resident) / GIB:.1f} GiB "
                            f"is free on {device.platform}; {fix}")
    return compiled
