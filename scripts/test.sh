#!/usr/bin/env bash
# Sets up .venv if needed (with learn2learn, for the comparison tests), then runs the
# test suite on the real Omniglot.
#   METARUN_DATA=../shared/data bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHON=.venv/bin/python bash scripts/install_learn2learn.sh  # a no-op once installed
export METARUN_DATA="${METARUN_DATA:-$(cd .. && pwd)/shared/data}"
exec .venv/bin/python -m pytest "$@"
