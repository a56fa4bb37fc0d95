"""Benchmarks: `python -m ic_jax.bench {kernels,e2e}`."""
