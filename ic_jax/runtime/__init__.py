"""Running a model: checkpoints, the prefill/decode engine, sampling, tokenizers, sharding over a mesh, and the
memory check made before a program runs."""
