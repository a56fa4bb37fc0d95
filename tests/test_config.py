"""Model config validation: every bad value is one UserError line naming the file and the key; the presets, the
shipped checkpoint's config and the zero values the model can take still load."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ic_jax.errors import UserError
from ic_jax.model.config import CONFIG_DIR, ModelConfig, load_config
from ic_jax.model.dsa import DSAModel
from ic_jax.model.pattern import parse_pattern
from ic_jax.package_data import DEFAULT_CKPT

TINY = json.loads((CONFIG_DIR / "tiny.json").read_text())  # 8 layers, first dense, 8 experts in 2 groups, top-2
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0}

# (changes to tiny.json, the key the message must name)
BAD = {
    # the issue's examples
    "rope_theta_string": ({"rope_theta": "abc"}, "rope_theta"),
    "rope_scaling_string": ({"rope_scaling": "yarn"}, "rope_scaling"),
    "rms_norm_eps_null": ({"rms_norm_eps": None}, "rms_norm_eps"),
    "index_topk_0": ({"index_topk": 0}, "index_topk"),
    "num_attention_heads_0": ({"num_attention_heads": 0}, "num_attention_heads"),
    # floats: finite and > 0 (rope_theta > 1)
    "rope_theta_0": ({"rope_theta": 0}, "rope_theta"),
    "rope_theta_1": ({"rope_theta": 1.0}, "rope_theta"),
    "rope_theta_nan": ({"rope_theta": float("nan")}, "rope_theta"),
    "rope_theta_inf": ({"rope_theta": float("inf")}, "rope_theta"),
    "rope_theta_bool": ({"rope_theta": True}, "rope_theta"),
    "rope_theta_huge_int": ({"rope_theta": 10**400}, "rope_theta"),
    "rms_norm_eps_0": ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    "rms_norm_eps_negative": ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    "rms_norm_eps_string": ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
    "routed_scaling_factor_0": ({"routed_scaling_factor": 0}, "routed_scaling_factor"),
    "routed_scaling_factor_list": ({"routed_scaling_factor": [1.5]}, "routed_scaling_factor"),
    # integers: not bool, float, string or null; >= 1 unless 0 has a meaning
    "hidden_size_float": ({"hidden_size": 64.0}, "hidden_size"),
    "hidden_size_string": ({"hidden_size": "64"}, "hidden_size"),
    "hidden_size_bool": ({"hidden_size": True}, "hidden_size"),
    "hidden_size_null": ({"hidden_size": None}, "hidden_size"),
    "hidden_size_past_int32": ({"hidden_size": 2**31}, "hidden_size"),
    "n_shared_experts_negative": ({"n_shared_experts": -1}, "n_shared_experts"),
    "q_lora_rank_0": ({"q_lora_rank": 0}, "q_lora_rank"),  # RMSNorm over an empty latent; the indexer reads it
    **{f"{k}_0": ({k: 0}, k) for k in (
        "hidden_size", "num_hidden_layers", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "index_n_heads",
        "index_head_dim", "vocab_size", "max_position_embeddings", "n_group", "topk_group")},
    # booleans and the rest
    "norm_topk_prob_int": ({"norm_topk_prob": 1}, "norm_topk_prob"),
    "rope_interleave_string": ({"rope_interleave": "yes"}, "rope_interleave"),
    "tie_word_embeddings": ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    "dtype_float16": ({"dtype": "float16"}, "dtype"),
    "dtype_number": ({"dtype": 5}, "dtype"),
    # rope_scaling: null or an object of an implemented type with its keys
    "rope_scaling_array": ({"rope_scaling": []}, "rope_scaling"),
    "rope_scaling_number": ({"rope_scaling": 5}, "rope_scaling"),
    "rope_scaling_no_type": ({"rope_scaling": {"factor": 4.0}}, "rope_scaling.type"),
    "rope_scaling_linear": ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.type"),
    "rope_scaling_two_types": ({"rope_scaling": {**YARN, "rope_type": "default"}}, "rope_type"),
    "yarn_no_factor": ({"rope_scaling": {k: v for k, v in YARN.items() if k != "factor"}}, "factor"),
    "yarn_no_mscale": ({"rope_scaling": {k: v for k, v in YARN.items() if k != "mscale"}}, "mscale"),
    "yarn_factor_string": ({"rope_scaling": {**YARN, "factor": "abc"}}, "rope_scaling.factor"),
    "yarn_factor_below_1": ({"rope_scaling": {**YARN, "factor": 0.5}}, "rope_scaling.factor"),
    "yarn_original_float": ({"rope_scaling": {**YARN, "original_max_position_embeddings": 1024.0}},
                            "rope_scaling.original_max_position_embeddings"),
    "yarn_beta_fast_0": ({"rope_scaling": {**YARN, "beta_fast": 0}}, "rope_scaling.beta_fast"),
    "yarn_mscale_null": ({"rope_scaling": {**YARN, "mscale": None}}, "rope_scaling.mscale"),
    "yarn_unequal_mscales": ({"rope_scaling": {**YARN, "mscale": 0.707}}, "mscale_all_dim"),
    "yarn_unknown_key": ({"rope_scaling": {**YARN, "attention_factor": 1.2}}, "attention_factor"),
    "default_with_factor": ({"rope_scaling": {"rope_type": "default", "factor": 2.0}}, "factor"),
    # relations between keys
    "more_dense_layers_than_layers": ({"first_k_dense_replace": 9}, "first_k_dense_replace"),
    "odd_rope_dim": ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    "rope_dim_past_index_dim": ({"qk_rope_head_dim": 32}, "qk_rope_head_dim"),
    "hadamard_non_power_of_two": ({"index_head_dim": 24}, "index_head_dim"),
    "experts_not_divisible": ({"n_group": 3}, "n_group"),
    "topk_group_past_n_group": ({"topk_group": 3}, "topk_group"),
    "experts_per_tok_past_experts": ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    "one_expert_per_group": ({"n_group": 8}, "n_group"),  # a group scores by its best two experts
    "kept_groups_too_small": ({"n_group": 4, "num_experts_per_tok": 3}, "topk_group"),  # 1 group of 2 < 3
    "moe_without_experts_per_tok": ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
    "moe_without_width": ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
    "dense_layer_without_width": ({"intermediate_size": 0}, "intermediate_size"),
    "all_dense_without_width": ({"n_routed_experts": 0, "num_experts_per_tok": 0, "n_group": 1,
                                 "intermediate_size": 0}, "intermediate_size"),
}

# zero values and forms the model can take: each loads unchanged
GOOD = {
    "rope_theta_int": {"rope_theta": 10000},
    "qk_nope_head_dim_0": {"qk_nope_head_dim": 0},  # test_nope_0_runs checks the model computes with it
    "no_shared_expert": {"n_shared_experts": 0},
    "all_moe_without_dense_width": {"first_k_dense_replace": 0, "intermediate_size": 0},
    "all_dense_without_moe_sizes": {"first_k_dense_replace": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 0},
    "no_experts": {"n_routed_experts": 0, "num_experts_per_tok": 0, "moe_intermediate_size": 0, "n_group": 1},
    "rope_scaling_default": {"rope_scaling": {"rope_type": "default"}},
    "yarn": {"rope_scaling": YARN},
    "yarn_rope_type_and_type": {"rope_scaling": {**YARN, "rope_type": "yarn"}},
    "unknown_top_level_keys": {"architectures": ["DeepseekV32ForCausalLM"], "torch_dtype": "bfloat16"},
}


def write_config(tmp_path: Path, content, name="config.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def load_error(path) -> str:
    with pytest.raises(UserError) as e:
        load_config(path)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("case", list(BAD))
def test_bad_value_is_one_line_naming_file_and_key(tmp_path, case):
    changes, key = BAD[case]
    path = write_config(tmp_path, {**TINY, **changes})
    message = load_error(path)
    assert str(path) in message and key in message, message


def test_all_problems_in_one_line(tmp_path):
    path = write_config(tmp_path, {**TINY, "rope_theta": "abc", "index_topk": 0, "rope_scaling": "yarn"})
    message = load_error(path)
    assert all(k in message for k in ("rope_theta", "index_topk", "rope_scaling")), message


@pytest.mark.parametrize("case", list(GOOD))
def test_good_value_loads(tmp_path, case):
    cfg = load_config(write_config(tmp_path, {**TINY, **GOOD[case]}))
    for k, v in GOOD[case].items():
        if k in cfg.to_dict():
            assert cfg.to_dict()[k] == v


def test_rope_scaling_round_trips_and_stays_hashable(tmp_path):
    cfg = load_config(write_config(tmp_path, {**TINY, "rope_scaling": YARN}))
    assert cfg.rope_scaling_dict == YARN and hash(cfg) == hash(ModelConfig.from_dict(cfg.to_dict()))
    assert cfg.replace(index_topk=4).rope_scaling_dict == YARN  # replace() passes the stored form back


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.json")) + [DEFAULT_CKPT / "config.json"],
                         ids=lambda p: p.stem)
def test_presets_and_shipped_checkpoint_load(path):
    cfg = load_config(path)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    expected = json.loads(path.read_text())
    assert all(getattr(cfg, k) == v for k, v in expected.items() if k not in ("model_type", "rope_scaling"))
    assert cfg.rope_scaling_dict == (expected["rope_scaling"] or {})


def test_from_dict_names_its_source():
    """Checkpoints read their config.json through from_dict: its errors name that file."""
    with pytest.raises(UserError, match=r"^ckpt/config\.json: .*index_topk"):
        ModelConfig.from_dict({**TINY, "index_topk": 0}, source="ckpt/config.json")
    with pytest.raises(UserError, match=r"^ckpt/config\.json: .*JSON object"):
        ModelConfig.from_dict([TINY], source="ckpt/config.json")


def test_replace_validates():
    with pytest.raises(UserError, match="num_attention_heads"):
        load_config("tiny").replace(num_attention_heads=0)


def test_first_layers_keeps_the_leading_dense_layers():
    """DeepSeek-V3.2's 3 dense layers lead its 61: its first 12 layers are 3 dense and 9 MoE, its first 2 both dense."""
    cfg = load_config("deepseek_v32")
    twelve, two = cfg.first_layers(12), cfg.first_layers(2)
    assert [twelve.is_moe(i) for i in range(12)] == [False] * 3 + [True] * 9
    assert (two.num_hidden_layers, two.has_moe_layers, two.has_dense_layers) == (2, False, True)
    assert twelve.replace(num_hidden_layers=61, first_k_dense_replace=3) == cfg  # nothing else changed


