"""ic_jax: IndexCache for DeepSeek Sparse Attention in JAX."""
