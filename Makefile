# Two commands do everything from a clean clone: `make demo` (main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,vision,video,eval,demo,triton
# what only the tests need on top (lmms-eval and its ~100 dependencies stay out of the demo's install)
TEST_EXTRAS ?= lmms

# the oldest transformers pyproject admits (its lower bound): `make test-oldest` runs the suite on it too
OLDEST_TRANSFORMERS := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
OLDEST_VENV ?= .venv-oldest

.PHONY: setup test test-oldest demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, at the versions the project is tested with (a CPU machine runs the CUDA build on CPU)
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -e ".[$(EXTRAS),$(TEST_EXTRAS)]"
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

# A copy of the venv with only transformers swapped for the oldest supported release.
test-oldest: $(VENV)/.installed-test
	rm -rf $(OLDEST_VENV)
	cp -a $(VENV) $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q "transformers==$(OLDEST_TRANSFORMERS)"
	$(OLDEST_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(OLDEST_VENV)/bin/python -m pytest -q

# Serves the Gradio demo on http://127.0.0.1:7860 until Ctrl+C (toy model; DEMO_ARGS="--model DIR" for another).
demo: setup
	$(PY) -m tokreduce.cli demo $(DEMO_ARGS)

bench: setup
	$(PY) scripts/bench_methods.py

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build *.egg-info .pytest_cache
