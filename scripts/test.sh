#!/usr/bin/env bash
# Sets up .venv if needed, then runs the test suite on the real Omniglot.
#   METARUN_DATA=../shared/data bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export METARUN_DATA="${METARUN_DATA:-$(cd .. && pwd)/shared/data}"
exec .venv/bin/python -m pytest "$@"
