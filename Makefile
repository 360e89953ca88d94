# Commands that do all set-up on a fresh machine:
#   make demo   - run the nested bulk-edit demo (django-q2, django.tasks, Celery)
#   make serve  - the sample project in the browser (runserver + qcluster)
#   make test   - run the whole test suite
#   make wheel-check - build the wheel, install it outside the checkout, one project per queue
#   make host-suites - django-tasks-db's, django-q2's and (a slice of) Celery's own test
#                  suites, plain and with otel_taskctx installed; fails on a test that
#                  passes plain only
SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
export UV_LINK_MODE := copy
# a uv on PATH only if it runs (a pyenv shim may name a uv of another Python version)
UV := $(shell uv --version >/dev/null 2>&1 && echo uv || echo .tools/bin/uv)
PYTEST_ARGS ?=

.PHONY: env browser demo serve test lint bench wheel-check host-suites clean

env:
	@# uv missing: install it into a private tool venv (python 3.12, picked by .python-version)
	@if [ "$(UV)" = ".tools/bin/uv" ] && [ ! -x .tools/bin/uv ]; then \
		python3 -m venv .tools && .tools/bin/pip install --quiet uv; fi
	$(UV) sync --frozen

# headless Chromium for the browser tests (tests/browser.py picks it): Playwright's own build,
# or the distribution's chromium whenever that download fails (no access to its download host)
browser: env
	@if out=$$($(UV) run --frozen playwright install chromium 2>&1); then \
		echo "browser: Playwright's chromium"; \
	else \
		echo "browser: Playwright's download failed ($$(printf '%s\n' "$$out" | grep -m1 'Error' || echo 'see playwright install chromium')): using the distribution's chromium"; \
		command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; \
	fi

demo: env
	$(UV) run --frozen python sample/manage.py taskctx_demo $(DEMO_ARGS)
	$(UV) run --frozen python sample/manage.py taskctx_tasks_demo
	$(UV) run --frozen python sample/manage.py taskctx_fan_out_demo
	$(UV) run --frozen python sample/manage.py taskctx_celery_demo

# the sample in the browser: runserver + qcluster (http://127.0.0.1:8000/, Ctrl-C stops both)
serve: env
	$(UV) run --frozen python sample/manage.py taskctx_demo --serve $(DEMO_ARGS)

test: env browser
	$(UV) run --frozen ruff check .
	$(UV) run --frozen pytest $(PYTEST_ARGS)

lint: env
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

# the built wheel in fresh virtualenvs under /tmp (packages from PyPI, not the lock file): a
# minimal project per queue and extra, Django 5.2 LTS too (tests/wheel/run.sh; needs the
# Redis and PostgreSQL of the test stack)
wheel-check: env
	UV=$(UV) bash tests/wheel/run.sh

bench: env
	$(UV) run --frozen python -m tests.benchmarks $(BENCH_ARGS)

# the released sdists of the installed versions (PyPI), cached under .tools/host-suites
# (HOST_SUITES_ARGS="--only django-q2:redis" runs one suite on one broker, "--only celery"
# Celery's task and worker unit tests)
host-suites: env
	UV=$(UV) $(UV) run --frozen python tests/host_suites/run.py $(HOST_SUITES_ARGS)

clean:
	rm -rf .venv .tools
