#!/usr/bin/env bash
# One vLLM feature server on this node: the target's hidden states for deepspec's feature stage.
#
#   launch/vllm_features.sh MODEL_DIR STORAGE_DIR recipe=NAME [overrides] [-- vLLM flags]
#   e.g. launch/vllm_features.sh /models/DeepSeek-V4-Flash /shared/hs recipe=dspark_v4_flash \
#          -- --tensor-parallel-size 8 --enable-expert-parallel
#
# Starts vLLM's OpenAI server (`extract_hidden_states` + deepspec's connector, which writes each
# request's hidden states to STORAGE_DIR) for exactly the recipe's taps + the final state; the vLLM
# layer ids come from data_tools/vllm_features.py (deepspec layer k is vLLM id k+1). STORAGE_DIR must be a
# folder the feature client (`deepspec data features features.source=vllm features.vllm_urls=[...]`) or the
# trainer (features.source=vllm) also sees. Environment: DEEPSPEC_VLLM_VENV (vLLM's own venv: it pins its
# own torch/transformers), DEEPSPEC_PYTHON (deepspec's python, composes the recipe), PORT (8000).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { sed -n 2,14p "$0"; exit 2; }
MODEL="$1"; STORAGE="$2"; shift 2
VLLM_PY="${DEEPSPEC_VLLM_VENV:-.venv-vllm}/bin/python"
mkdir -p "$STORAGE"
cmd=$("${DEEPSPEC_PYTHON:-python}" -m data_tools.vllm_features --model "$MODEL" --storage "$STORAGE" \
      --port "${PORT:-8000}" --python "$VLLM_PY" "$@")
echo "[vllm_features.sh] $(hostname): $cmd"
export PYTHONPATH="$PWD/data_tools/vllm_plugin${PYTHONPATH:+:$PYTHONPATH}"  # vLLM imports the connector from here
eval exec "$cmd"
