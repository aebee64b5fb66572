#!/usr/bin/env bash
# Sets up .venv if needed, then runs metarun with the given overrides.
#   bash scripts/run.sh algo=maml dataset=omniglot
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/metarun "$@"
