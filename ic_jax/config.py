"""Model configuration, read from Hugging Face style JSON (the key names of DeepSeek-V3.2 / GLM-5)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from ic_jax.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    intermediate_size: int
    first_k_dense_replace: int
    routed_scaling_factor: float
    vocab_size: int
    max_position_embeddings: int
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    indexer_rope_interleave: bool = False
    indexer_hadamard: bool = True
    # score keys for top-k selection with FP8 indexer logits (e4m3 q and k, a scale per vector; the Hopper
    # kernel); the indexer's KL loss keeps bf16 logits, since the rounding has no gradient
    indexer_fp8: bool = False
    rope_interleave: bool = True
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # sorted (key, value) pairs: the config must stay hashable
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        problems = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (not isinstance(v, int) or v < 0):
                problems.append(f"{f.name} must be a non-negative integer, got {v!r}")
            if f.type == "bool" and not isinstance(v, bool):
                problems.append(f"{f.name} must be true or false, got {v!r}")
        if self.num_hidden_layers < 1:
            problems.append("num_hidden_layers must be >= 1")
        if self.first_k_dense_replace > self.num_hidden_layers:
            problems.append("first_k_dense_replace exceeds num_hidden_layers")
        if self.n_routed_experts and self.n_routed_experts % max(self.n_group, 1):
            problems.append("n_routed_experts must be divisible by n_group")
        if self.topk_group > self.n_group:
            problems.append("topk_group must be <= n_group")
        if self.num_experts_per_tok > self.n_routed_experts:
            problems.append("num_experts_per_tok must be <= n_routed_experts")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.index_head_dim:
            problems.append("qk_rope_head_dim must be even and <= index_head_dim")
        if self.indexer_hadamard and self.index_head_dim & (self.index_head_dim - 1):
            problems.append("indexer_hadamard needs a power-of-two index_head_dim")
        if self.dtype not in ("bfloat16", "float32"):
            problems.append(f"dtype must be bfloat16 or float32, got {self.dtype!r}")
        if problems:
            raise UserError("bad model config: " + "; ".join(problems))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """MLA softmax scale, with the YaRN mscale correction when rope scaling is on."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling_dict
        if rs.get("type", rs.get("rope_type")) == "yarn" and rs.get("mscale_all_dim"):
            m = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1.0
            scale *= m * m
        return scale

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling or ())

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and self.n_routed_experts > 0

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = self.rope_scaling_dict or None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise UserError(f"{source}: missing keys {', '.join(missing)}; see configs/tiny.json for a complete example")
        return cls(**{k: v for k, v in d.items() if k in names})


def load_config(path_or_name: str | Path) -> ModelConfig:
    """Loads a config JSON by path, or a preset by name (`tiny`, `glm47_flash_dsa`, ...)."""
    p = Path(path_or_name)
    if not p.exists() and (CONFIG_DIR / f"{path_or_name}.json").exists():
        p = CONFIG_DIR / f"{path_or_name}.json"
    if not p.is_file():
        presets = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.json")))
        raise UserError(f"config {str(path_or_name)!r} not found; pass a JSON file or a preset ({presets})")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"config {p} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    return ModelConfig.from_dict(d, source=str(p))
