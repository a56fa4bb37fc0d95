"""python -m ic_jax.convert and generate --ckpt HF_DIR against Hugging Face transformers: tiny checkpoints in the
upstream layout (FP8 with edge blocks, two shards, an MTP layer, GLM-5.2 shared layers without indexer weights; and
the DeepSeek one unquantized in bf16, one file) made by scripts/make_hf_fixtures.py, with the logits transformers
computed for them, their tokenizer.json and chat templates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from ic_jax.convert.__main__ import main, work_dir
from ic_jax.runtime.checkpoint import default_pattern, load_checkpoint
from ic_jax.runtime.hf.config import schedule
from ic_jax.runtime.hf.fp8 import dequantize, quantize

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
# one compile per config and pattern, shared by the models of the same shape (the bf16 fixture's is the FP8 one's)
forward = nnx.jit(lambda model, tokens: model.forward(tokens).logits)


def converted(tmp_path, name, *extra):
    out = tmp_path / name
    assert main(["--hf", str(FIXTURES / name), "--out", str(out), "--dtype", "float32", "--quiet", *extra]) == 0
    return out


@pytest.mark.parametrize("name", ["deepseek_v32", "glm52", "deepseek_v32_bf16"])
def test_logits_match_transformers(tmp_path, name):
    out = converted(tmp_path, name)
    tokens = json.loads((FIXTURES / name / "prompt.json").read_text())["tokens"]
    model = load_checkpoint(out)
    logits = np.asarray(forward(model, jnp.asarray([tokens], jnp.int32))[0])
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
    real = hf_import.mark_done

    def stop_after_two(unit):
        real(unit)
        saved.append(unit.name)
        if stopping[0] and len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(hf_import, "mark_done", stop_after_two)
    out = tmp_path / "v32"
    args = ["--hf", str(FIXTURES / "deepseek_v32"), "--out", str(out), "--dtype", "float32", "--quiet"]
    assert main(args) == 130
    assert sorted(p.parent.name for p in work_dir(out).glob("*/done")) == ["layer_00000", "top"]
    saved.clear()
    stopping[0] = False
    assert main(args) == 0
    assert saved == ["layer_00001", "layer_00002", "layer_00003"]  # the first two were reused
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
    from ic_jax.runtime.checkpoint import read_config, read_params
    from ic_jax.runtime.hf.safetensors_io import Shards

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
    logits = [np.asarray(forward(load_checkpoint(c, want_pattern), tokens)) for c in (ckpt, back)]
    np.testing.assert_array_equal(*logits)


def test_scale_fmt_read_from_the_config():
    """DeepSeek's quantization_config.scale_fmt "ue8m0" reaches ModelConfig (the FP8 indexer's scales)."""
    from ic_jax.runtime.hf.config import read_hf_config

    assert read_hf_config(FIXTURES / "deepseek_v32").cfg.scale_fmt == "ue8m0"
    assert read_hf_config(FIXTURES / "glm52").cfg.scale_fmt is None


@pytest.mark.parametrize("name, pattern", [("glm52", None), ("deepseek_v32", "FSFS")])
def test_direct_load_equals_converted(tmp_path, name, pattern):
    """generate --ckpt HF_DIR: the model converted into device memory has the converted checkpoint's params,
    dtypes and pattern (the converted checkpoint's logits are transformers', test_logits_match_transformers)."""
    from ic_jax.runtime.hf.device import load_model

    out = tmp_path / name
    assert main(["--hf", str(FIXTURES / name), "--out", str(out), "--quiet"]) == 0  # bfloat16, as generate loads
    direct, saved = load_model(FIXTURES / name, pattern), load_checkpoint(out, pattern)
    assert direct.pattern == saved.pattern == (pattern or "FFSF")
    leaves = [jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(m, nnx.Param))) for m in (direct, saved)]
    assert [p for p, _ in leaves[0]] == [p for p, _ in leaves[1]]
    for (path, a), (_, b) in zip(*leaves):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_generate_refuses_a_pattern_the_checkpoint_has_no_indexers_for(capsys):
    from ic_jax.generate import main as generate

    assert generate(["--ckpt", str(FIXTURES / "glm52"), "--pattern", "FFFF", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--pattern FFFF makes layer 2 F" in err and "ships no indexer weights" in err, err


SHARDED_LOAD = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, numpy as np
from flax import nnx
from ic_jax.runtime.hf.device import load_model
from ic_jax.runtime.sharding import make_mesh, param_shardings
mesh = make_mesh({"data": 1, "tensor": 2, "expert": 2})
sharded, plain = load_model(FOLDER, mesh=mesh), load_model(FOLDER)
want = nnx.to_pure_dict(param_shardings(sharded, mesh))
got = nnx.to_pure_dict(nnx.state(sharded, nnx.Param))
ref = nnx.to_pure_dict(nnx.state(plain, nnx.Param))
split = 0
for s, a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), jax.tree.leaves(ref)):
    assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)
    split += len(a.sharding.device_set) == 4 and not a.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
assert split >= 10, split
print("SHARDED_LOAD_OK", split)
"""


def test_direct_load_lands_sharded():
    """With a mesh, every param arrives with its NamedSharding (experts over expert, heads and hidden over tensor)
    and the values of the unsharded load (4 fake CPU devices, in a subprocess)."""
    import subprocess
    import sys

    script = SHARDED_LOAD.replace("FOLDER", repr(str(FIXTURES / "glm52")))
    run = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=600)
    assert "SHARDED_LOAD_OK" in run.stdout, run.stderr[-3000:]


# the fixtures' templates by hand: GLM's (chat_template.jinja, trim_blocks drops the newline after each tag) and
# DeepSeek's (tokenizer_config.json, with its bos_token)
CHATS = {"glm52": "[gMASK]<sop><|user|>\nhi<|assistant|>\n<think></think>\n",
         "deepseek_v32": "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜></think>"}


def test_chat_templates(tmp_path):
    from ic_jax.errors import UserError
    from ic_jax.runtime.tokenizer import load_chat_template

    for name, want in CHATS.items():
        assert load_chat_template(FIXTURES / name).render([{"role": "user", "content": "hi"}]) == want
    with pytest.raises(UserError, match="refused these messages \\(Only user and assistant roles are supported!"):
        load_chat_template(FIXTURES / "deepseek_v32").render([{"role": "system", "content": "x"}])
    # a converted checkpoint keeps the template and the special tokens it uses
    out = tmp_path / "v32"
    assert main(["--hf", str(FIXTURES / "deepseek_v32"), "--out", str(out), "--quiet"]) == 0
    assert load_chat_template(out).render([{"role": "user", "content": "hi"}]) == CHATS["deepseek_v32"]


def test_generate_chat_from_a_hf_folder(capsys):
    """generate --ckpt HF_DIR --chat: the prompt is the rendered template in the folder's tokenizer.json (24 ids:
    [gMASK], <sop>, <|user|> and <|assistant|> one each, 20 bytes), under the folder's schedule."""
    from ic_jax.generate import main as generate

    args = ["--ckpt", str(FIXTURES / "glm52"), "--chat", "--prompt", "hi", "--max-new-tokens", "1",
            "--temperature", "0", "--json"]
    assert generate(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_tokens"] == 24 and out["new_tokens"] == 1 and out["pattern"] == "FFSF"


def test_chat_without_a_template_one_line(tmp_path, capsys):
    from ic_jax.generate import main as generate

    src = tmp_path / "glm"
    shutil.copytree(FIXTURES / "glm52", src)
    (src / "chat_template.jinja").unlink()
    assert generate(["--ckpt", str(src), "--chat", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no chat template" in err, err
