"""Writes tests/fixtures/hf/: tiny DeepSeek-V3.2 and GLM-5.2 checkpoints in the exact upstream layout, and the
logits Hugging Face transformers computes for them (the independent reference that tests/test_convert.py
compares ic_jax's converted model against, without torch).

Each checkpoint: random weights, the linear weights FP8 e4m3 with 128 x 128 block scales (`weight_scale_inv`,
edge blocks where a dimension is not a multiple of 128; DeepSeek: power-of-two fp32 scales as `scale_fmt: ue8m0`
releases hold them, GLM: 1-byte e8m0 scale tensors), the router gate and its correction bias fp32, the rest
bf16, split over two shards with `model.safetensors.index.json`, and a release-style config.json. The logits
are computed from the dequantized weights, dequantized here (transformers' CPU FP8 path is wrong at edge
blocks). The indexer's top-k is checked for ties at the k-th place, where two top-k implementations may differ.
deepseek_v32_bf16 is deepseek_v32 unquantized: the same dequantized values in bf16 (exact: an e4m3 value times a
power of two fits bf16), one model.safetensors, hence the same logits. Each folder has a byte-level tokenizer.json
with the architecture's special tokens and a chat template in the form its release ships (GLM: chat_template.jinja,
DeepSeek: tokenizer_config.json).

  python3 -m venv /work/hfenv && /work/hfenv/bin/pip install torch==2.13.0 transformers==5.24.0 safetensors numpy \
      tokenizers
  /work/hfenv/bin/python scripts/make_hf_fixtures.py
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    DeepseekV32Config,
    DeepseekV32ForCausalLM,
    GlmMoeDsaConfig,
    GlmMoeDsaForCausalLM,
)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf"
BLOCK = 128
PROMPT = [3, 17, 91, 200, 45, 8, 150, 77, 240, 12, 99, 5, 61, 130]  # 14 tokens; index_topk 4 < 14
QUANTIZED = re.compile(r"(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|indexer\.wq_b|indexer\.wk)"
                       r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$")
FP32 = re.compile(r"mlp\.gate\.(weight|e_score_correction_bias)$")

COMMON = {"vocab_size": 272, "hidden_size": 136, "intermediate_size": 144, "moe_intermediate_size": 24, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
              "n_shared_experts": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 32, "q_lora_rank": 48, "qk_rope_head_dim": 16,
              "v_head_dim": 24, "qk_nope_head_dim": 16, "index_head_dim": 32, "index_n_heads": 8, "index_topk": 4,
              "first_k_dense_replace": 1, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "max_position_embeddings": 32,
              "tie_word_embeddings": False}
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
CASES = {
    # release spelling: rope_theta + rope_scaling with "type", torch_dtype; 2 expert groups; every layer full
    "deepseek_v32": {"arch": "DeepseekV32ForCausalLM", "model_type": "deepseek_v32", "cls": DeepseekV32ForCausalLM,
                         "config_cls": DeepseekV32Config, "e8m0": False, "bf16_copy": "deepseek_v32_bf16",
                         "extra": {"n_group": 2, "topk_group": 1, "rope_theta": 10000.0, "rope_scaling": YARN,
                                    "torch_dtype": "bfloat16", "num_nextn_predict_layers": 1,
                                    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                         "quant_method": "fp8", "scale_fmt": "ue8m0",
                                                         "weight_block_size": [BLOCK, BLOCK]}}},
    # transformers spelling: rope_parameters, dtype, head_dim; GLM-5.2 schedule: layer 2 shares, ships no indexer
    "glm52": {"arch": "GlmMoeDsaForCausalLM", "model_type": "glm_moe_dsa", "cls": GlmMoeDsaForCausalLM,
                  "config_cls": GlmMoeDsaConfig, "e8m0": True, "bf16_copy": None,
                  "extra": {"n_group": 1, "topk_group": 1, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
                             "dtype": "bfloat16", "head_dim": 16, "indexer_types": ["full", "full", "shared", "full"],
                             "index_topk_freq": 2, "index_skip_topk_offset": 2,
                             "quantization_config": {"fmt": "e4m3", "quant_method": "fp8",
                                                  "weight_block_size": [BLOCK, BLOCK]}}},
}

# the special tokens and chat template of each release's tokenizer (templates cut down to one user/assistant turn)
DEEPSEEK_TOKENS = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                   "user": "<｜User｜>", "assistant": "<｜Assistant｜>"}
DEEPSEEK_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                     "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>"
                     "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
                     "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜></think>{% endif %}")
GLM_TOKENS = {"eos_token": "<|endoftext|>", "gmask": "[gMASK]", "sop": "<sop>", "user": "<|user|>",
              "assistant": "<|assistant|>"}
GLM_TEMPLATE = """[gMASK]<sop>{% for m in messages %}
<|{{ m.role }}|>
{{ m.content }}{% endfor %}
{% if add_generation_prompt %}<|assistant|>
<think></think>
{% endif %}"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (what a byte-level BPE vocabulary is written in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}


