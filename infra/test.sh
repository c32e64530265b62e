#!/usr/bin/env bash
# Runs the test suite. Starts or installs what the tests need and is missing: Redis on 127.0.0.1:6379,
# headless Chromium (Debian's packages).
# (The tests start their own S3 server, worker processes and Flower.) Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null && break; sleep 0.1; done
fi
# Headless Chromium for the tests that load the results pages as users do.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
fi
# The import contracts of pyproject.toml (layers one way, no cycles) and the linter, before the tests.
.venv/bin/lint-imports
.venv/bin/ruff check
set +e
.venv/bin/python -m pytest -ra --durations=30 "$@"
rc=$?
[ "$rc" -eq 5 ] && { echo "no tests ran"; exit 1; }
exit "$rc"
