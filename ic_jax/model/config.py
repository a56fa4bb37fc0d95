"""Model configuration, read from Hugging Face style JSON (the key names of DeepSeek-V3.2 / GLM-5)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from ic_jax.errors import UserError
from ic_jax.files import read_text
from ic_jax.package_data import CONFIG_DIR, shipped_path

# integer keys that may be 0; every other integer key must be >= 1
MAY_BE_ZERO = {
    "qk_nope_head_dim",  # scores from the RoPE part alone
    "n_routed_experts",  # no MoE layers
    "n_shared_experts",
    "first_k_dense_replace",
    "num_experts_per_tok", "moe_intermediate_size",  # >= 1 when the model has MoE layers (moe_problems)
    "intermediate_size",  # >= 1 when it has dense layers (relation_problems)
}
MAX_INT = 2**31 - 1  # positions and indices are int32 in the model
# the rope_scaling types that rope_inv_freq and softmax_scale implement, with their keys (True: required)
ROPE_SCALING_KEYS = {
    "default": {},  # no scaling, as null
    "yarn": {"factor": True, "original_max_position_embeddings": True, "mscale": True, "mscale_all_dim": True,
             "beta_fast": False, "beta_slow": False},
}


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
    # the FP8 scales: None = amax / 448 exactly, "ue8m0" = rounded up to a power of two (DeepSeek's configs,
    # quantization_config.scale_fmt; its reference quantizes the indexer's activations so too)
    scale_fmt: str | None = None
    rope_interleave: bool = True
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # sorted (key, value) pairs: the config must stay hashable
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False  # only false: the model keeps an lm_head apart from the embedding
    dtype: str = "bfloat16"

    def __post_init__(self):
        rs = self.rope_scaling
        if isinstance(rs, tuple):  # a config's own form, passed back by replace()
            rs = dict(rs)
        problems = field_problems(self) + rope_scaling_problems(rs)
        if not problems:  # the relations need every value well typed
            problems = relation_problems(self)
        if problems:
            raise UserError("bad model config: " + "; ".join(problems))
        if isinstance(rs, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(rs.items())))

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

    @property
    def has_moe_layers(self) -> bool:
        return self.is_moe(self.num_hidden_layers - 1)

    @property
    def has_dense_layers(self) -> bool:
        return not self.is_moe(0)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def first_layers(self, n: int) -> "ModelConfig":
        """The model's first n layers (a quick check, or a model too large for the devices at hand measured on
        fewer layers): its leading dense layers stay dense."""
        return self.replace(num_hidden_layers=n, first_k_dense_replace=min(self.first_k_dense_replace, n))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = self.rope_scaling_dict or None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        """The config in `d` (a parsed JSON file); errors name `source`. Keys that are not fields (model_type,
        architectures, ...) are ignored."""
        if not isinstance(d, dict):
            raise UserError(f"{source}: the top level must be a JSON object {{...}}, got {json_type(d)}; "
                            f"see ic_jax/configs/tiny.json")
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise UserError(f"{source}: missing keys {', '.join(missing)}; "
                            f"see ic_jax/configs/tiny.json for a complete example")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except UserError as e:
            raise UserError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# validation: each function returns its problems as short phrases naming the key, what it must be and the value


def json_type(v) -> str:
    """The JSON name of a parsed value's type."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def shown(v) -> str:
    """A value as the JSON file spells it (null, true, "abc"), cut short."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):  # not a JSON value: set from Python through replace()
        text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_number(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int past the float range
        return False


def int_problem(name: str, v, low: int) -> list[str]:
    if not is_int(v) or v < low:
        return [f"{name} must be an integer >= {low}, got {shown(v)}"]
    if v > MAX_INT:
        return [f"{name} must be at most 2^31-1, got {shown(v)}"]
    return []


def number_problem(name: str, v, low: float, low_included: bool = False) -> list[str]:
    if not is_finite_number(v) or v < low or (v == low and not low_included):
        return [f"{name} must be a finite number {'>=' if low_included else '>'} {low:g}, got {shown(v)}"]
    return []


def field_problems(cfg: ModelConfig) -> list[str]:
    """Each field on its own: its type and range."""
    problems = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.type == "int":
            problems += int_problem(f.name, v, 0 if f.name in MAY_BE_ZERO else 1)
        elif f.type == "bool" and not isinstance(v, bool):
            problems.append(f"{f.name} must be true or false, got {shown(v)}")
    # rope_theta is the base of the wavelengths: at or below 1 they no longer grow along the dimensions
    problems += number_problem("rope_theta", cfg.rope_theta, 1)
    problems += number_problem("rms_norm_eps", cfg.rms_norm_eps, 0)
    problems += number_problem("routed_scaling_factor", cfg.routed_scaling_factor, 0)
    if cfg.tie_word_embeddings is True:
        problems.append("tie_word_embeddings must be false: the model keeps an lm_head apart from the embedding")
    if cfg.dtype not in ("bfloat16", "float32"):
        problems.append(f"dtype must be bfloat16 or float32, got {shown(cfg.dtype)}")
    if cfg.scale_fmt not in (None, "ue8m0"):
        problems.append(f"scale_fmt must be null or \"ue8m0\", got {shown(cfg.scale_fmt)}")
    return problems


def rope_scaling_problems(rs) -> list[str]:
    """rope_scaling: null, or an object of a type that `rope_inv_freq` implements with that type's keys."""
    types = " or ".join(ROPE_SCALING_KEYS)
    if rs is None:
        return []
    if not isinstance(rs, dict):
        return [f"rope_scaling must be null or an object with a type ({types}), got {shown(rs)}"]
    if "type" in rs and "rope_type" in rs and rs["type"] != rs["rope_type"]:
        return [f"rope_scaling has type {shown(rs['type'])} and rope_type {shown(rs['rope_type'])}; keep one"]
    kind = rs.get("type", rs.get("rope_type"))
    if kind not in ROPE_SCALING_KEYS:
        return [f"rope_scaling.type must be {types} (or rope_scaling null for none), got {shown(kind)}"]
    keys = ROPE_SCALING_KEYS[kind]
    problems = [f"rope_scaling ({kind}) needs the key {k}" for k, needed in keys.items() if needed and k not in rs]
    unknown = sorted(str(k) for k in rs if k not in keys and k not in ("type", "rope_type"))
    if unknown:
        problems.append(f"rope_scaling ({kind}) has keys this model does not implement: {', '.join(unknown)}")
    if kind == "yarn":
        problems += yarn_problems(rs)
    return problems


