"""Upstream tensor names (DeepSeek-V3.2 / GLM-5 layout, as Hugging Face ships them) <-> ic_jax parameters.

Every upstream linear weight is [out, in]; ic_jax keeps [in, out] with the output (or input) split into heads,
so the map is a transpose then a reshape, and its inverse a reshape then a transpose. MLA keeps the long
names (q_b_proj, kv_a_proj_with_mqa), the indexer DeepSeek's short ones (wq_b, wk). The routed experts are one
tensor per expert upstream and one stacked [E, ...] parameter here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ic_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str  # upstream name
    path: tuple[str, ...]  # in ic_jax's per-layer (or top-level) tree
    shape: tuple[int, ...]  # upstream shape
    target: tuple[int, ...]  # ic_jax shape (of one expert's slice for routed experts)
    linear: bool  # [out, in] upstream: transposed
    expert: int | None = None  # the routed expert this is the slice of

    def to_ic(self, w: np.ndarray) -> np.ndarray:
        return (w.T if self.linear else w).reshape(self.target)

    def to_hf(self, p: np.ndarray) -> np.ndarray:
        p = p if self.expert is None else p[self.expert]
        return p.reshape(self.shape[::-1]).T if self.linear else p.reshape(self.shape)


def linear(name, path, out_shape, in_shape, expert=None) -> Tensor:
    """An upstream [prod(out), prod(in)] weight held as ic_jax [*in, *out]."""
    shape = (int(np.prod(out_shape)), int(np.prod(in_shape)))
    return Tensor(name, path, shape, tuple(in_shape) + tuple(out_shape), True, expert)


def vector(name, path, n) -> Tensor:
    return Tensor(name, path, (n,), (n,), False)


def top_tensors(cfg: ModelConfig) -> list[Tensor]:
    V, D = cfg.vocab_size, cfg.hidden_size
    return [Tensor("model.embed_tokens.weight", ("embed",), (V, D), (V, D), False),
            vector("model.norm.weight", ("final_norm", "scale"), D),
            linear("lm_head.weight", ("lm_head",), (V,), (D,))]


def layer_tensors(cfg: ModelConfig, layer: int, indexer: bool) -> list[Tensor]:
    """The upstream tensors of layer `layer` (with its indexer's when `indexer`)."""
    p = f"model.layers.{layer}."
    D, H = cfg.hidden_size, cfg.num_attention_heads
    C, R, Q = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.q_lora_rank
    a = p + "self_attn."
    out = [
        vector(p + "input_layernorm.weight", ("attn_norm", "scale"), D),
        vector(p + "post_attention_layernorm.weight", ("ffn_norm", "scale"), D),
        linear(a + "q_a_proj.weight", ("attn", "wq_a"), (Q,), (D,)),
        vector(a + "q_a_layernorm.weight", ("attn", "q_norm", "scale"), Q),
        linear(a + "q_b_proj.weight", ("attn", "wq_b"), (H, cfg.qk_head_dim), (Q,)),
        linear(a + "kv_a_proj_with_mqa.weight", ("attn", "wkv_a"), (C + R,), (D,)),
        vector(a + "kv_a_layernorm.weight", ("attn", "kv_norm", "scale"), C),
        linear(a + "kv_b_proj.weight", ("attn", "wkv_b"), (H, cfg.qk_nope_head_dim + cfg.v_head_dim), (C,)),
        linear(a + "o_proj.weight", ("attn", "wo"), (D,), (H, cfg.v_head_dim)),
    ]
    if indexer:
        HI, DI, i = cfg.index_n_heads, cfg.index_head_dim, a + "indexer."
        out += [linear(i + "wq_b.weight", ("indexer", "wq"), (HI, DI), (Q,)),
                linear(i + "wk.weight", ("indexer", "wk"), (DI,), (D,)),
                vector(i + "k_norm.weight", ("indexer", "k_norm", "scale"), DI),
                vector(i + "k_norm.bias", ("indexer", "k_norm", "bias"), DI),
                linear(i + "weights_proj.weight", ("indexer", "w_heads"), (HI,), (D,))]
    m = p + "mlp."
    if not cfg.is_moe(layer):
        return out + swiglu(m, ("ffn",), D, cfg.intermediate_size)
    E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
    out += [linear(m + "gate.weight", ("ffn", "router"), (E,), (D,)),
            vector(m + "gate.e_score_correction_bias", ("ffn", "router_bias"), E)]
    for e in range(E):
        out += swiglu(f"{m}experts.{e}.", ("ffn",), D, F, expert=e)
    if cfg.n_shared_experts:
        out += swiglu(m + "shared_experts.", ("ffn", "shared"), D, F * cfg.n_shared_experts)
    return out


def swiglu(prefix: str, path: tuple[str, ...], D: int, F: int, expert: int | None = None) -> list[Tensor]:
    return [linear(prefix + "gate_proj.weight", path + ("w_gate",), (F,), (D,), expert=expert),
            linear(prefix + "up_proj.weight", path + ("w_up",), (F,), (D,), expert=expert),
            linear(prefix + "down_proj.weight", path + ("w_down",), (D,), (F,), expert=expert)]


def layer_of(name: str) -> int | None:
    """The layer index of an upstream name (None for top-level tensors)."""
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() else None


def has_indexer(names, layer: int) -> bool:
    prefix = f"model.layers.{layer}.self_attn.indexer."
    return any(n.startswith(prefix) for n in names)


def get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree
