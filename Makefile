# make demo: set up .venv (if missing) and generate with the embedded default model.
# make test: set up .venv (if missing) and run the whole test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_MODEL := $(if $(wildcard ic_jax/checkpoints/default/config.json),--ckpt ic_jax/checkpoints/default,--config tiny --init random)

.PHONY: demo test bench-kernels bench-e2e clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "ic_jax needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

demo: $(VENV)/.installed
	$(PY) -m ic_jax.generate $(DEMO_MODEL) --prompt "$$(printf 'import os\n\ndef fibonacci(n):\n    ')" \
	  --max-new-tokens 200 --temperature 0.7 --top-k 20 --seed 0 --layout --warmup

test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=25

bench-kernels: $(VENV)/.installed
	$(PY) -m ic_jax.bench kernels

bench-e2e: $(VENV)/.installed
	$(PY) -m ic_jax.bench e2e

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