def yarn_problems(rs: dict) -> list[str]:
    problems = []
    if "factor" in rs:
        problems += number_problem("rope_scaling.factor", rs["factor"], 1, low_included=True)
    if "original_max_position_embeddings" in rs:
        problems += int_problem("rope_scaling.original_max_position_embeddings",
                                rs["original_max_position_embeddings"], 1)
    for k in ("beta_fast", "beta_slow"):
        if k in rs:
            problems += number_problem(f"rope_scaling.{k}", rs[k], 0)
    for k in ("mscale", "mscale_all_dim"):
        if k in rs:
            problems += number_problem(f"rope_scaling.{k}", rs[k], 0)
    # Hugging Face also scales cos and sin, by yarn_mscale(mscale) / yarn_mscale(mscale_all_dim) (with its own
    # defaults for absent keys); only the ratio 1 is implemented, as in DeepSeek's reference code
    if not problems and "mscale" in rs and "mscale_all_dim" in rs and rs["mscale"] != rs["mscale_all_dim"]:
        problems.append(f"rope_scaling.mscale ({rs['mscale']}) must equal rope_scaling.mscale_all_dim "
                        f"({rs['mscale_all_dim']}): scaling cos and sin is not implemented")
    return problems


def relation_problems(cfg: ModelConfig) -> list[str]:
    """What the fields must satisfy together, for the layers the model has."""
    problems = []
    if cfg.first_k_dense_replace > cfg.num_hidden_layers:
        problems.append(f"first_k_dense_replace ({cfg.first_k_dense_replace}) exceeds num_hidden_layers "
                        f"({cfg.num_hidden_layers})")
    if cfg.has_dense_layers and cfg.intermediate_size < 1:
        problems.append("intermediate_size must be >= 1: the model has dense layers")
    problems += moe_problems(cfg)
    if cfg.qk_rope_head_dim % 2 or cfg.qk_rope_head_dim > cfg.index_head_dim:
        problems.append(f"qk_rope_head_dim ({cfg.qk_rope_head_dim}) must be even and <= index_head_dim "
                        f"({cfg.index_head_dim})")
    if cfg.indexer_hadamard and cfg.index_head_dim & (cfg.index_head_dim - 1):
        problems.append(f"indexer_hadamard needs a power-of-two index_head_dim, got {cfg.index_head_dim}")
    return problems


def moe_problems(cfg: ModelConfig) -> list[str]:
    E, G, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    problems = []
    if E % G:
        problems.append(f"n_routed_experts ({E}) must be divisible by n_group ({G})")
    if cfg.topk_group > G:
        problems.append(f"topk_group ({cfg.topk_group}) must be <= n_group ({G})")
    if k > E:
        problems.append(f"num_experts_per_tok ({k}) must be <= n_routed_experts ({E})")
    if not cfg.has_moe_layers or problems:
        return problems
    if k < 1:
        problems.append("num_experts_per_tok must be >= 1: the model has MoE layers")
    if cfg.moe_intermediate_size < 1:
        problems.append("moe_intermediate_size must be >= 1: the model has MoE layers")
    if G > 1 and E // G < 2:  # a group scores by its best two experts
        problems.append(f"n_group ({G}) must leave at least 2 experts per group ({E} experts)")
    if cfg.topk_group * (E // G) < k:
        problems.append(f"topk_group ({cfg.topk_group}) groups of {E // G} experts hold fewer than "
                        f"num_experts_per_tok ({k})")
    return problems


def check_context(length: int, cfg, flag: str) -> None:
    """A sequence length the model's positions cover; checked before any work, since longer ones never finish."""
    if length > cfg.max_position_embeddings:
        raise UserError(f"{flag} {length} exceeds the model's max_position_embeddings ({cfg.max_position_embeddings}); "
                        f"lower {flag}")


def load_config(path_or_name: str | Path) -> ModelConfig:
    """Loads a config JSON by path, or a preset by name (`tiny`, `glm47_flash_dsa`, ...)."""
    p = shipped_path(path_or_name)
    if not p.exists() and (CONFIG_DIR / f"{path_or_name}.json").exists():
        p = CONFIG_DIR / f"{path_or_name}.json"
    if not p.exists():
        presets = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.json")))
        raise UserError(f"config {str(path_or_name)!r} not found; pass a JSON file or a preset ({presets})")
    text = read_text(p, f"config {p}")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"config {p} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    except RecursionError:
        raise UserError(f"config {p} is not valid JSON (nested too deeply); fix the file") from None
    return ModelConfig.from_dict(d, source=str(p))
