#!/usr/bin/env bash
# The test command (README and CI): install, then run the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Browser tests drive Debian's chromium through Playwright (never a browser build of Playwright's own).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } >/dev/null \
    || echo "warning: could not install chromium; the browser tests will try again, then skip (fail under CI)" >&2
fi
exec .venv/bin/python -m pytest -q "$@"