FILES = {
    "not_utf8": ("not UTF-8", "{\"hidden_size\": \"\xe9\"}".encode("latin-1")),
    "not_json": ("not valid JSON", b"{hidden_size: 64}"),
    "empty": ("not valid JSON", b""),
    "too_deep": ("not valid JSON", b"[" * 100_000 + b"]" * 100_000),
    "array": ("JSON object", b"[1, 2]"),
    "string": ("JSON object", b"\"tiny\""),
    "null": ("JSON object", b"null"),
}


@pytest.mark.parametrize("case", list(FILES))
def test_unreadable_file_is_one_line_naming_it(tmp_path, case):
    expected, data = FILES[case]
    path = tmp_path / "c.json"
    path.write_bytes(data)
    message = load_error(path)
    assert str(path) in message and expected in message, message


def test_missing_file_and_folder(tmp_path):
    assert "not found" in load_error(tmp_path / "nothing.json")
    assert "not a file" in load_error(tmp_path)


def test_nope_0_runs(tiny_cfg, ref):
    """qk_nope_head_dim 0 is accepted because the model computes with it: scores from the RoPE part alone, equal
    to the float64 dense MLA reference."""
    cfg = tiny_cfg.replace(qk_nope_head_dim=0, index_topk=16)
    model = ref.randomize_constants(DSAModel(cfg, parse_pattern("FSSSFSSS", 8), nnx.Rngs(0)), 1)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    got = np.asarray(nnx.jit(lambda m, t: m.forward(t).logits)(model, jnp.asarray(tokens)), np.float64)
    want, _ = ref.model_forward(model, tokens, mode="dense")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
