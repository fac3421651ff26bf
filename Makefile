# The two commands of the README. Each creates .venv (if missing) and installs into it.
#   make test   install with test extras, run the CPU suite (GPU tests are marked `gpu`)
#   make demo   install, run the main job
# MSA_JAX_CUDA=AUTO|ON|OFF chooses whether the CUDA extension is built (see cuda/README.md);
# these targets default to OFF: the CPU suite and demo do not use it, and CI builds it
# separately, as a user's `pip install` does (.ci/wheel_check.sh).
PYTHON ?= python3
VENV ?= .venv
MSA_JAX_CUDA ?= OFF
# Two workers: the 2-core CI machine is otherwise ~1.3 cores busy.
PYTEST_ARGS ?= -m "not gpu" -n 2

.PHONY: install test demo clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip

install: $(VENV)/bin/python
	MSA_JAX_CUDA=$(MSA_JAX_CUDA) $(VENV)/bin/python -m pip install --quiet -e ".[test,examples,hf]"

test: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/python benchmarks/demo.py
	rm -rf build/demo_ckpt
	$(VENV)/bin/python examples/flax_model/train.py --preset cpu --steps 60 --warmup-steps 20 --ckpt-dir build/demo_ckpt
	$(VENV)/bin/python examples/flax_model/generate.py --ckpt-dir build/demo_ckpt --prompt "def " --max-new-tokens 80 --temperature 0.7 --top-k 20

clean:
	rm -rf $(VENV) build
