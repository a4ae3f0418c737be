# The two commands the README promises: `make benchmark` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: benchmark test venv clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	$(BIN)/python -m pip check
	@touch $(STAMP)

venv: $(STAMP)

benchmark: $(STAMP)
	$(BIN)/diffad benchmark --preset cpu-demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf .diffad .pytest_cache
