"""The whole DSA model against float64 references written from the formulas (indexcache.md sections 1, 3).

- with index_topk >= the context, DSA is dense causal MLA (non-absorbed form): checks MLA, RoPE, norms, FFN, MoE;
- an all-F pattern is a plain per-layer DSA forward (indexer, causal top-k, sparse attention);
- an S layer attends over exactly its F layer's indices;
- the traced program holds indexer ops for F layers only;
- the XLA path compiles at 32K tokens without a [T, T] buffer;
- FP8 indexer logits (`indexer_fp8`): XLA == Pallas, and the training losses still differentiate.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ic_jax.model.dsa as model_mod
from ic_jax import ops
from ic_jax.calibration.losses import indexer_loss, lm_loss
from ic_jax.model.attention import Indexer
from ic_jax.model.dsa import DSAModel
from ic_jax.model.pattern import parse_pattern
from ic_jax.model.run_options import RunOptions

T = 24


def make_model(cfg, pattern, seed, ref):
    model = DSAModel(cfg, parse_pattern(pattern, cfg.num_hidden_layers), nnx.Rngs(seed))
    return ref.randomize_constants(model, seed + 1000)


def tokens_for(cfg, seed, batch=2, length=T):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)


@nnx.jit
def forward(model, tokens):
    """The full forward pass's logits, jitted: one compile per model layout (run eagerly, each op and scan compiles
    on its own)."""
    return model.forward(tokens).logits


def assert_logits_close(got, want, rtol=1e-4):
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < rtol, f"max |model - reference| / max |reference| = {err:.3g}"


class IndexRecorder:
    """Wraps `ic_jax.model.dsa.sparse_attention` and records, per layer, the indices it is given.

    Each traced call gets a static number (stage by stage, block position by position: the scan body is
    traced once per stage); a debug callback reports the scan step at run time, which gives the layer id.
    """

    def __init__(self, monkeypatch, model):
        self.model, self.calls, self.seen = model, 0, {}
        self.orig = model_mod.sparse_attention
        monkeypatch.setattr(model_mod, "sparse_attention", self)
        self.slots = [(s, pos) for s in model.stage_specs for pos in range(len(s.kinds))]

    def __call__(self, q_lat, q_rope, kv, k_rope, layer, indices, cfg, opts):
        sid = self.calls
        self.calls += 1

        def record(rep, idx):
            stage, pos = self.slots[sid]
            lid = stage.first_layer + int(rep) * len(stage.kinds) + pos
            assert lid not in self.seen, f"layer {lid} recorded twice"
            self.seen[lid] = np.asarray(idx)

        jax.debug.callback(record, layer, indices)
        return self.orig(q_lat, q_rope, kv, k_rope, layer, indices, cfg, opts)

    def per_layer(self):
        assert self.calls == len(self.slots), f"{self.calls} traced sparse_attention calls for {len(self.slots)} blocks"
        assert sorted(self.seen) == list(range(self.model.cfg.num_hidden_layers))
        return [self.seen[l] for l in range(self.model.cfg.num_hidden_layers)]


# ---------------------------------------------------------------- 2. DSA == dense MLA when top-k covers the context

DENSE_CASES = {
    "tiny": ({}, "FSSFSFFS", T),
    "rope_not_interleaved": (dict(rope_interleave=False, first_k_dense_replace=0), "F" * 8, T + 9),
    "yarn_2dense": (dict(first_k_dense_replace=2, rope_theta=50.0, max_position_embeddings=256,
                         rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                                       "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
                    "FSSS", T),
}


@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_dsa_with_full_topk_is_dense_causal_mla(tiny_cfg, ref, case):
    changes, pattern, topk = DENSE_CASES[case]
    cfg = tiny_cfg.replace(index_topk=topk, **changes)
    model = make_model(cfg, pattern, seed=len(case), ref=ref)
    tok = tokens_for(cfg, seed=len(case))
    want, _ = ref.model_forward(model, tok, mode="dense")
    assert_logits_close(forward(model, jnp.asarray(tok)), want)


def test_dense_reference_is_sensitive(tiny_cfg, ref):
    """Guards the guard: the reference itself changes when the rope layout or a norm scale changes."""
    cfg = tiny_cfg.replace(index_topk=T)
    model = make_model(cfg, "F" * 8, 3, ref)
    tok = tokens_for(cfg, 3)
    a, _ = ref.model_forward(model, tok, mode="dense")
    b, _ = ref.model_forward(model, tok, mode="dsa")  # top-k = T: the same function
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    other = make_model(cfg.replace(rope_interleave=False), "F" * 8, 3, ref)
    c, _ = ref.model_forward(other, tok, mode="dense")
    assert np.abs(a - c).max() > 1e-3 * np.abs(a).max()


# ---------------------------------------------------------------- 3. all-F == per-layer DSA

SPARSE_CASES = {
    "tiny_k4": {},
    "blocked_indexer_k5": dict(index_topk=5),  # run with index_block=7: the lax.map path with a padded last block
    "indexer_rope_interleaved": dict(indexer_rope_interleave=True, rope_interleave=False),
    "no_hadamard_k7": dict(indexer_hadamard=False, index_topk=7, first_k_dense_replace=0),
}


def run_dsa_check(model, tok, ref, monkeypatch, opts=RunOptions()):
    """Runs the jitted forward while recording every layer's indices; checks them (F layers: a valid top-k
    of the float64 indexer logits) and the logits against the float64 DSA reference."""
    rec = IndexRecorder(monkeypatch, model)
    got = nnx.jit(lambda m, t: m.forward(t, opts).logits)(model, jnp.asarray(tok))  # a fresh trace sees the recorder
    idx = rec.per_layer()
    monkeypatch.undo()
    want, info = ref.model_forward(model, tok, mode="dsa", model_indices=idx)
    assert_logits_close(got, want)
    return idx, info, np.asarray(got)


@pytest.mark.parametrize("case", list(SPARSE_CASES))
def test_all_full_is_per_layer_dsa(tiny_cfg, ref, monkeypatch, case):
    cfg = tiny_cfg.replace(**{"index_topk": 4, **SPARSE_CASES[case]})
    model, tok = make_model(cfg, "F" * 8, 10 + len(case), ref), tokens_for(cfg, 10 + len(case))
    opts = RunOptions(index_block=7) if case.startswith("blocked") else RunOptions()
    idx, info, got = run_dsa_check(model, tok, ref, monkeypatch, opts)
    assert sum(d["n_near_ties"] for d in info) <= 2, "too many near-ties for a meaningful test"
    # the sparse result really is sparse: dense attention gives other logits
    dense, _ = ref.model_forward(model, tok, mode="dense")
    assert np.abs(dense - got).max() > 1e-2 * np.abs(dense).max()
    # each layer picks its own keys (adjacent layers do not all agree)
    assert any((a != b).any() for a, b in zip(idx, idx[1:]))


@pytest.mark.parametrize("interleave,hadamard", [(False, True), (True, True), (True, False)])
def test_indexer_values(tiny_cfg, ref, interleave, hadamard):
    """Indexer q, k, w and the logits op, in absolute terms (a positive rescaling of the logits would leave
    every top-k, and so every model output, unchanged)."""
    cfg = tiny_cfg.replace(indexer_rope_interleave=interleave, indexer_hadamard=hadamard, rope_theta=100.0)
    indexer = ref.randomize_constants(Indexer(cfg, nnx.Rngs(40)), 41)
    rng = np.random.default_rng(42)
    h = rng.standard_normal((2, T, cfg.hidden_size)).astype(np.float32)
    cq = rng.standard_normal((2, T, cfg.q_lora_rank)).astype(np.float32)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T))
    k = indexer.keys(jnp.asarray(h), jnp.asarray(pos))
    q, w = indexer.queries(jnp.asarray(h), jnp.asarray(cq), jnp.asarray(pos))
    I = ops.indexer_logits(q, k, w, jnp.asarray(pos), jnp.full((2,), T, jnp.int32), implementation="xla")
    p = ref.pure_params(indexer)
    h64, cq64 = h.astype(np.float64), cq.astype(np.float64)
    q_r, k_r, w_r = ref.indexer_qkw(p, h64, cq64, cfg, np.arange(T))
    I_r = ref.indexer_logits(p, h64, cq64, cfg, np.arange(T))
    for got, want in ((q, q_r), (k, k_r), (w, w_r)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    I = np.asarray(I)
    assert np.array_equal(np.isinf(I), np.isinf(I_r))
    fin = np.isfinite(I_r)
    np.testing.assert_allclose(I[fin], I_r[fin], rtol=1e-4, atol=1e-5 * np.abs(I_r[fin]).max())


# ---------------------------------------------------------------- 4. S layers reuse their F layer's indices

@pytest.mark.parametrize("pattern", ["FSSFSFSS", "FSFSFSFS", "FFSSSSSF"])
def test_shared_layers_use_their_full_layers_indices(tiny_cfg, ref, monkeypatch, pattern):
    cfg = tiny_cfg.replace(index_topk=4)
    seed = 20 + pattern.count("F")
    idx, info, _ = run_dsa_check(make_model(cfg, pattern, seed, ref), tokens_for(cfg, seed), ref, monkeypatch)
    # F layers: checked inside run_dsa_check against a float64 top-k of that layer's own indexer logits
    last_f = None
    for l, c in enumerate(pattern):
        if c == "F":
            last_f = l
            assert "logits" in info[l]
        else:
            np.testing.assert_array_equal(idx[l], idx[last_f], err_msg=f"S layer {l} vs F layer {last_f}")
            assert "logits" not in info[l]
    full = [l for l, c in enumerate(pattern) if c == "F"]
    assert any((idx[a] != idx[b]).any() for a, b in zip(full, full[1:])), "F layers agree: test is vacuous"


def test_shared_layers_would_pick_other_keys(tiny_cfg, ref, monkeypatch):
    """The same weights under all-F and FSSSFSSS: layer 0 agrees, the S layers take layer 0's keys where
    their own indexers (in the all-F model) pick others."""
    cfg = tiny_cfg.replace(index_topk=4)
    full = make_model(cfg, "F" * 8, 31, ref)
    shared = model_mod.repattern(full, "FSSSFSSS")
    tok = tokens_for(cfg, 31)
    idx_f, _, _ = run_dsa_check(full, tok, ref, monkeypatch)
    idx_s, _, _ = run_dsa_check(shared, tok, ref, monkeypatch)
    np.testing.assert_array_equal(idx_f[0], idx_s[0])
    for l in (1, 2, 3):
        np.testing.assert_array_equal(idx_s[l], idx_s[0])
        assert not np.array_equal(idx_f[l], idx_s[l]), f"layer {l}"


# ---------------------------------------------------------------- 5. indexer ops are traced for F layers only

def sub_jaxprs(params):
    for v in params.values():
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x


def flatten(jaxpr, prefix=""):
    """(full name stack, primitive name, eqn) for every equation, recursively."""
    for e in jaxpr.eqns:
        ns = str(e.source_info.name_stack)
        full = "/".join(x for x in (prefix, ns) if x)
        yield full, e.primitive.name, e
        for sub in sub_jaxprs(e.params):
            yield from flatten(sub, full)


def stage_scans(jaxpr, prefix=""):
    """The layer-group scans, in program order: scans outside any layer scope whose body has layer scopes."""
    for e in jaxpr.eqns:
        ns = "/".join(x for x in (prefix, str(e.source_info.name_stack)) if x)
        if "layer_" in ns:
            continue
        subs = list(sub_jaxprs(e.params))
        if e.primitive.name == "scan" and any("layer_" in n for sub in subs for n, _, _ in flatten(sub)):
            yield e, ns
        else:
            for sub in subs:
                yield from stage_scans(sub, ns)


def trace_counts(cfg, pattern):
    model = nnx.eval_shape(lambda: DSAModel(cfg, pattern, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s).forward(t))(
        state, jax.ShapeDtypeStruct((1, 16), jnp.int32)).jaxpr
    per_stage = []
    for eqn, ns in stage_scans(jaxpr):
        (body,) = sub_jaxprs(eqn.params)
        names = [(n, p) for n, p, _ in flatten(body, ns)]
        for n, _ in names:
            parts = n.split("/")
            if "indexer" in parts:
                owner = parts[parts.index("indexer") - 1]
                assert owner.startswith("layer_F"), f"indexer op under {n}"
        assert not any("indexer" in n for n, _ in names if "layer_S" in n)
        per_stage.append(dict(
            indexer_ops=sum("indexer" in n for n, _ in names),
            indexer_topk=sum(p == "top_k" and "indexer" in n for n, p in names),
            s_ops=sum("layer_S" in n for n, _ in names),
            f_ops=sum("layer_F" in n for n, _ in names)))
    outside = [n for n, _, _ in flatten(jaxpr) if "indexer" in n and "layer_" not in n]
    assert not outside, f"indexer ops outside the layer groups: {outside[:3]}"
    return model.stage_specs, per_stage


@pytest.mark.parametrize("first_dense", [1, 0])
def test_indexer_ops_are_traced_for_full_layers_only(tiny_cfg, first_dense):
    cfg = tiny_cfg.replace(first_k_dense_replace=first_dense)
    unit, totals = None, {}
    for pattern in ["F" * 8, "FSSSFSSS", "F" + "S" * 7, "FSFFSSFS"]:
        stages, per_stage = trace_counts(cfg, pattern)
        assert len(per_stage) == len(stages)
        n_f_entries = 0
        for stage, counts in zip(stages, per_stage):
            n_f = sum(k.full for k in stage.kinds)
            n_s = len(stage.kinds) - n_f
            n_f_entries += n_f
            # one top-k per F position in the group: the scan body is traced once, whatever the repeats
            assert counts["indexer_topk"] == n_f, (pattern, stage.describe(), counts)
            assert (counts["s_ops"] > 0) == (n_s > 0)
            if n_f:
                per_f = counts["indexer_ops"] / n_f
                unit = per_f if unit is None else unit
                assert per_f == unit, (pattern, stage.describe(), per_f, unit)
        assert n_f_entries == sum(1 for s in stages for k in s.kinds if k.full)
        totals[pattern] = (sum(c["indexer_ops"] for c in per_stage), n_f_entries)
    assert unit and unit > 20
    for pattern, (ops, n_f) in totals.items():
        assert ops == unit * n_f, (pattern, ops, n_f)
    # F + 7 S: one F entry; FSSSFSSS has as many as its stages have F positions
    assert totals["F" + "S" * 7][1] == 1
    assert totals["FSSSFSSS"][1] == (1 if first_dense == 0 else 2)


# ---------------------------------------------------------------- 8. memory at 32K tokens (compiled, not run)

def test_xla_path_memory_at_32k(tiny_cfg):
    n = 32768
    cfg = tiny_cfg.replace(max_position_embeddings=2 * n)
    model = nnx.eval_shape(lambda: DSAModel(cfg, "FSSSFSSS", nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s).forward(t, RunOptions(implementation="xla")))
    compiled = fn.lower(state, jax.ShapeDtypeStruct((1, n), jnp.int32)).compile()
    stats = compiled.memory_analysis()
    assert stats is not None, "memory_analysis() unavailable on this backend"
    temp = stats.temp_size_in_bytes
    dense_indexer = n * cfg.index_n_heads * n * 4  # one [T, H_I, T] f32 tensor
    dense_logits = n * n * 4  # one [T, T] f32 tensor
    assert 0 < temp < dense_indexer / 8, f"temp {temp / 2**20:.0f} MiB"
    assert temp < dense_logits / 4, f"temp {temp / 2**20:.0f} MiB: close to a dense [T, T] buffer"


# ---------------------------------------------------------------- 9. FP8 indexer logits

def test_fp8_indexer_forward_and_gradients(tiny_cfg):
    """With indexer_fp8 the top-k is scored on FP8 logits: the XLA and Pallas (GPU, interpret) forwards agree,
    and the training loss differentiates (the selection carries no gradient; the KL logits stay bf16)."""
    cfg = tiny_cfg.replace(indexer_fp8=True, index_head_dim=32)  # Hopper fp8 dots contract multiples of 32
    model = DSAModel(cfg, "F" * 8, nnx.Rngs(0))
    tok = jnp.asarray(tokens_for(cfg, 7))
    assert "f8_e4m3fn" in str(jax.make_jaxpr(lambda t: model.forward(t))(tok))
    graphdef, params = nnx.split(model)
    logits = jax.jit(lambda p, opts: nnx.merge(graphdef, p).forward(tok, opts).logits, static_argnums=1)
    xla = logits(params, RunOptions(implementation="xla"))
    assert_logits_close(logits(params, RunOptions(implementation="pallas_gpu", interpret=True)), xla)

    def loss(p):
        logits, aux = nnx.merge(graphdef, p).forward(tok, RunOptions(mode="train", index_block=T))
        return lm_loss(logits, tok) + indexer_loss(aux, "F" * 8)

    grads = jax.tree_util.tree_leaves_with_path(jax.jit(jax.grad(loss))(params))
    assert all(np.isfinite(np.asarray(g)).all() for _, g in grads)
    assert any(np.abs(np.asarray(g)).max() > 0 for path, g in grads if "indexer" in jax.tree_util.keystr(path))