def write_tokenizer(folder: Path, special: dict, template: str, in_config: bool) -> None:
    """A byte-level tokenizer.json (id = byte, no merges) with the special tokens after the bytes, and the chat
    template where the release keeps it: tokenizer_config.json (DeepSeek) or chat_template.jinja (GLM)."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(special.values()))
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config.update({k: {"__type": "AddedToken", "content": v, "special": True} if in_config else v
                   for k, v in special.items() if k.endswith("_token")})
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    if in_config:
        config["chat_template"] = template
    else:
        (folder / "chat_template.jinja").write_text(template)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights of unit-scale activations (the default init makes logits nearly uniform), norms near 1."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.data = 1 + 0.2 * torch.randn(p.shape, generator=gen)
        elif name.endswith(".bias"):
            p.data = 0.2 * torch.randn(p.shape, generator=gen)
        else:
            p.data = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1])
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.data = 0.1 * torch.randn(b.shape, generator=gen)


def upstream(state: dict) -> dict:
    """transformers' fused experts -> one tensor per expert, as the releases store them."""
    out = {}
    for name, t in state.items():
        m = re.fullmatch(r"(.*\.mlp\.experts\.)(gate_up_proj|down_proj)", name)
        if not m:
            out[name] = t
            continue
        for e in range(t.shape[0]):
            if m[2] == "down_proj":
                out[f"{m[1]}{e}.down_proj.weight"] = t[e]
            else:
                gate, up = t[e].chunk(2, dim=0)
                out[f"{m[1]}{e}.gate_proj.weight"], out[f"{m[1]}{e}.up_proj.weight"] = gate, up
    return out


def fused(state: dict) -> dict:
    """The inverse of `upstream`, to load dequantized weights back into transformers."""
    out, experts = {}, {}
    for name, t in state.items():
        m = re.fullmatch(r"(.*\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = t
        else:
            out[name] = t
    for prefix, per in experts.items():
        order = sorted(per)
        out[prefix + "gate_up_proj"] = torch.stack([torch.cat([per[e]["gate_proj"], per[e]["up_proj"]]) for e in order])
        out[prefix + "down_proj"] = torch.stack([per[e]["down_proj"] for e in order])
    return out


def block_scales(w: torch.Tensor) -> torch.Tensor:
    """Power-of-two amax / 448 per 128 x 128 block, on the ceil-shaped grid."""
    rows, cols = w.shape
    grid = torch.empty(math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            amax = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].abs().max().clamp_min(1e-12)
            grid[i, j] = 2.0 ** math.ceil(math.log2(amax.item() / 448.0))
    return grid


def expand(scale: torch.Tensor, shape) -> torch.Tensor:
    return scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:shape[0], :shape[1]]


def quantize(state: dict, e8m0: bool) -> tuple[dict, dict]:
    """(tensors as the file holds them, their fp32 values as a loader must read them)."""
    stored, exact = {}, {}
    for name, t in state.items():
        if QUANTIZED.search(name):
            scale = block_scales(t)
            w8 = (t / expand(scale, t.shape)).to(torch.float8_e4m3fn)
            stored[name] = w8
            stored[name + "_scale_inv"] = scale.to(torch.float8_e8m0fnu) if e8m0 else scale
            exact[name] = w8.float() * expand(scale, t.shape)
        elif FP32.search(name):
            stored[name] = exact[name] = t.float()
        else:
            stored[name] = t.to(torch.bfloat16)
            exact[name] = stored[name].float()
    return stored, exact


