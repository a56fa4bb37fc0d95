"""python -m ic_jax.convert (see `__main__.py`): Hugging Face checkpoints in and out.

  hf_import  a Hugging Face folder -> the files of an ic_jax checkpoint, resumable through a work folder
  hf_export  an ic_jax checkpoint -> a Hugging Face folder with an IndexCache pattern
The reading of Hugging Face folders (safetensors, FP8, config, names) is `ic_jax.runtime.hf`.
"""
