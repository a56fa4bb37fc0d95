"""Hugging Face checkpoints in and out: DeepSeek-V3.2 (`DeepseekV32ForCausalLM`) and GLM-5 / GLM-5.2
(`GlmMoeDsaForCausalLM`), FP8 block-quantized or not.

  safetensors_io  lazy reading of safetensors shards (one tensor in memory at a time), and writing
  fp8             e4m3 weights times their 128 x 128 block scales, edge blocks included
  hf_config       config.json -> ModelConfig, the IndexCache schedule, the quantization
  names           upstream tensor names <-> ic_jax's per-layer parameter tree
  hf_import       the conversion itself, resumable through per-layer files in a work folder
The command is `python -m ic_jax.convert` (see `__main__.py`).
"""
