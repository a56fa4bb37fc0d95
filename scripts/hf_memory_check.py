"""Peak host memory of `python -m ic_jax.convert --hf` and of the direct load behind `generate --ckpt HF_DIR`, on a
synthetic FP8 DeepSeek-V3.2 folder far larger than its shards (random weights; the layout, dtypes and scales of
the release). Each run is a subprocess whose peak resident set (ru_maxrss) is printed beside the model's size
and the largest shard's, split into anonymous and file-backed pages.

  .venv/bin/python scripts/hf_memory_check.py [--scale 1.0] [--work /tmp/hf_memory_check]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from ic_jax.runtime.hf.config import read_hf_config
from ic_jax.runtime.hf.fp8 import quantize
from ic_jax.runtime.hf.names import layer_tensors, top_tensors
from ic_jax.runtime.hf.safetensors_io import write_shards

MiB = 2**20


def config(scale: float) -> dict:
    width = int(1024 * scale) // 64 * 64
    return {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "vocab_size": 8192,
            "hidden_size": width, "intermediate_size": 2 * width, "moe_intermediate_size": width // 2,
            "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 8, "n_routed_experts": 16,
            "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2, "topk_group": 1,
            "routed_scaling_factor": 2.5, "kv_lora_rank": 256, "q_lora_rank": 384, "qk_rope_head_dim": 64,
            "v_head_dim": 64, "qk_nope_head_dim": 64, "index_head_dim": 64, "index_n_heads": 8, "index_topk": 64,
            "first_k_dense_replace": 1, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 256, "tie_word_embeddings": False, "rope_theta": 10000.0,
            "torch_dtype": "bfloat16",
            "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                    "weight_block_size": [128, 128]}}


def make_folder(folder: Path, scale: float) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config(scale)))
    cfg = read_hf_config(folder).cfg
    rng = np.random.default_rng(0)
    tensors = {}
    for t in top_tensors(cfg) + [t for i in range(cfg.num_hidden_layers) for t in layer_tensors(cfg, i, True)]:
        w = rng.standard_normal(t.shape, np.float32) / np.sqrt(t.shape[-1])
        if len(t.shape) == 2 and "embed" not in t.name and "lm_head" not in t.name and ".gate." not in t.name:
            tensors[t.name], tensors[t.name + "_scale_inv"] = quantize(w, pow2=True)
        else:
            tensors[t.name] = w if ".gate." in t.name else w.astype(ml_dtypes.bfloat16)
    write_shards(folder, tensors, 40 * MiB)


WATCH = """
import json, sys, threading, time
peak = {"anon": 0, "file": 0}
def watch():
    while True:
        rss = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Rss"))
        for key, name in (("anon", "RssAnon"), ("file", "RssFile")):
            peak[key] = max(peak[key], int(rss[name].split()[0]) // 1024)
        time.sleep(0.01)
threading.Thread(target=watch, daemon=True).start()
exec(sys.argv[1])
time.sleep(0.05)
print(json.dumps(peak))
"""


def peak_mib(code: str) -> dict:
    """Peak resident MiB of a fresh process running `code`: anonymous memory (what the process allocated) and
    file-backed pages (memory-mapped files and libraries: clean pages the kernel reclaims when memory is short)."""
    out = subprocess.run([sys.executable, "-c", WATCH, code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--work", type=Path, default=Path("/tmp/hf_memory_check"))
    a = p.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    hf = a.work / "hf"
    make_folder(hf, a.scale)
    cfg = read_hf_config(hf).cfg
    shards = sorted(hf.glob("*.safetensors"))
    print(f"folder: {sum(f.stat().st_size for f in shards) / MiB:.0f} MiB in {len(shards)} shards, largest "
          f"{max(f.stat().st_size for f in shards) / MiB:.0f} MiB; bf16 model {2 * cfg_params(hf) / MiB:.0f} MiB "
          f"({cfg.num_hidden_layers} layers)")
    baseline = peak_mib("import ic_jax.convert.__main__, jax; jax.numpy.zeros(1).block_until_ready()")
    convert = peak_mib(f"from ic_jax.convert.__main__ import main; main(['--hf', {str(hf)!r}, '--out', "
                       f"{str(a.work / 'out')!r}, '--quiet'])")
    direct = peak_mib(f"from ic_jax.runtime.hf.device import load_model; load_model({str(hf)!r})")
    for what, peak in (("imports + jax", baseline), ("convert", convert), ("direct load", direct)):
        print(f"{what:14s} peak anonymous {peak['anon']:5d} MiB, file-backed {peak['file']:5d} MiB")
    print("(direct load on the CPU: the params themselves are host memory)")


def cfg_params(hf: Path) -> int:
    cfg = read_hf_config(hf).cfg
    names = top_tensors(cfg) + [t for i in range(cfg.num_hidden_layers) for t in layer_tensors(cfg, i, True)]
    return sum(int(np.prod(t.shape)) for t in names)


if __name__ == "__main__":
    main()
