# Two entry points: `make run` (the main job) and `make test` (the whole suite).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install clean bench browser

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Re-install only when the dependency declarations change.
$(STAMP): $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install --disable-pip-version-check -q -c requirements.lock -e ".[dev,dist,ann]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/rsir data fetch ml-100k
	$(BIN)/rsir run --dataset ml-100k --model sasrec -K 3

# Lint first (pyflakes rules and import order, [tool.ruff] in pyproject.toml; `ruff check --fix`
# sorts imports), then the suite.
test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The UI tests drive Debian's chromium (Playwright never downloads a browser here). Installed where
# we may (root with apt-get); elsewhere those tests skip with the reason, and CI fails on such a skip.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the UI tests (log: .venv/chromium-install.log)"; \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
	      > $(VENV)/chromium-install.log 2>&1 || echo "chromium install failed; see $(VENV)/chromium-install.log"; \
	  else echo "chromium is not installed and this user cannot install it: the UI tests will skip"; fi; }

bench: $(STAMP)
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf $(VENV) workspace .pytest_cache .ruff_cache
