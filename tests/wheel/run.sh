#!/usr/bin/env bash
# make wheel-check: build the wheel, install it into fresh virtualenvs OUTSIDE the checkout
# (packages from PyPI, nothing from the lock file) and run the minimal project
# tests/wheel/project there once per queue: django.setup() and `manage.py check`, migrate,
# then `manage.py nested_job` (a job whose nested launches, one from a pool thread, must run
# inline under the job's key). Scenarios (extras + pins, services):
#   powercrud  [powercrud,redis,otlp]   newest Django the ranges allow, a sync django-q2 cluster,
#                                       the cache on Redis (127.0.0.1:6379)
#   django-q2  [django-q2,postgres]     django-q2 without powercrud, on PostgreSQL
#                                       (127.0.0.1:5432, a database of its own, dropped after)
#   tasks      [tasks]                  django.tasks + django-tasks-db, a real db_worker, SQLite
#   celery     [celery,redis]           a Celery worker (solo pool), its broker on Redis; Celery
#                                       5.4, the lowest the range allows (the lock has the newest)
#   django52   [powercrud,redis]        Django 5.2 LTS (no django.tasks), django-q2 1.10 (the
#                                       lowest the ranges allow), the cache on Redis
# WHEEL_SCENARIOS="powercrud tasks" runs a subset; WHEEL_KEEP=1 keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
UV=${UV:-uv}
export UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy
# the interpreter of the checkout's .venv (make env), else any Python 3.12
PYTHON=${WHEEL_PYTHON:-}
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=3.12; fi
fi
SCENARIOS=${WHEEL_SCENARIOS:-"powercrud django-q2 tasks celery django52"}

REDIS_URL=${WHEEL_REDIS_URL:-redis://127.0.0.1:6379/15}
PG_DB=otel_taskctx_wheel_$$
WORK=$(mktemp -d /tmp/otel-taskctx-wheel.XXXXXX)
# the Redis keys of this run (locks, progress, Celery's queue) are its own, deleted at the end
export WHEEL_CACHE_PREFIX=${WORK##*/}
cleanup() {
    dropdb --if-exists -h 127.0.0.1 -U postgres "$PG_DB" 2>/dev/null || true
    for pattern in "$WHEEL_CACHE_PREFIX:*" "_kombu.binding*.$WHEEL_CACHE_PREFIX:*"; do
        redis-cli -u "$REDIS_URL" --scan --pattern "$pattern" 2>/dev/null |
            xargs -r redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
    done
    if [ -z "${WHEEL_KEEP:-}" ]; then rm -rf "$WORK"; else echo "kept $WORK"; fi
}
trap cleanup EXIT
start=$SECONDS

echo "=== build the wheel"
"$UV" build --python "$PYTHON" --wheel --quiet --out-dir "$WORK/dist" "$ROOT"
WHEEL=$(ls "$WORK"/dist/otel_taskctx-*.whl)
echo "$(basename "$WHEEL")"

scenario() {  # name queue extra [VAR=value...] [pins...]
    local name=$1 queue=$2 extra=$3 settings=()
    shift 3
    while [ $# -gt 0 ] && [[ $1 == WHEEL_*=* ]]; do settings+=("$1"); shift; done
    local dir="$WORK/$name" t0=$SECONDS
    echo "=== $name: otel-taskctx[$extra] $* (queue $queue)"
    "$UV" venv --quiet --python "$PYTHON" "$dir/venv"
    "$UV" pip install --quiet --python "$dir/venv/bin/python" "$WHEEL[$extra]" "$@"
    cp -r "$ROOT/tests/wheel/project" "$dir/project"
    (
        cd "$dir/project"
        export WHEEL_QUEUE=$queue DJANGO_SETTINGS_MODULE=site_settings PYTHONPATH=
        for setting in "${settings[@]}"; do export "${setting?}"; done
        py="$dir/venv/bin/python"
        # the installed wheel, not the checkout, is what runs; every module of it imports
        # with only this scenario's optional packages installed
        "$py" -c "import django, importlib, pkgutil, otel_taskctx, opentelemetry.instrumentation.taskctx as i
django.setup()
for package in (otel_taskctx, i):
    assert package.__file__.startswith('$dir/venv/'), package.__file__
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):
        importlib.import_module(module.name)
print('django', django.get_version(), 'otel_taskctx from', otel_taskctx.__file__)"
        if [[ $extra == *otlp* ]]; then
            "$py" -c "from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter"
        fi
        "$py" manage.py check --fail-level WARNING
        "$py" manage.py migrate --verbosity 0
        "$py" manage.py createcachetable
        "$py" manage.py nested_job
    )
    echo "--- $name: $((SECONDS - t0)) s"
}

run() {  # one scenario, errexit intact (a function called in a condition would lose it)
    local name=$1
    case $name in
        powercrud) scenario powercrud powercrud powercrud,redis,otlp WHEEL_REDIS_URL="$REDIS_URL" ;;
        django-q2)
            createdb -h 127.0.0.1 -U postgres "$PG_DB"
            scenario django-q2 django-q2 django-q2,postgres WHEEL_PG_DB="$PG_DB"
            ;;
        tasks) scenario tasks tasks tasks ;;
        celery) scenario celery celery celery,redis WHEEL_REDIS_URL="$REDIS_URL" "celery==5.4.*" ;;
        django52)
            scenario django52 powercrud powercrud,redis WHEEL_REDIS_URL="$REDIS_URL" \
                "django>=5.2,<6" "django-q2==1.10.*"
            ;;
        *) echo "unknown scenario $name" >&2; exit 2 ;;
    esac
}

failed=()
for name in $SCENARIOS; do
    (run "$name") &
    wait $! || failed+=("$name")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "wheel check FAILED: ${failed[*]} (of $SCENARIOS) in $((SECONDS - start)) s" >&2
    exit 1
fi
echo "wheel check passed ($SCENARIOS) in $((SECONDS - start)) s"
