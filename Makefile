# Two commands do everything from a clean clone: `make demo` (main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,vision,video,eval,demo,triton

.PHONY: setup test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, at the versions the project is tested with (a CPU machine runs the CUDA build on CPU)
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

# Serves the Gradio demo on http://127.0.0.1:7860 until Ctrl+C (toy model; DEMO_ARGS="--model DIR" for another).
demo: setup
	$(PY) -m tokreduce.cli demo $(DEMO_ARGS)

bench: setup
	$(PY) scripts/bench_methods.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
