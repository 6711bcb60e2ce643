# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench venv clean

venv: $(STAMP)

# torch 2.14.1 + torchvision 0.29.1 are a matching pair (a registry torchvision beside a
# different torch fails at import); pip takes them from local disk where it can.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[test,s3,download]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/srdiff demo

# Two workers, one per core, each taking whole test files (module fixtures run once); the
# longest files go first (tests/conftest.py) so neither worker is left with a long tail.
test: $(STAMP)
	HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q -rs -n 2 --dist loadfile

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/shards.py
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/gpu.py

clean:
	rm -rf $(VENV) data .pytest_cache
