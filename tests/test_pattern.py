"""IndexCache patterns: every accepted spelling, the refusals, and the stage layout (indexcache.md section 3)."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ic_jax.errors import UserError
from ic_jax.model.config import load_config
from ic_jax.model.pattern import PatternError, build_stages, parse_pattern
from ic_jax.package_data import CONFIG_DIR

PATTERNS = CONFIG_DIR / "patterns"

layers = st.integers(1, 100)


@st.composite
def exact_patterns(draw, min_len=1, max_len=100):
    n = draw(st.integers(min_len, max_len))
    return "F" + "".join(draw(st.lists(st.sampled_from("FS"), min_size=n - 1, max_size=n - 1)))


def f_layers(p: str) -> list[int]:
    return [i for i, c in enumerate(p) if c == "F"]


def sglang_rule(n, freq, offset=2):
    """THUDM patch / vLLM: layer i skips its indexer iff max(i - offset + 1, 0) % freq != 0."""
    return [i for i in range(n) if max(i - offset + 1, 0) % freq == 0]


# ---------------------------------------------------------------- exact strings and motifs

@given(exact_patterns())
def test_exact_string_round_trips(p):
    assert parse_pattern(p, len(p)) == p


@given(exact_patterns(max_len=12), st.integers(0, 90), st.sampled_from(["", " ", "\n"]))
def test_motif_is_repeated_and_cut(motif, extra, pad):
    n = len(motif) + extra
    got = parse_pattern(pad + motif + pad, n)
    assert len(got) == n
    assert all(got[i] == motif[i % len(motif)] for i in range(n))


def test_fsss_on_47_layers():
    p = parse_pattern("FSSS", 47)
    assert f_layers(p) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44]
    assert p[44:] == "FSS"  # 47 = 11 * 4 + 3: the last group is cut


def test_empty_or_none_is_all_full():
    assert parse_pattern(None, 5) == "FFFFF"
    assert parse_pattern("", 3) == "FFF"


# ---------------------------------------------------------------- freq / offset (SGLang, vLLM)

@pytest.mark.parametrize("n,count", [(47, 13), (61, 16), (78, 21)])
def test_freq4_counts_from_the_paper(n, count):
    p = parse_pattern("freq:4", n)
    assert f_layers(p)[:5] == [0, 1, 5, 9, 13]
    assert p.count("F") == count


def test_freq4_on_47_layers_exact():
    assert f_layers(parse_pattern("freq:4", 47)) == [0, 1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45]


def test_glm52_offset3():
    p = parse_pattern("freq:4,offset:3", 78)
    assert f_layers(p)[:6] == [0, 1, 2, 6, 10, 14]
    assert all(p[i] == "S" for i in (3, 4, 5, 7, 8, 9))


@given(layers, st.integers(1, 12))
def test_freq_matches_sglang_rule(n, freq):
    assert f_layers(parse_pattern(f"freq:{freq}", n)) == sglang_rule(n, freq)


@given(layers, st.integers(1, 12), st.integers(1, 12))
def test_freq_offset_matches_rule(n, freq, offset):
    p = parse_pattern(f"freq:{freq},offset:{offset}", n)
    assert len(p) == n
    assert f_layers(p) == sglang_rule(n, freq, offset)
    # the rule spelled out: the first `offset` layers, then every freq-th from offset - 1
    assert set(f_layers(p)) == {i for i in range(n) if i < offset or (i - (offset - 1)) % freq == 0}


def test_offset2_is_the_default():
    assert parse_pattern("freq:3,offset:2", 40) == parse_pattern("freq:3", 40)


# ---------------------------------------------------------------- keep:x

@given(layers, st.integers(1, 1000))
def test_keep_uniform(n, milli):
    spec = f"{milli / 1000:.3f}"
    p = parse_pattern(f"keep:{spec}", n)
    assert len(p) == n and set(p) <= {"F", "S"}
    full = f_layers(p)
    want = max(1, round(float(spec) * n))
    assert len(full) == want
    assert full[0] == 0
    # uniform: all gaps (including the wrap-around to the end) differ by at most one
    gaps = [b - a for a, b in zip(full, full[1:])] + [n - full[-1] + full[0]]
    assert max(gaps) - min(gaps) <= 1, (p, gaps)
    assert min(gaps) == n // want


def test_keep_examples():
    assert parse_pattern("keep:1", 6) == "FFFFFF"
    assert parse_pattern("keep:0.5", 6) == "FSFSFS"
    assert parse_pattern("keep:0.25", 8) == "FSSSFSSS"
    assert parse_pattern("keep:.25", 47).count("F") == 12


# ---------------------------------------------------------------- @file.json

_tmp = Path(tempfile.mkdtemp(prefix="ic_jax_pattern_"))


@settings(max_examples=30)
@given(exact_patterns(max_len=80))
def test_pattern_file_round_trip(p):
    f = _tmp / "p.json"
    f.write_text(json.dumps({"pattern": p, "source": "test"}))
    assert parse_pattern(f"@{f}", len(p)) == p


def test_repo_pattern_files_load():
    for name, n in [("glm5_1of4", 78), ("glm47_flash_dsa_1of4", 47)]:
        path = PATTERNS / f"{name}.json"
        p = parse_pattern(f"@{path}", n)
        assert p == json.loads(path.read_text())["pattern"] and p[0] == "F"


@pytest.mark.parametrize("content", ['{"pattern": "FSS"}', '{"pattern": "SFFF"}', '{"pattern": "FXFF"}', "not json",
                                     '{"other": "FFFF"}', '["FFFF"]', '{"pattern": 4}'])
def test_bad_pattern_files_refused(tmp_path, content):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(PatternError):
        parse_pattern(f"@{f}", 4)


def test_missing_pattern_file_refused(tmp_path):
    with pytest.raises(PatternError, match="not found"):
        parse_pattern(f"@{tmp_path / 'nope.json'}", 4)


# ---------------------------------------------------------------- refusals

def test_pattern_error_is_a_user_error():
    assert issubclass(PatternError, UserError)


@given(exact_patterns(max_len=20), st.data())
def test_foreign_characters_refused(p, data):
    bad = data.draw(st.sampled_from("fsXx01 -_.,;DdTt"))
    i = data.draw(st.integers(1, len(p)))
    spec = p[:i] + bad + p[i:]
    spec = spec if spec.strip() == spec else spec + "F"  # keep the bad character inside
    with pytest.raises(PatternError):
        parse_pattern(spec, len(spec))


@given(exact_patterns(max_len=20))
def test_starting_with_s_refused(p):
    spec = "S" + p[1:]
    for n in (len(spec), len(spec) * 3):
        with pytest.raises(PatternError, match="starts with S"):
            parse_pattern(spec, n)


@given(exact_patterns(min_len=2, max_len=30))
def test_longer_than_model_refused(p):
    with pytest.raises(PatternError):
        parse_pattern(p, len(p) - 1)


@pytest.mark.parametrize("spec", ["freq:0", "freq:4,offset:0", "freq:-1", "freq:x", "freq:", "freq:4,offset:",
                                  "freq:4,offset:-2", "freq:2.5", "keep:0", "keep:0.0", "keep:1.5", "keep:-0.5",
                                  "keep:", "keep:abc", "keep:2", "every:4", "FS:SS"])
def test_bad_rules_refused(spec):
    with pytest.raises(PatternError):
        parse_pattern(spec, 16)


# ---------------------------------------------------------------- build_stages

def stage_tuples(stages):
    return [(tuple(k.tag for k in s.kinds), s.repeats, s.first_layer) for s in stages]


def cost(stages):
    return sum(len(s.kinds) for s in stages), len(stages)


def check_layout(pattern, moe, ref):
    stages = build_stages(pattern, moe)
    # every layer exactly once, in order, with the pattern's F/S and the config's dense/MoE
    flat = []
    for s in stages:
        assert s.repeats >= 1
        assert s.first_layer == len(flat)
        for _ in range(s.repeats):
            flat += [(k.full, k.moe) for k in s.kinds]
    assert flat == [(c == "F", m) for c, m in zip(pattern, moe)]
    # never more layer bodies to compile than groups that start at F layers
    assert cost(stages)[0] <= sum(len(g) for g, _, _ in ref.f_group_stages(pattern, moe))
    if len(pattern) <= 10:
        assert cost(stages) == ref.cheapest_cut(pattern, moe)
    return stages


@given(exact_patterns(max_len=60), st.data())
def test_build_stages_random(ref, pattern, data):
    n = len(pattern)
    k_dense = data.draw(st.integers(0, n))
    moe = [i >= k_dense for i in range(n)]
    if data.draw(st.booleans()):
        moe = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    check_layout(pattern, moe, ref)


@settings(max_examples=60)
@given(exact_patterns(max_len=10), st.data())
def test_build_stages_is_the_cheapest_cut(ref, pattern, data):
    moe = data.draw(st.lists(st.booleans(), min_size=len(pattern), max_size=len(pattern)))
    assert cost(build_stages(pattern, moe)) == ref.cheapest_cut(pattern, moe)


def test_build_stages_glm47(ref):
    cfg = load_config("glm47_flash_dsa")
    n = cfg.num_hidden_layers
    moe = [cfg.is_moe(i) for i in range(n)]
    assert moe == [False] + [True] * 46
    # FSSS: layer 0 alone (dense), 44 layers of period 4, two S layers left: 1 + 4 + 1 bodies at best
    assert cost(check_layout(parse_pattern("FSSS", n), moe, ref)) == (6, 3)
    # all MoE: F S S S x 11, then F S S; cheapest: [F S S S] x 11, [F] x 1, [S] x 2
    assert cost(check_layout(parse_pattern("FSSS", n), [True] * n, ref)) == (6, 3)
    assert stage_tuples(check_layout("F" * n, moe, ref)) == [(("Fd",), 1, 0), (("Fm",), 46, 1)]
    # the paper's searched 1/4 pattern: 44 layer bodies when groups start at F layers, under half of that here
    searched = parse_pattern(f"@{PATTERNS / 'glm47_flash_dsa_1of4.json'}", n)
    assert sum(len(g) for g, _, _ in ref.f_group_stages(searched, moe)) == 44
    assert cost(check_layout(searched, moe, ref))[0] <= 22


def test_build_stages_presets_and_freq(ref):
    for name in ("deepseek_v32", "glm5", "glm47_flash_dsa"):
        cfg = load_config(name)
        n = cfg.num_hidden_layers
        moe = [cfg.is_moe(i) for i in range(n)]
        for spec in ("freq:4", "freq:4,offset:3", "keep:0.25", "FSFSSS", None):
            check_layout(parse_pattern(spec, n), moe, ref)


def test_build_stages_refuses_bad_patterns():
    with pytest.raises(PatternError):
        build_stages("SF", [True, True])
    with pytest.raises(PatternError):
        build_stages("FS", [True, True, True])
