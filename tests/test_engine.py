"""Prefill/decode against the full forward pass, chunked against one-shot prefill, ragged batches.

The prefill/decode tests run with the XLA ops and with each Pallas backend's kernels in interpret mode;
the reference is always the XLA full forward pass. Compilation is most of the time: the reference is one jitted
forward of a fixed length per model layout, and the Pallas kernels run on the FSSSFSSS layout alone (F and S layers,
dense and MoE), all-F on XLA."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ic_jax.model.cache import IndexedLayerCache
from ic_jax.model.config import load_config
from ic_jax.model.dsa import DSAModel, repattern
from ic_jax.model.run_options import RunOptions
from ic_jax.ops.indexer_logits.reference import quantize_fp8
from ic_jax.runtime.engine import Engine, decode_step
from ic_jax.runtime.sampling import Sampling
from tests.test_model import forward

CFG = load_config("tiny").replace(dtype="float32", index_topk=4)
TOL = dict(rtol=2e-4, atol=2e-4)
IMPLS = {"xla": RunOptions(), "pallas_gpu": RunOptions(implementation="pallas_gpu", interpret=True),
         "pallas_tpu": RunOptions(implementation="pallas_tpu", interpret=True)}


def random_model(pattern, seed=0):
    return DSAModel(CFG, pattern, nnx.Rngs(seed))


REF_LEN = 16  # every reference sequence is right-padded to this length: one compiled forward per model layout


def full_logits(model, seq):
    """The full forward pass's logits at every position of `seq`. The model is causal, so the padding after
    `seq` changes none of them."""
    assert len(seq) <= REF_LEN
    tokens = np.zeros((1, REF_LEN), np.int32)
    tokens[0, :len(seq)] = seq
    return np.asarray(forward(model, jnp.asarray(tokens))[0, :len(seq)])


DECODE_CASES = [("F" * 8, "xla")] + [("FSSSFSSS", impl) for impl in IMPLS]
DECODE_PROMPTS = [3, 7, 10]  # also the chunked-prefill prompts: both tests share the one-shot prefill program


@pytest.mark.parametrize("pattern,impl", DECODE_CASES)
def test_decode_steps_equal_full_forward(pattern, impl):
    model = random_model(pattern, seed=1)
    rng = np.random.default_rng(0)
    prompt_lens, steps = DECODE_PROMPTS, 6
    seqs = [list(rng.integers(0, 256, n + steps)) for n in prompt_lens]
    engine = Engine(model, IMPLS[impl])
    logits, cache, lengths = engine.prefill([s[:n] for s, n in zip(seqs, prompt_lens)], max(prompt_lens) + steps)
    refs = [full_logits(model, s) for s in seqs]
    for b, n in enumerate(prompt_lens):
        np.testing.assert_allclose(np.asarray(logits[b]), refs[b][n - 1], **TOL)
    for i in range(steps):
        token = jnp.asarray([s[n + i] for s, n in zip(seqs, prompt_lens)], jnp.int32)
        _, logits, cache = decode_step(engine.graphdef, engine.params, token, jnp.asarray(lengths + i), cache,
                                       jax.random.key(0), engine.opts, Sampling())
        if i + 1 < steps:
            for b, n in enumerate(prompt_lens):
                np.testing.assert_allclose(np.asarray(logits[b]), refs[b][n + i], **TOL)


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_fp8_key_cache_decode_equals_full_forward(impl):
    """With indexer_fp8 the F layers' keys enter the cache once as e4m3 with a scale per token, and top-k reads
    only that copy: chunked prefill and decode still equal the full forward pass (which fills the same cache)."""
    cfg = CFG.replace(indexer_fp8=True, index_head_dim=32)  # Hopper fp8 dots contract multiples of 32
    model = DSAModel(cfg, "FSSSFSSS", nnx.Rngs(4))
    rng = np.random.default_rng(2)
    prompt_lens, steps = [4, 9], 4
    seqs = [list(rng.integers(0, 256, n + steps)) for n in prompt_lens]
    engine = Engine(model, IMPLS[impl])
    logits, cache, lengths = engine.prefill([s[:n] for s, n in zip(seqs, prompt_lens)], max(prompt_lens) + steps,
                                            chunk_size=3)
    f_caches = [c for stage in cache for c in stage if isinstance(c, IndexedLayerCache)]
    assert sum(c.index_k8.shape[0] for c in f_caches) == 2  # both F layers have an FP8 copy, S layers none
    for f_layer in f_caches:  # the FP8 copy is the quantized bf16 cache, entry for entry
        k8, k_scale = quantize_fp8(f_layer.index_k)
        assert f_layer.index_k8.dtype == jnp.float8_e4m3fn
        np.testing.assert_array_equal(np.asarray(f_layer.index_k8, np.float32), np.asarray(k8, np.float32))
        np.testing.assert_array_equal(np.asarray(f_layer.index_k_scale[..., 0]), np.asarray(k_scale))
    # top-k reads the FP8 copy alone: zeroing the bf16 keys changes nothing below
    cache = [[dataclasses.replace(c, index_k=jnp.zeros_like(c.index_k)) if isinstance(c, IndexedLayerCache) else c
              for c in stage] for stage in cache]
    refs = [full_logits(model, s) for s in seqs]
    for i in range(steps):
        for b, n in enumerate(prompt_lens):
            np.testing.assert_allclose(np.asarray(logits[b]), refs[b][n - 1 + i], **TOL)
        token = jnp.asarray([s[n + i] for s, n in zip(seqs, prompt_lens)], jnp.int32)
        _, logits, cache = decode_step(engine.graphdef, engine.params, token, jnp.asarray(lengths + i), cache,
                                       jax.random.key(0), engine.opts, Sampling())


@pytest.mark.parametrize("chunk,impl", [(3, "xla"), (4, "xla"), (3, "pallas_gpu"), (3, "pallas_tpu")])
def test_chunked_prefill_equals_one_shot(chunk, impl):
    """Index reuse across the chunk boundary: FSSS with chunks smaller than the prompt (the longest takes four
    chunks of 3 or three of 4, the last one partial), prompts ending in different chunks."""
    engine = Engine(random_model("FSSSFSSS", seed=2), IMPLS[impl])
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 256, n)) for n in DECODE_PROMPTS]
    one_logits, one_cache, _ = engine.prefill(prompts, 16)
    ch_logits, ch_cache, _ = engine.prefill(prompts, 16, chunk_size=chunk)
    np.testing.assert_allclose(np.asarray(ch_logits), np.asarray(one_logits), **TOL)
    for b, n in enumerate(DECODE_PROMPTS):
        for a, c in zip(jax.tree.leaves(one_cache), jax.tree.leaves(ch_cache)):
            np.testing.assert_allclose(np.asarray(c[:, b, :n]), np.asarray(a[:, b, :n]), **TOL)


def test_greedy_generate_matches_argmax_of_forward():
    model = random_model("FSSSFSSS", seed=3)
    prompt = [5, 17, 99, 3]
    out, stats = Engine(model).generate([prompt], 5, chunk_size=3)
    seq = list(prompt)
    for _ in range(5):
        seq.append(int(np.argmax(full_logits(model, seq)[-1])))
    assert out[0] == seq[len(prompt):]
    assert stats.new_tokens == 5 and stats.prompt_tokens == 4


def test_patterns_share_weights_but_s_layers_change_the_output():
    """Sanity of the comparison above: a reuse pattern must differ from all-F when top-k is sparse."""
    full = random_model("F" * 8, seed=4)
    shared = repattern(full, "FSSSSSSS")
    tokens = list(np.random.default_rng(2).integers(0, 256, 16))
    diff = np.abs(full_logits(full, tokens) - full_logits(shared, tokens))
    assert diff[:4].max() < 1e-5  # top-k >= visible keys: every layer sees everything
    assert diff[8:].max() > 1e-3
