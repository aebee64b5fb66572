#!/usr/bin/env bash
# Creates .venv (once) and installs metarun with its test tools and the Hydra launchers
# (tests/test_launchers.py runs them) into it.
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
LAUNCHERS="hydra_plugins.hydra_joblib_launcher, hydra_plugins.hydra_submitit_launcher"
LAUNCHERS="$LAUNCHERS, hydra_plugins.hydra_optuna_sweeper._impl"
if ! .venv/bin/python -c "import metarun, hydra, torch, pytest, $LAUNCHERS" >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[dev,launchers]"
fi
