# Two commands do all set-up on a fresh machine:
#   make demo   - run the nested bulk-edit demo
#   make test   - run the whole test suite
SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
export UV_LINK_MODE := copy
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
PYTEST_ARGS ?=

.PHONY: env browser demo test lint bench clean

$(UV):
	@# uv is missing: install it into a private tool venv (python 3.12 via .python-version)
	python3 -m venv .tools
	.tools/bin/pip install --quiet uv

env: $(UV)
	$(UV) sync --frozen

# headless Chromium for the browser tests (Debian package; Playwright drives /usr/bin/chromium)
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: env
	$(UV) run --frozen python -m otel_taskctx.demo $(DEMO_ARGS)

test: env browser
	$(UV) run --frozen ruff check .
	$(UV) run --frozen pytest $(PYTEST_ARGS)

lint: env
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

bench: env
	$(UV) run --frozen python -m tests.benchmarks $(BENCH_ARGS)

clean:
	rm -rf .venv .tools
