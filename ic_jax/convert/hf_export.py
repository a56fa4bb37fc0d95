"""ic_jax checkpoint -> Hugging Face folder in the source architecture's layout, with an IndexCache pattern.

The pattern goes into config.json as `indexer_types` and `index_topk_pattern` (the frequency keys are dropped,
they would contradict it) and the S layers ship no indexer tensors, as GLM-5.2 does, so vLLM and SGLang build
no indexer there. Weights are written unquantized, each in its dtype in the checkpoint (the router stays fp32).

The architecture: the one a converted checkpoint came from (its meta.json), else the one whose code fixes the
indexer RoPE the way the config does (DeepSeek-V3.2: non-interleaved, GLM-5: interleaved); both run MLA with
interleaved RoPE, so a model trained without it is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ic_jax.errors import UserError
from ic_jax.files import atomic_write_text, claim_output_dir, new_temp_dir, publish_dir
from ic_jax.model.config import ModelConfig
from ic_jax.model.pattern import parse_pattern
from ic_jax.runtime.checkpoint import (
    default_pattern,
    read_config,
    read_meta,
    read_params,
)
from ic_jax.runtime.hf.config import ARCHITECTURES
from ic_jax.runtime.hf.names import get_path, layer_tensors, top_tensors
from ic_jax.runtime.hf.safetensors_io import write_shards

SHARD_BYTES = 5 * 2**30  # as Hugging Face's save_pretrained default
MODEL_TYPES = {"DeepseekV32ForCausalLM": "deepseek_v32", "GlmMoeDsaForCausalLM": "glm_moe_dsa"}
IC_ONLY = ("indexer_rope_interleave", "indexer_hadamard", "indexer_fp8", "scale_fmt", "rope_interleave", "dtype")
SCHEDULE_KEYS = ("indexer_types", "index_topk_pattern", "index_topk_freq", "index_skip_topk_offset")


def export(ckpt: Path, out: Path, pattern: str | None = None, overwrite: bool = False) -> tuple[str, str]:
    """Writes the Hugging Face folder; returns (architecture, pattern)."""
    ckpt = Path(ckpt)
    cfg, meta = read_config(ckpt), read_meta(ckpt)
    arch = architecture(cfg, meta, ckpt)
    pattern = parse_pattern(pattern if pattern is not None else default_pattern(ckpt), cfg.num_hidden_layers)
    top, layers = read_params(ckpt, cfg)
    for i, c in enumerate(pattern):
        if c == "F" and "indexer" not in layers[i]:
            raise UserError(f"layer {i} is F in the pattern but checkpoint {ckpt} has no indexer weights for it; "
                            f"choose a pattern with S there")
    out = claim_output_dir(out, "--out", overwrite=overwrite).absolute()
    tensors = hf_tensors(cfg, pattern, top, layers)
    tmp = new_temp_dir(out)
    try:
        write_shards(tmp, tensors, SHARD_BYTES)
        atomic_write_text(tmp / "config.json", json.dumps(hf_config(cfg, meta, arch, pattern), indent=2))
        if (ckpt / "tokenizer.json").is_file():
            shutil.copyfile(ckpt / "tokenizer.json", tmp / "tokenizer.json")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return arch, pattern


def architecture(cfg: ModelConfig, meta: dict, ckpt: Path) -> str:
    if meta.get("architecture") in ARCHITECTURES:
        return meta["architecture"]
    if not cfg.rope_interleave:
        raise UserError(f"checkpoint {ckpt} runs MLA with non-interleaved RoPE, which neither "
                        f"{' nor '.join(ARCHITECTURES)} does; it cannot be exported")
    return next(a for a, fixed in ARCHITECTURES.items()
                if fixed["indexer_rope_interleave"] == cfg.indexer_rope_interleave)


def hf_tensors(cfg: ModelConfig, pattern: str, top: dict, layers: list[dict]) -> dict[str, np.ndarray]:
    """Upstream name -> array (views of the checkpoint's arrays), S layers without their indexer."""
    out = {t.name: t.to_hf(np.asarray(get_path(top, t.path))) for t in top_tensors(cfg)}
    for i, c in enumerate(pattern):
        for t in layer_tensors(cfg, i, c == "F"):
            out[t.name] = t.to_hf(np.asarray(get_path(layers[i], t.path)))
    return out


def hf_config(cfg: ModelConfig, meta: dict, arch: str, pattern: str) -> dict:
    """The source's config.json when the checkpoint was converted (else one made from `cfg`), unquantized, without
    its MTP layer and with `pattern` as the schedule."""
    d = dict(meta.get("hf_config") or {})
    if not d:
        d = {k: v for k, v in cfg.to_dict().items() if k not in IC_ONLY}
        d.update(architectures=[arch], model_type=MODEL_TYPES[arch])
    for key in SCHEDULE_KEYS + ("quantization_config",):
        d.pop(key, None)
    d["dtype" if "dtype" in d else "torch_dtype"] = cfg.dtype
    if "num_nextn_predict_layers" in d:
        d["num_nextn_predict_layers"] = 0  # the MTP layer is not exported
    d["indexer_types"] = ["full" if c == "F" else "shared" for c in pattern]
    d["index_topk_pattern"] = pattern
    return d
