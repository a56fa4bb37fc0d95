"""Hugging Face checkpoints: DeepSeek-V3.2 (`DeepseekV32ForCausalLM`) and GLM-5 / GLM-5.2 (`GlmMoeDsaForCausalLM`),
FP8 block-quantized or not, read lazily (the commands that convert them live in `ic_jax.convert`).

  safetensors_io  shards read with the `safetensors` package, one tensor in memory at a time; and written
  fp8             e4m3 weights times their 128 x 128 block scales, edge blocks included
  config          config.json -> ModelConfig, the IndexCache schedule, the quantization
  names           upstream tensor names <-> ic_jax's per-layer parameter tree
  reading         the checks before any tensor is read, and the reading itself, tensor by tensor
  device          a folder straight into (sharded) device memory, for generate --ckpt HF_DIR
"""
