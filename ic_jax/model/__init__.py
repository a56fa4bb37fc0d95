"""The DSA model and its building blocks: the config, the F/S pattern and its scanned stages, the layers (norms,
RoPE, FFN, MoE), MLA with the lightning indexer, the run options, and `dsa.DSAModel` that stacks them."""
