#!/usr/bin/env bash
# The demo command (README): install, then synthesize -> train -> evaluate -> predict -> report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hemaseg demo "$@"
