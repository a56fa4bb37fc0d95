"""Benchmarks: `python -m ic_jax.bench {kernels,e2e,grouped-matmul,sweep,roofline}` (see `__main__`)."""
