"""Time building, lowering and compiling one prefill chunk of a preset for several patterns, on abstract
parameters (no weights are allocated, so the 30B shape fits on any machine).

    python scripts/compile_time.py [--config glm47_flash_dsa] [--tokens 256] F FSSS @configs/patterns/glm47_flash_dsa_1of4.json
"""

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from ic_jax.model.config import load_config
from ic_jax.model.dsa import DSAModel
from ic_jax.model.pattern import parse_pattern
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.engine import prefill_chunk


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("patterns", nargs="+", help="pattern specs (any --pattern spelling)")
    p.add_argument("--config", default="glm47_flash_dsa", help="preset or config JSON (default glm47_flash_dsa)")
    p.add_argument("--tokens", type=int, default=256, help="tokens in the prefill chunk (default 256)")
    a = p.parse_args()
    cfg = load_config(a.config)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {a.config}, chunk {a.tokens}")
    for spec in a.patterns:
        pattern = parse_pattern(spec, cfg.num_hidden_layers)
        t0 = time.perf_counter()
        model = nnx.eval_shape(lambda: DSAModel(cfg, pattern, nnx.Rngs(0)))
        graphdef, params = nnx.split(model)
        cache = jax.eval_shape(lambda: model.init_cache(1, a.tokens))
        tokens = jax.ShapeDtypeStruct((1, a.tokens), jnp.int32)
        t1 = time.perf_counter()
        lowered = prefill_chunk.lower(graphdef, params, tokens, tokens, cache, jax.ShapeDtypeStruct((1,), jnp.int32),
                                      RunOptions())
        t2 = time.perf_counter()
        lowered.compile()
        t3 = time.perf_counter()
        stages = model.stage_specs
        print(f"{spec[:40]:<40} stages {len(stages):>2}, bodies {sum(len(s.kinds) for s in stages):>2}: "
              f"build {t1 - t0:.1f} s, lower {t2 - t1:.1f} s, compile {t3 - t2:.1f} s", flush=True)


if __name__ == "__main__":
    main()