def mtp_layer(cfg: dict, gen: torch.Generator) -> dict:
    """A few tensors of the MTP/NextN layer at index num_hidden_layers (the converter must skip them)."""
    p, D = f"model.layers.{cfg['num_hidden_layers']}.", cfg["hidden_size"]
    return {p + "enorm.weight": torch.ones(D, dtype=torch.bfloat16),
            p + "eh_proj.weight": torch.randn(D, 2 * D, generator=gen).to(torch.bfloat16)}


def write_shards(folder: Path, tensors: dict) -> None:
    names = list(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / file))
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def topk_margins(calls: list) -> float:
    """The smallest gap between the k-th and (k+1)-th visible indexer score over all recorded top-k calls."""
    gap = math.inf
    for scores, k in calls:
        s = scores.sort(dim=-1, descending=True).values
        if s.shape[-1] <= k:
            continue
        kth, nxt = s[..., k - 1], s[..., k]
        visible = nxt > -1e30  # transformers masks with the dtype's min, not -inf; masked keys are never attended
        if visible.any():
            gap = min(gap, (kth - nxt)[visible].min().item())
    return gap


def make(name: str, case: dict, seed: int) -> None:
    cfg = dict(COMMON, **case["extra"])
    hf_kwargs = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype", "dtype",
                                                         "quantization_config", "num_nextn_predict_layers")}
    if "rope_scaling" in cfg:  # the release spelling, given to transformers in its own
        rs = {("rope_type" if k == "type" else k): v for k, v in cfg["rope_scaling"].items()}
        hf_kwargs["rope_parameters"] = dict(rs, rope_theta=cfg["rope_theta"])
    config = case["config_cls"](**hf_kwargs)
    config._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(seed)
    model = case["cls"](config).float().eval()
    randomize(model, gen)
    stored, exact = quantize(upstream(model.state_dict()), case["e8m0"])
    model.load_state_dict(fused(exact), strict=True)
    calls = []
    original = torch.Tensor.topk

    def recording(self, k, *args, **kwargs):
        if k == min(cfg["index_topk"], self.shape[-1]) and self.shape[-1] == len(PROMPT):
            calls.append((self.detach().clone(), k))
        return original(self, k, *args, **kwargs)

    torch.Tensor.topk = recording
    try:
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT])).logits[0].float().numpy()
    finally:
        torch.Tensor.topk = original
    margin = topk_margins(calls)
    assert calls and margin > 1e-4, f"{name}: indexer top-k tie (margin {margin}); try another seed"
    release = dict(cfg, architectures=[case["arch"]], model_type=case["model_type"])
    write_folder(OUT / name, release, stored | mtp_layer(cfg, gen), logits, margin, case)
    if case["bf16_copy"]:  # the dequantized values, exact in bf16: the same model, the same logits
        unquantized = {n: t if FP32.search(n) else t.to(torch.bfloat16) for n, t in exact.items()}
        assert all(torch.equal(t.float(), exact[n]) for n, t in unquantized.items())
        release = {k: v for k, v in release.items() if k != "quantization_config"}
        write_folder(OUT / case["bf16_copy"], release, unquantized, logits, margin, case, shards=1)
    print(f"{name}: {len(stored)} tensors, top-k margin {margin:.3g}, logits {logits.shape}")


def write_folder(folder: Path, config: dict, tensors: dict, logits, margin: float, case: dict, shards: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("model*.safetensors*"):
        old.unlink()
    if shards == 1:
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / "model.safetensors"))
    else:
        write_shards(folder, tensors)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    np.save(folder / "logits.npy", logits.astype(np.float32))
    (folder / "prompt.json").write_text(json.dumps({"tokens": PROMPT, "topk_margin": margin}))
    deepseek = case["model_type"] == "deepseek_v32"
    write_tokenizer(folder, DEEPSEEK_TOKENS if deepseek else GLM_TOKENS,
                    DEEPSEEK_TEMPLATE if deepseek else GLM_TEMPLATE, in_config=deepseek)


if __name__ == "__main__":
    for i, (name, case) in enumerate(CASES.items()):
        make(name, case, seed=i)
