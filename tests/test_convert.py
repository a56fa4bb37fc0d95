"""python -m ic_jax.convert against Hugging Face transformers: tiny checkpoints in the upstream layout (FP8 with
edge blocks, two shards, an MTP layer, GLM-5.2 shared layers without indexer weights) made by
scripts/make_hf_fixtures.py, with the logits transformers computed for them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from ic_jax.convert.__main__ import main, work_dir
from ic_jax.convert.fp8 import dequantize, quantize
from ic_jax.convert.hf_config import schedule
from ic_jax.runtime.checkpoint import default_pattern, load_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def converted(tmp_path, name, *extra):
    out = tmp_path / name
    assert main(["--hf", str(FIXTURES / name), "--out", str(out), "--dtype", "float32", "--quiet", *extra]) == 0
    return out


@pytest.mark.parametrize("name", ["deepseek_v32", "glm52"])
def test_logits_match_transformers(tmp_path, name):
    out = converted(tmp_path, name)
    tokens = json.loads((FIXTURES / name / "prompt.json").read_text())["tokens"]
    model = load_checkpoint(out)
    logits = np.asarray(model.forward(jnp.asarray([tokens], jnp.int32)).logits[0])
    want = np.load(FIXTURES / name / "logits.npy")
    np.testing.assert_allclose(logits, want, atol=2e-4 * np.abs(want).max(), rtol=0)


def test_glm52_schedule_and_missing_indexers(tmp_path, capsys):
    out = converted(tmp_path, "glm52")
    assert default_pattern(out) == "FFSF"  # indexer_types
    assert "note: skipped the MTP/NextN layer(s) [4]" in capsys.readouterr().out
    with pytest.raises(Exception, match="layer 2 is F in the pattern but has no indexer weights"):
        load_checkpoint(out, "FFFF")


def test_schedule_conventions():
    assert schedule({"indexer_types": ["full", "shared", "full"], "index_topk_freq": 3}, 3, "c") == "FSF"
    assert schedule({"index_topk_pattern": "FFS", "index_topk_freq": 3}, 3, "c") == "FFS"
    assert schedule({"index_topk_freq": 4}, 8, "c") == "FFSSSFSS"  # vLLM's default offset 2
    assert schedule({"index_topk_freq": 4, "index_skip_topk_offset": 3}, 8, "c") == "FFFSSSFS"  # GLM-5.2
    assert schedule({}, 8, "c") is None


def test_fp8_edge_blocks():
    """Element by element: scale[i // 128, k // 128] on the ceil grid, fp32 or 1-byte e8m0 scales alike."""
    rng = np.random.default_rng(0)
    w8 = rng.normal(size=(200, 130)).astype(ml_dtypes.float8_e4m3fn)
    scale = np.array([[0.5, 2.0], [4.0, 0.125]], np.float32)  # powers of two: exact in e8m0
    want = np.array([[float(w8[i, k]) * scale[i // 128, k // 128] for k in range(130)] for i in range(200)])
    np.testing.assert_array_equal(dequantize(w8, scale), want)
    np.testing.assert_array_equal(dequantize(w8, scale.astype(ml_dtypes.float8_e8m0fnu)), want)
    w = rng.normal(size=(200, 130)).astype(np.float32)
    w[128:, 128:] *= 1000  # the corner edge block gets its own scale
    q8, qs = quantize(w)
    assert qs.shape == (2, 2)
    np.testing.assert_allclose(dequantize(q8, qs), w, rtol=0.07, atol=qs.max() * 2**-9)


def test_resumes_from_work_folder(tmp_path, monkeypatch):
    from ic_jax.convert import hf_import

    saved, stopping = [], [True]
    real = hf_import.save_unit

    def stop_after_two(path, tree):
        real(path, tree)
        saved.append(path.name)
        if stopping[0] and len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(hf_import, "save_unit", stop_after_two)
    out = tmp_path / "v32"
    args = ["--hf", str(FIXTURES / "deepseek_v32"), "--out", str(out), "--dtype", "float32", "--quiet"]
    assert main(args) == 130
    assert sorted(p.name for p in work_dir(out).glob("*.npz")) == ["layer_00000.npz", "top.npz"]
    saved.clear()
    stopping[0] = False
    assert main(args) == 0
    assert saved == ["layer_00001.npz", "layer_00002.npz", "layer_00003.npz"]  # the first two were reused
    assert not work_dir(out).exists()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["config"].update(architectures=["LlamaForCausalLM"]), "architecture LlamaForCausalLM is not supported"),
    (lambda d: d["config"].update(q_lora_rank=40), "tensor model.layers.0.self_attn.q_a_proj.weight has shape"),
    (lambda d: d["map"].pop("model.layers.1.mlp.experts.3.up_proj.weight"),
     "tensor model.layers.1.mlp.experts.3.up_proj.weight is missing"),
    (lambda d: d["config"].update(indexer_types=["full"] * 4), "model.layers.2.self_attn.indexer.wq_b.weight is missing"),
])
def test_bad_checkpoints_one_line(tmp_path, capsys, edit, message):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "glm52", src)
    d = {"config": json.loads((src / "config.json").read_text()),
         "index": json.loads((src / "model.safetensors.index.json").read_text())}
    d["map"] = d["index"]["weight_map"]
    edit(d)
    (src / "config.json").write_text(json.dumps(d["config"]))
    (src / "model.safetensors.index.json").write_text(json.dumps(d["index"]))
    assert main(["--hf", str(src), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err


@pytest.mark.parametrize("name, pattern", [("deepseek_v32", "FSFS"), ("glm52", None)])
def test_export_then_import_is_identical(tmp_path, name, pattern):
    """--to-hf then --hf: the same params (S layers without indexers) and the same logits; the pattern in
    config.json as indexer_types and index_topk_pattern, no indexer tensors on S layers."""
    from ic_jax.convert.safetensors_io import Shards
    from ic_jax.runtime.checkpoint import read_config, read_params

    ckpt = converted(tmp_path, name)
    hf = tmp_path / "hf"
    extra = [] if pattern is None else ["--pattern", pattern]
    assert main(["--to-hf", "--ckpt", str(ckpt), "--out", str(hf), *extra]) == 0
    want_pattern = pattern or "FFSF"
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["index_topk_pattern"] == want_pattern and "index_topk_freq" not in cfg
    assert cfg["indexer_types"] == ["full" if c == "F" else "shared" for c in want_pattern]
    assert "quantization_config" not in cfg
    names = Shards(hf).names()
    assert [any(n.startswith(f"model.layers.{i}.self_attn.indexer.") for n in names) for i in range(4)] == \
        [c == "F" for c in want_pattern]
    back = tmp_path / "back"
    assert main(["--hf", str(hf), "--out", str(back), "--quiet"]) == 0  # the exported config says float32
    assert default_pattern(back) == want_pattern
    (top_a, layers_a), (top_b, layers_b) = (read_params(c, read_config(c)) for c in (ckpt, back))
    for i, c in enumerate(want_pattern):
        if c == "S":
            assert "indexer" not in layers_b[i]
            layers_a[i].pop("indexer", None)
    leaves = [jax.tree_util.tree_leaves_with_path(tree) for tree in ((top_a, layers_a), (top_b, layers_b))]
    assert len(leaves[0]) == len(leaves[1])
    for a, b in zip(*leaves):
        assert a[0] == b[0] and a[1].dtype == b[1].dtype
        np.testing.assert_array_equal(a[1], b[1])
    tokens = jnp.asarray([json.loads((FIXTURES / name / "prompt.json").read_text())["tokens"]], jnp.int32)
    logits = [np.asarray(load_checkpoint(c, want_pattern).forward(tokens).logits) for c in (ckpt, back)]
    np.testing.assert_array_equal(*logits)


def test_scale_fmt_read_from_the_config():
    """DeepSeek's quantization_config.scale_fmt "ue8m0" reaches ModelConfig (the FP8 indexer's scales)."""
    from ic_jax.convert.hf_config import read_hf_config

    assert read_hf_config(FIXTURES / "deepseek_v32").cfg.scale_fmt == "ue8m0"
    assert read_hf_config(FIXTURES / "glm52").cfg.scale_fmt is None
