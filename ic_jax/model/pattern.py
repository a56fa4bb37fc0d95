"""IndexCache patterns: which layers run the indexer (F) and which reuse the last F layer's indices (S).

Five spellings are accepted by `parse_pattern`:
  FSFSSS...       one character per layer
  FSSS            a shorter motif, repeated and cut to the layer count
  freq:4          SGLang/vLLM `index_topk_freq` (offset 2): layer i is S iff max(i - 1, 0) % 4 != 0
  freq:4,offset:3 `index_skip_topk_offset`: layer i is S iff max(i - offset + 1, 0) % freq != 0
  keep:0.25       uniform spacing keeping round(0.25 * N) indexers, layer 0 first
  @file.json      a JSON file with a "pattern" key (what `ic_jax.search` writes)

A pattern compiles to `Stage`s: the layers are cut into consecutive stages, each a layer group (a tuple of
F/S + dense/MoE kinds) repeated and scanned over stacked weights. Compile time grows with the number of
layer bodies traced (the sum of the group lengths), so `build_stages` picks the cut with the fewest, then
the fewest stages. A group may start with S layers: the top-k indices flow from stage to stage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

from ic_jax.errors import UserError
from ic_jax.files import read_text
from ic_jax.package_data import shipped_path


class PatternError(UserError):
    pass


def check_pattern(pattern: str, num_layers: int) -> str:
    bad = sorted(set(pattern) - {"F", "S"})
    if bad:
        raise PatternError(f"pattern {pattern!r} has characters {''.join(bad)!r}; use only F (full) and S (shared)")
    if not pattern:
        raise PatternError("pattern is empty; give at least 'F'")
    if pattern[0] != "F":
        raise PatternError(f"pattern {pattern!r} starts with S; layer 0 has no earlier indexer to share, start with F")
    if len(pattern) != num_layers:
        raise PatternError(f"pattern has {len(pattern)} layers but the model has {num_layers}; give {num_layers} "
                           f"characters or a shorter motif")
    return pattern


def freq_pattern(num_layers: int, freq: int, offset: int = 2) -> str:
    return "".join("S" if max(i - offset + 1, 0) % freq else "F" for i in range(num_layers))


def keep_pattern(num_layers: int, keep: float) -> str:
    n_full = max(1, round(keep * num_layers))
    full = {(j * num_layers) // n_full for j in range(n_full)}
    return "".join("F" if i in full else "S" for i in range(num_layers))


def parse_pattern(spec: str | None, num_layers: int) -> str:
    """Turns any accepted spelling (see module docstring) into one F/S character per layer."""
    if spec is None or spec == "":
        return "F" * num_layers
    spec = spec.strip()
    if spec.startswith("@"):
        return check_pattern(load_pattern_file(spec[1:]), num_layers)
    m = re.fullmatch(r"freq:(\d+)(?:,offset:(\d+))?", spec)
    if m:
        freq, offset = int(m[1]), int(m[2] or 2)
        if freq < 1 or offset < 1:
            raise PatternError(f"{spec!r}: freq and offset must be >= 1")
        return check_pattern(freq_pattern(num_layers, freq, offset), num_layers)
    m = re.fullmatch(r"keep:([0-9]*\.?[0-9]+)", spec)
    if m and 0 < float(m[1]) <= 1:
        return keep_pattern(num_layers, float(m[1]))
    if ":" in spec:
        raise PatternError(f"{spec!r} is not understood; write freq:N, freq:N,offset:M or keep:X with 0 < X <= 1")
    if len(spec) > num_layers:
        raise PatternError(f"pattern has {len(spec)} characters but the model has only {num_layers} layers")
    check_pattern(spec, len(spec))
    return (spec * math.ceil(num_layers / len(spec)))[:num_layers]


def load_pattern_file(path: str) -> str:
    p = shipped_path(path)
    if not p.is_file():
        raise PatternError(f"pattern file {path!r} not found")
    try:
        data = json.loads(read_text(p, f"pattern file {path!r}"))
    except json.JSONDecodeError as e:
        raise PatternError(f"pattern file {path!r} is not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("pattern"), str):
        raise PatternError(f"pattern file {path!r} needs a string field \"pattern\"")
    return data["pattern"]


@dataclasses.dataclass(frozen=True)
class LayerKind:
    full: bool  # runs its own indexer
    moe: bool  # MoE FFN (else dense SwiGLU)

    @property
    def tag(self) -> str:
        return ("F" if self.full else "S") + ("m" if self.moe else "d")


@dataclasses.dataclass(frozen=True)
class Stage:
    """`repeats` copies of one layer group, scanned over weights stacked on a leading axis."""

    kinds: tuple[LayerKind, ...]
    repeats: int
    first_layer: int

    @property
    def num_layers(self) -> int:
        return len(self.kinds) * self.repeats

    def layer_id(self, rep: int, pos: int) -> int:
        return self.first_layer + rep * len(self.kinds) + pos

    def describe(self) -> str:
        body = " ".join(k.tag for k in self.kinds)
        last = self.first_layer + self.num_layers - 1
        where = f"layer {last}" if last == self.first_layer else f"layers {self.first_layer}-{last}"
        return f"[{body}] x{self.repeats} ({where})"


def build_stages(pattern: str, moe_layers: list[bool]) -> tuple[Stage, ...]:
    """The cut into stages with the fewest traced layer bodies, then the fewest stages (dynamic programming
    over prefixes: best[i] is the cheapest cut of layers 0..i-1)."""
    check_pattern(pattern, len(moe_layers))
    kinds = [LayerKind(full=c == "F", moe=m) for c, m in zip(pattern, moe_layers)]
    n = len(kinds)
    best: list[tuple[int, int, int, int] | None] = [(0, 0, 0, 0)] + [None] * n  # (bodies, stages, start, period)
    for j in range(n):
        for period in range(1, n - j + 1):
            reach = j + period  # layers j..reach-1 repeat with this period
            while reach < n and kinds[reach] == kinds[reach - period]:
                reach += 1
            for i in range(j + period, reach + 1, period):
                cand = (best[j][0] + period, best[j][1] + 1, j, period)
                if best[i] is None or cand[:2] < best[i][:2]:
                    best[i] = cand
    stages, i = [], n
    while i:
        _, _, j, period = best[i]
        stages.append(Stage(kinds=tuple(kinds[j:j + period]), repeats=(i - j) // period, first_layer=j))
        i = j
    return tuple(reversed(stages))


def describe_layout(pattern: str, moe_layers: list[bool]) -> str:
    n = len(pattern)
    full = [i for i, c in enumerate(pattern) if c == "F"]
    stages = build_stages(pattern, moe_layers)
    lines = [
        f"pattern   {pattern}",
        f"indexers  {len(full)} of {n} layers run the indexer ({100 * len(full) / n:.1f}%); "
        f"{n - len(full)} reuse the previous F layer's top-k",
        f"F layers  {', '.join(map(str, full))}",
        f"stages    {len(stages)} scanned stage(s), {sum(len(s.kinds) for s in stages)} layer bodies to compile; "
        "F/S + d(ense)/m(oe) per group:",
    ]
    lines += [f"          {s.describe()}" for s in stages]
    return "\n".join(lines)
