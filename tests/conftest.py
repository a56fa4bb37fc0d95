"""Shared fixtures and float64 numpy references for the core-model tests.

Everything in `Ref` is written from the formulas (indexcache.md section 1, DeepSeek-V3 / V3.2 reference
code), in float64 numpy, and never calls ic_jax code: it reads only the raw parameter arrays.
"""

from __future__ import annotations

import gc
import math
import os
import types

import jax
import numpy as np
import pytest
from flax import nnx

from ic_jax.model.config import load_config

# The tests' programs are tiny and compiling them is most of the suite's time: XLA skips its costly LLVM
# optimisations, here and in the subprocesses the tests start, which inherit the variable (=0 turns it off).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
jax.config.update("jax_disable_most_optimizations", os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] != "0")

# The slowest test files, slowest first (as measured in CI), run before the others: `make test` hands each xdist
# worker the next file in collection order when it is done (--dist loadfile --no-loadscope-reorder), so the long
# files start early and the many short ones even out the end. A file not named here keeps its place after them.
SLOW_FILES = ("test_notebooks.py", "test_train.py", "test_engine.py", "test_pallas_ops.py", "test_sharded_ops.py",
              "test_sharding.py", "test_model.py", "test_multihost.py", "test_jobs.py", "test_search.py",
              "test_checkpoint.py", "test_plan.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: each file's order stays


# ----------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops each test file's compiled programs when it ends. The CPU backend maps JIT code for every program
    (the interpret-mode kernels compile hundreds), and one process running the whole suite otherwise reaches
    the kernel's limit on memory maps (vm.max_map_count, 65530), where XLA aborts mid-compile."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def tiny_cfg():
    """configs/tiny.json in float32 (8 layers, first one dense, 8 experts in 2 groups)."""
    return load_config("tiny").replace(dtype="float32")


@pytest.fixture(scope="session")
def ref():
    """The float64 references below (stateless functions)."""
    return REF


# ----------------------------------------------------------------------------------------------------------
# parameter access


def pure_params(model) -> dict:
    """The model's parameters as a nested dict of float64 numpy arrays."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(lambda a: np.asarray(a, np.float64), pure)


def per_layer(model, pure) -> list[dict]:
    """Per-layer param dicts in layer order, built here from the stage layout (scan = rep-major, then position)."""
    layers = []
    for g, stage in enumerate(model.stage_specs):
        for rep in range(stage.repeats):
            for pos in range(len(stage.kinds)):
                layers.append(jax.tree.map(lambda a: a[rep], pure["groups"][g]["blocks"][pos]))
    assert len(layers) == model.cfg.num_hidden_layers
    return layers


def randomize_constants(model, seed: int, scale: float = 0.3):
    """Params initialised to constants (norm scales 1, norm biases 0, router bias 0) get random values,
    so that a model which ignored them would fail the comparisons."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)

    def new(path, a):
        name = str(path[-1].key)
        a = np.asarray(a)
        if name == "scale":
            return (1.0 + scale * rng.standard_normal(a.shape)).astype(a.dtype)
        if name in ("bias", "router_bias"):
            return (scale * rng.standard_normal(a.shape)).astype(a.dtype)
        return a

    pure = jax.tree_util.tree_map_with_path(new, pure)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


# ----------------------------------------------------------------------------------------------------------
# float64 building blocks


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def layer_norm(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def rope_freqs(cfg, dim: int) -> np.ndarray:
    """theta^(-2i/dim), with DeepSeek's YaRN blend (find_correction_range + linear ramp) when configured."""
    freqs = cfg.rope_theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    rs = dict(cfg.rope_scaling or ())
    if rs.get("type", rs.get("rope_type")) != "yarn":
        return freqs
    factor, orig = rs["factor"], rs["original_max_position_embeddings"]

    def corr_dim(n_rot):
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(corr_dim(rs.get("beta_fast", 32))), 0)
    high = min(math.ceil(corr_dim(rs.get("beta_slow", 1))), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)  # 1 = interpolated (slow dims)
    return freqs / factor * ramp + freqs * (1 - ramp)


def softmax_scale(cfg) -> float:
    s = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rs = dict(cfg.rope_scaling or ())
    if rs.get("type", rs.get("rope_type")) == "yarn" and rs.get("mscale_all_dim"):
        m = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1.0
        s *= m * m
    return s


def rope(x, pos, cfg, interleave: bool):
    """Rotates x [B, T, (H,) R] as complex numbers: pairs (2i, 2i+1) if interleave, else (i, i + R/2)."""
    R = x.shape[-1]
    ang = np.asarray(pos, np.float64)[:, None] * rope_freqs(cfg, R)[None, :]  # [T, R/2]
    ang = ang.reshape(ang.shape[:1] + (1,) * (x.ndim - 3) + ang.shape[1:])
    z = (x[..., 0::2] + 1j * x[..., 1::2]) if interleave else (x[..., : R // 2] + 1j * x[..., R // 2:])
    z = z * np.exp(1j * ang)
    if interleave:
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
        return out
    return np.concatenate([z.real, z.imag], axis=-1)


def hadamard(n: int) -> np.ndarray:
    """Orthonormal Sylvester Hadamard matrix: H[i, j] = (-1)^popcount(i & j) / sqrt(n)."""
    i = np.arange(n)
    bits = np.vectorize(lambda v: bin(v).count("1"))(i[:, None] & i[None, :])
    return np.where(bits % 2, -1.0, 1.0) / math.sqrt(n)


def dense_ffn(p, x):
    return (silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]


def moe_gates(p, x, cfg):
    """Dense gate matrix G [N, E] (zero for unselected experts), with the routing loop written per token.

    Also returns (chosen experts per token, chosen experts without the bias, chosen experts without the
    group restriction), so tests can check that bias and groups actually change the routing."""
    N = x.shape[0]
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    scores = sigmoid(x @ p["router"])
    choice = scores + p["router_bias"]

    def pick(c, grouped):
        allowed = list(range(E))
        if grouped and cfg.n_group > 1:
            gs = E // cfg.n_group
            gscore = [np.sort(c[g * gs:(g + 1) * gs])[-2:].sum() for g in range(cfg.n_group)]
            keep = sorted(range(cfg.n_group), key=lambda g: -gscore[g])[: cfg.topk_group]
            allowed = [e for e in range(E) if e // gs in keep]
        return sorted(sorted(allowed, key=lambda e: -c[e])[:k])

    G = np.zeros((N, E))
    chosen, unbiased, ungrouped = [], [], []
    for n in range(N):
        sel = pick(choice[n], True)
        chosen.append(sel)
        unbiased.append(pick(scores[n], True))
        ungrouped.append(pick(choice[n], False))
        w = scores[n, sel]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        G[n, sel] = w * cfg.routed_scaling_factor
    return G, chosen, unbiased, ungrouped


def moe(p, x, cfg):
    """x [..., D]: every expert on every token, combined with the gate matrix, plus the shared expert."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    G, *_ = moe_gates(p, x, cfg)
    out = np.zeros_like(x)
    for e in range(cfg.n_routed_experts):
        y = (silu(x @ p["w_gate"][e]) * (x @ p["w_up"][e])) @ p["w_down"][e]
        out += G[:, e:e + 1] * y
    if cfg.n_shared_experts:
        out += dense_ffn(p["shared"], x)
    return out.reshape(shape)


# ----------------------------------------------------------------------------------------------------------
# indexer, attention, whole model


def indexer_qkw(p, h, cq, cfg, pos):
    """Indexer queries [B, T, H_I, D_I], keys [B, T, D_I] and head weights [B, T, H_I] (section 1):
    q = W_q c_q, k = LayerNorm(W_k h), RoPE on the first qk_rope_head_dim dims, optional Hadamard rotation,
    w = W_w h * H_I^-1/2 * D_I^-1/2."""
    R, HI, DI = cfg.qk_rope_head_dim, cfg.index_n_heads, cfg.index_head_dim
    q = np.einsum("btq,qhd->bthd", cq, p["wq"])
    q = np.concatenate([rope(q[..., :R], pos, cfg, cfg.indexer_rope_interleave), q[..., R:]], axis=-1)
    k = layer_norm(h @ p["wk"], p["k_norm"]["scale"], p["k_norm"]["bias"])
    k = np.concatenate([rope(k[..., :R], pos, cfg, cfg.indexer_rope_interleave), k[..., R:]], axis=-1)
    if cfg.indexer_hadamard:
        Hm = hadamard(DI)
        q, k = q @ Hm, k @ Hm
    w = (h @ p["w_heads"]) * HI**-0.5 * DI**-0.5
    return q, k, w


def indexer_logits(p, h, cq, cfg, pos):
    """I[b, t, s] = sum_h w[b,t,h] relu(q[b,t,h] . k[b,s]), -inf for s > t (indexcache.md section 1)."""
    q, k, w = indexer_qkw(p, h, cq, cfg, pos)
    I = np.einsum("bth,bths->bts", w, np.maximum(np.einsum("bthd,bsd->bths", q, k), 0.0))
    T = h.shape[1]
    return np.where(np.tril(np.ones((T, T), bool))[None], I, -np.inf)


def topk_sets(I, k):
    """Per (b, t): the set of the min(k, t+1) largest visible logits (lower index wins ties)."""
    B, T, _ = I.shape
    return [[set(np.argsort(-I[b, t, : t + 1], kind="stable")[: min(k, t + 1)].tolist()) for t in range(T)]
            for b in range(B)]


def check_selection(model_idx, I, k, rel_tol=1e-4):
    """Asserts that model indices [B, T, K] are a valid top-k of the float64 logits I [B, T, T].

    Valid: exactly min(k, t+1) non-negative, distinct, causal entries (the rest -1), each selected logit
    >= the k-th largest visible logit - tol, each unselected one <= it + tol (tol = rel_tol * row max):
    the sets agree except for near-ties. Returns (sets, number of rows that differ from the exact top-k).
    """
    model_idx = np.asarray(model_idx)
    B, T, K = model_idx.shape
    assert K == k, f"index tensor has {K} slots, index_topk is {k}"
    exact = topk_sets(I, k)
    sets, n_diff = [], 0
    for b in range(B):
        row_sets = []
        for t in range(T):
            row = model_idx[b, t]
            valid = row[row >= 0]
            want = min(k, t + 1)
            assert len(valid) == want, f"(b={b}, t={t}): {len(valid)} valid indices, expected {want}: {row}"
            assert np.all(row[row < 0] == -1)
            assert len(set(valid.tolist())) == want, f"(b={b}, t={t}): duplicate indices {row}"
            assert valid.max() <= t, f"(b={b}, t={t}): non-causal index in {row}"
            vis = I[b, t, : t + 1]
            thr = np.sort(vis)[::-1][want - 1]
            tol = rel_tol * np.abs(vis).max() + 1e-12
            sel = set(valid.tolist())
            bad_in = [s for s in sel if vis[s] < thr - tol]
            bad_out = [s for s in range(t + 1) if s not in sel and vis[s] > thr + tol]
            assert not bad_in and not bad_out, (
                f"(b={b}, t={t}): model picked {sorted(sel)}, reference top-{want} is {sorted(exact[b][t])}; "
                f"logits {np.round(vis, 6)}")
            n_diff += sel != exact[b][t]
            row_sets.append(sel)
        sets.append(row_sets)
    return sets, n_diff


def mla(p, h, cfg, pos, allowed):
    """Non-absorbed MLA: per head k = [c_kv W_UK ; k_rope], v = c_kv W_UV; softmax over `allowed` [B, T, S]."""
    nope, C = cfg.qk_nope_head_dim, cfg.kv_lora_rank
    cq = rms_norm(h @ p["wq_a"], p["q_norm"]["scale"], cfg.rms_norm_eps)
    q = np.einsum("btq,qhd->bthd", cq, p["wq_b"])
    q = np.concatenate([q[..., :nope], rope(q[..., nope:], pos, cfg, cfg.rope_interleave)], axis=-1)
    kv = h @ p["wkv_a"]
    c_kv = rms_norm(kv[..., :C], p["kv_norm"]["scale"], cfg.rms_norm_eps)
    k_rope = rope(kv[..., C:], pos, cfg, cfg.rope_interleave)
    kvb = np.einsum("bsc,chd->bshd", c_kv, p["wkv_b"])
    H = q.shape[2]
    k = np.concatenate([kvb[..., :nope], np.broadcast_to(k_rope[:, :, None], k_rope.shape[:2] + (H,) + k_rope.shape[2:])],
                       axis=-1)
    v = kvb[..., nope:]
    s = np.einsum("bthd,bshd->bhts", q, k) * softmax_scale(cfg)
    s = np.where(allowed[:, None], s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    pr = e / e.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshv->bthv", pr, v)
    return np.einsum("bthv,hvd->btd", o, p["wo"]), cq


def mask_from_sets(sets, T):
    B = len(sets)
    m = np.zeros((B, T, T), bool)
    for b in range(B):
        for t in range(T):
            m[b, t, list(sets[b][t])] = True
    return m


def model_forward(model, tokens, mode: str, model_indices=None, rel_tol=1e-4):
    """Whole-model float64 forward from the model's parameters.

    mode "dense": causal dense MLA in every layer (indexers ignored).
    mode "dsa": F layers score with their indexer and take the top-k; S layers reuse the last F layer's set.
    With `model_indices` (layer -> [B, T, K] indices the model used), each F layer checks that the model's
    selection is a valid top-k of the float64 logits (`check_selection`) and continues with the model's
    set, so that a near-tie cannot cascade into later layers.
    Returns (logits [B, T, V], per-layer info dicts with "logits" (F layers) and "sets").
    """
    cfg = model.cfg
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    pos = np.arange(T)
    pure = pure_params(model)
    layers = per_layer(model, pure)
    causal = np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T))
    x = pure["embed"][tokens]
    info, cached = [], None
    for l, p in enumerate(layers):
        is_f = model.pattern[l] == "F"
        assert ("indexer" in p) == is_f, f"layer {l}: indexer params present={('indexer' in p)}, pattern {model.pattern}"
        assert ("router" in p["ffn"]) == (l >= cfg.first_k_dense_replace and cfg.n_routed_experts > 0)
        h = rms_norm(x, p["attn_norm"]["scale"], cfg.rms_norm_eps)
        d = {}
        if mode == "dense":
            allowed = causal
        else:
            if is_f:
                cq = rms_norm(h @ p["attn"]["wq_a"], p["attn"]["q_norm"]["scale"], cfg.rms_norm_eps)
                I = indexer_logits(p["indexer"], h, cq, cfg, pos)
                d["logits"] = I
                if model_indices is None:
                    cached = topk_sets(I, cfg.index_topk)
                else:
                    cached, d["n_near_ties"] = check_selection(model_indices[l], I, cfg.index_topk, rel_tol)
            d["sets"] = cached
            allowed = mask_from_sets(cached, T)
        o, _ = mla(p["attn"], h, cfg, pos, allowed)
        x = x + o
        hf = rms_norm(x, p["ffn_norm"]["scale"], cfg.rms_norm_eps)
        x = x + (moe(p["ffn"], hf, cfg) if "router" in p["ffn"] else dense_ffn(p["ffn"], hf))
        info.append(d)
    h = rms_norm(x, pure["final_norm"]["scale"], cfg.rms_norm_eps)
    return h @ pure["lm_head"], info


# ----------------------------------------------------------------------------------------------------------
# pattern layout, independently


def f_group_stages(pattern: str, moe: list[bool]):
    """A valid cut that is not optimised: groups start at each F layer, runs of identical groups merged.
    Returns (kind tags per group, repeats, first layer) per stage."""
    groups, starts = [], []
    for i, c in enumerate(pattern):
        tag = c + ("m" if moe[i] else "d")
        if c == "F":
            groups.append([tag])
            starts.append(i)
        else:
            groups[-1].append(tag)
    out = []
    for g, s in zip(groups, starts):
        if out and out[-1][0] == tuple(g):
            out[-1][1] += 1
        else:
            out.append([tuple(g), 1, s])
    return [tuple(o) for o in out]


def cheapest_cut(pattern: str, moe: list[bool]) -> tuple[int, int]:
    """(layer bodies, stages) of the cheapest cut into repeated groups, by trying every cut (exponential:
    short patterns only). A segment qualifies with group length g if it is its first g tags repeated."""
    tags = [c + ("m" if m else "d") for c, m in zip(pattern, moe)]

    def best(start):
        if start == len(tags):
            return (0, 0)
        options = []
        for end in range(start + 1, len(tags) + 1):
            seg = tags[start:end]
            for g in range(1, len(seg) + 1):
                if len(seg) % g == 0 and seg == seg[:g] * (len(seg) // g):
                    rest = best(end)
                    options.append((rest[0] + g, rest[1] + 1))
        return min(options)

    return best(0)


REF = types.SimpleNamespace(**{name: obj for name, obj in list(globals().items())
                              if name not in ("tiny_cfg", "ref") and not name.startswith(("_", "pytest_"))
                              and isinstance(obj, types.FunctionType) and obj.__module__ == __name__})
