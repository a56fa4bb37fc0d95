"""Abstract parameter counts of the presets (nnx.eval_shape: no memory), against hand-written formulas and
the published sizes; S layers hold no indexer weights and no indexer key cache."""

import math

import jax
import pytest
from flax import nnx

from ic_jax.model.cache import IndexedLayerCache
from ic_jax.model.config import load_config
from ic_jax.model.dsa import DSAModel
from ic_jax.model.pattern import parse_pattern

PUBLISHED = {"glm47_flash_dsa": 30e9, "deepseek_v32": 671e9, "glm5": 744e9}


def abstract_model(cfg, spec):
    pattern = parse_pattern(spec, cfg.num_hidden_layers)
    return nnx.eval_shape(lambda: DSAModel(cfg, pattern, nnx.Rngs(0))), pattern


def count(model) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def indexer_size(c) -> int:
    """W^I_q (q_lora -> H_I x D_I), W^I_k (hidden -> D_I), its LayerNorm (scale, bias), W^I_w (hidden -> H_I)."""
    return c.q_lora_rank * c.index_n_heads * c.index_head_dim + c.hidden_size * c.index_head_dim \
        + 2 * c.index_head_dim + c.hidden_size * c.index_n_heads


def hand_count(c, pattern: str) -> int:
    D, H = c.hidden_size, c.num_attention_heads
    attn = (D * c.q_lora_rank + c.q_lora_rank  # wq_a, q_norm
            + c.q_lora_rank * H * (c.qk_nope_head_dim + c.qk_rope_head_dim)  # wq_b
            + D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank  # wkv_a, kv_norm
            + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)  # wkv_b
            + H * c.v_head_dim * D)  # wo
    dense = 3 * D * c.intermediate_size
    moe = (D * c.n_routed_experts + c.n_routed_experts  # router, correction bias
           + 3 * c.n_routed_experts * D * c.moe_intermediate_size
           + 3 * D * c.moe_intermediate_size * c.n_shared_experts)
    total = 2 * c.vocab_size * D + D  # embed, lm_head (untied), final norm
    for i, ch in enumerate(pattern):
        total += 2 * D + attn  # two RMSNorms + MLA
        total += moe if i >= c.first_k_dense_replace else dense
        total += indexer_size(c) if ch == "F" else 0
    return total


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_sizes(name):
    cfg = load_config(name)
    assert not cfg.tie_word_embeddings
    model, pattern = abstract_model(cfg, None)
    n = count(model)
    assert n == hand_count(cfg, pattern)
    assert abs(n - PUBLISHED[name]) < 0.05 * PUBLISHED[name], f"{name}: {n / 1e9:.2f}B"


@pytest.mark.parametrize("name,spec", [("glm47_flash_dsa", "keep:0.25"), ("deepseek_v32", "freq:4"),
                                       ("glm5", "freq:4,offset:3"), ("tiny", "FSSS")])
def test_shared_layers_hold_no_indexer(name, spec):
    cfg = load_config(name)
    full, _ = abstract_model(cfg, None)
    shared, pattern = abstract_model(cfg, spec)
    n_dropped = pattern.count("S")
    assert n_dropped > 0
    assert count(full) - count(shared) == n_dropped * indexer_size(cfg)
    assert count(shared) == hand_count(cfg, pattern)
    # per block: an indexer exactly on F positions
    pure = nnx.to_pure_dict(nnx.state(shared, nnx.Param))
    for g, stage in enumerate(shared.stage_specs):
        for pos, kind in enumerate(stage.kinds):
            assert ("indexer" in pure["groups"][g]["blocks"][pos]) == kind.full
    # and an indexer key cache exactly on F positions
    cache = jax.eval_shape(lambda: shared.init_cache(1, 64))
    n_index_k = 0
    for stage, c in zip(shared.stage_specs, cache):
        for kind, entry in zip(stage.kinds, c):
            assert isinstance(entry, IndexedLayerCache) == kind.full
            n_index_k += stage.repeats * isinstance(entry, IndexedLayerCache)
    assert n_index_k == pattern.count("F")


def test_tiny_count_matches_formula():
    cfg = load_config("tiny")
    for spec in (None, "FSSS", "FFSFSSFS"):
        model, pattern = abstract_model(cfg, spec)
        assert count(model) == hand_count(cfg, pattern)
