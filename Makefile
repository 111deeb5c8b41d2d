# Set-up is part of every target: a fresh machine needs only `make bench` or `make test`.
# TORCH_SPEC: the CPU build of torch lies on this machine's disk; a bare `torch` would pull a
# multi-GB CUDA build. On a machine with torch already installed: make TORCH_SPEC= test
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: test bench bench-full bench-layer bench-tradeoffs bench-suite gpu-check check-cuda

$(VENV)/.installed-%: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q '$(TORCH_SPEC)')
	$(PY) -m pip install -q -e '.[$*]'
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest tests -q

bench: $(VENV)/.installed-bench
	$(PY) -m adapterkern.bench

bench-full: $(VENV)/.installed-bench
	$(PY) -m adapterkern.bench --full

bench-layer: $(VENV)/.installed-bench
	$(PY) -m adapterkern.bench layer

bench-tradeoffs: $(VENV)/.installed-bench
	$(PY) -m adapterkern.bench tradeoffs

bench-suite: $(VENV)/.installed-test
	$(PY) -m pytest benchmarks/test_bench_adapter.py

check-cuda: $(VENV)/.installed-test
	PYTHON=$(PY) bash .ci/check_cuda.sh

gpu-check:
	bash benchmarks/gpu_check.sh
