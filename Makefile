# Two entry points: `make run` (the main job) and `make test` (the whole suite).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install clean bench

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Re-install only when the dependency declarations change.
$(STAMP): $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install --disable-pip-version-check -q -c requirements.lock -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/rsir data fetch ml-100k
	$(BIN)/rsir run --dataset ml-100k --model sasrec -K 3

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf $(VENV) workspace .pytest_cache
