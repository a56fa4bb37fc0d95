"""A Hugging Face config.json -> `ModelConfig`, the IndexCache schedule it declares and its FP8 quantization.

Both spellings are read: the releases' `rope_theta` + `rope_scaling` (with `type` or `rope_type`) and
`torch_dtype`, and transformers' `rope_parameters` (rope_theta inside) and `dtype`; transformers' `head_dim`
(= qk_rope_head_dim) is not a field here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ic_jax.errors import UserError
from ic_jax.files import read_text
from ic_jax.model.config import ModelConfig
from ic_jax.model.pattern import PatternError, check_pattern, freq_pattern

# per architecture: the ModelConfig fields its code fixes rather than its config.json
ARCHITECTURES = {
    "DeepseekV32ForCausalLM": {"indexer_rope_interleave": False},  # DeepSeek's reference since 2025-11-17
    "GlmMoeDsaForCausalLM": {"indexer_rope_interleave": True},
}
DEFAULT_SKIP_OFFSET = 2  # vLLM's index_skip_topk_offset default


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    cfg: ModelConfig
    architecture: str
    pattern: str | None  # the schedule config.json declares (F/S per layer), None when it declares none
    block: tuple[int, int] | None  # FP8 weight block, None when not quantized
    raw: dict  # config.json as read (export writes it back with the pattern)


def is_hf_folder(folder: Path) -> bool:
    """A Hugging Face model folder: its config.json names `architectures` (an ic_jax checkpoint's does not)."""
    try:
        d = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "architectures" in d


def read_hf_config(folder: Path, dtype: str | None = None) -> HFCheckpoint:
    path = Path(folder) / "config.json"
    try:
        d = json.loads(read_text(path, f"Hugging Face config {path}"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: the top level must be a JSON object")
    archs = d.get("architectures") or []
    known = [a for a in archs if a in ARCHITECTURES]
    if not known:
        raise UserError(f"{path}: architecture {', '.join(map(str, archs)) or '(none)'} is not supported; "
                        f"convert one of {', '.join(ARCHITECTURES)}")
    arch = known[0]
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    kw = {k: v for k, v in d.items() if k in fields and k not in ("rope_theta", "rope_scaling", "dtype")}
    kw.update(ARCHITECTURES[arch])
    for key in ARCHITECTURES[arch]:  # a config that states it wins over the architecture's default
        if key in d:
            kw[key] = d[key]
    kw["rope_theta"], kw["rope_scaling"] = rope_settings(d, path)
    kw["dtype"] = dtype or checkpoint_dtype(d)
    kw["scale_fmt"] = (d.get("quantization_config") or {}).get("scale_fmt")
    kw.setdefault("n_shared_experts", 0)
    cfg = ModelConfig.from_dict(kw, source=str(path))
    return HFCheckpoint(cfg, arch, schedule(d, cfg.num_hidden_layers, path), quant_block(d, path), d)


def rope_settings(d: dict, path: Path) -> tuple[float, dict | None]:
    params = d.get("rope_parameters")
    if isinstance(params, dict):  # transformers: {"rope_type": ..., "rope_theta": ..., scaling keys}
        rs = {k: v for k, v in params.items() if k != "rope_theta"}
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    else:
        rs, theta = d.get("rope_scaling"), d.get("rope_theta", 10000.0)
    if isinstance(rs, dict) and rs.get("type", rs.get("rope_type")) == "default":
        rs = None
    return theta, rs


def checkpoint_dtype(d: dict) -> str:
    """The compute dtype: float32 for an fp32 checkpoint, else bfloat16 (FP8 and fp16 checkpoints too)."""
    return "float32" if d.get("dtype", d.get("torch_dtype")) == "float32" else "bfloat16"


def quant_block(d: dict, path: Path) -> tuple[int, int] | None:
    q = d.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise UserError(f"{path}: quantization_config {q.get('quant_method')}/{q.get('fmt')} is not supported; "
                        f"only fp8 e4m3 block quantization is")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise UserError(f"{path}: quantization_config.weight_block_size must be two positive integers, got {block}")
    return tuple(block)


def schedule(d: dict, num_layers: int, path: Path) -> str | None:
    """The pattern the config declares: `indexer_types` (GLM-5.2, transformers), else `index_topk_pattern`, else
    `index_topk_freq` with `index_skip_topk_offset` (default 2, as vLLM); None when none is given."""
    try:
        if d.get("indexer_types") is not None:
            types = d["indexer_types"]
            bad = [t for t in types if t not in ("full", "shared")] if isinstance(types, list) else [types]
            if bad:
                raise PatternError(f"indexer_types must be a list of \"full\" / \"shared\", got {bad[0]!r}")
            return check_pattern("".join("F" if t == "full" else "S" for t in types), num_layers)
        if d.get("index_topk_pattern") is not None:
            pattern = d["index_topk_pattern"]
            return check_pattern(pattern if isinstance(pattern, str) else "".join(pattern), num_layers)
        if d.get("index_topk_freq") is not None:
            freq, offset = d["index_topk_freq"], d.get("index_skip_topk_offset", DEFAULT_SKIP_OFFSET)
            if not all(isinstance(v, int) and v >= 1 for v in (freq, offset)):
                raise PatternError(f"index_topk_freq ({freq}) and index_skip_topk_offset ({offset}) must be "
                                   f"integers >= 1")
            return check_pattern(freq_pattern(num_layers, freq, offset), num_layers)
    except PatternError as e:
        raise UserError(f"{path}: {e}") from None
    return None
