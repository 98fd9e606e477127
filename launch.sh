#!/usr/bin/env bash
# Launch training under torchrun: one node by default, several through the environment.
#
#   ./launch.sh CONFIG [section.key=value ...]
#
# Environment (all optional):
#   NPROC_PER_NODE  processes on this node (default: GPUs if any, else distributed.nproc_per_node or 2)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's rank (default 0; under Slurm: $SLURM_NODEID)
#   MASTER_ADDR / MASTER_PORT   rendezvous host and port (default 127.0.0.1:29500;
#                   under Slurm the first host of $SLURM_JOB_NODELIST)
#   RDZV_ENDPOINT   host:port of a c10d rendezvous instead of MASTER_ADDR/PORT
#   RDZV_ID         job id for the rendezvous (default: $SLURM_JOB_ID or "mqsa-ted")
# A rank that fails makes torchrun stop the others and exit non-zero with that rank's error.
set -euo pipefail
cd "$(dirname "$0")"
if [ $# -lt 1 ]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if [ -n "${SLURM_JOB_ID:-}" ]; then
  NNODES=${NNODES:-${SLURM_NNODES:-1}}
  NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  if [ "${GPUS:-0}" -gt 0 ]; then
    NPROC_PER_NODE=$GPUS
  else
    NPROC_PER_NODE=$("$PY" -c "import sys; from core.config import load_config; print(load_config(sys.argv[1], sys.argv[2:]).distributed.nproc_per_node)" "$@")
  fi
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-$MASTER_ADDR:$MASTER_PORT}
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec "$PY" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --node_rank="$NODE_RANK" \
  --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-mqsa-ted}}" \
  -m trainer.train "$@"
