#!/usr/bin/env bash
# deepspec train under torchrun: one node or many.
#
# One node, all its GPUs (or N CPU processes with NPROC_PER_NODE=N):
#   launch/torchrun.sh recipe=dspark_qwen3_4b input=runs/r output_dir=runs/dspark_qwen3_4b
# Several nodes: run the same command on every node with
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0 address> MASTER_PORT=29500 launch/torchrun.sh recipe=... ...
# (or use launch/slurm.sbatch, which does this from the SLURM environment).
#
# Every argument is a `deepspec train` override (key=value). DeepSpeed reads LOCAL_RANK
# from the environment: never pass --local_rank (Hydra rejects it).
# Environment: NNODES (1), NODE_RANK (0), NPROC_PER_NODE (GPUs on this node, else 1),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), RDZV_ID (deepspec), DEEPSPEC (deepspec).
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
DEEPSPEC="${DEEPSPEC:-deepspec}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC_PER_NODE="$(nvidia-smi -L | wc -l)"
  else
    NPROC_PER_NODE=1
  fi
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"  # DeepSpeed on CPU: gloo backend
fi
# One OpenMP thread pool per process, sized to the cores it shares with its neighbours.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}"

if [[ "$NNODES" == "1" ]]; then
  RDZV=(--standalone)
else
  RDZV=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --rdzv_backend c10d
        --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-deepspec}")
fi

echo "[torchrun.sh] nodes=$NNODES node_rank=$NODE_RANK procs/node=$NPROC_PER_NODE master=$MASTER_ADDR:$MASTER_PORT" >&2
exec torchrun "${RDZV[@]}" --nproc_per_node "$NPROC_PER_NODE" --no-python "$DEEPSPEC" train "$@"
