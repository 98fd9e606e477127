#!/usr/bin/env bash
# Launch training under torchrun: one node by default, several through the environment.
#
#   ./launch.sh CONFIG [section.key=value ...]
#
# Environment (all optional):
#   NPROC_PER_NODE  processes on this node (default: the GPUs torch sees, else
#                   distributed.nproc_per_node)
#   DS_ACCELERATOR  cuda or cpu (default: cuda when torch sees a GPU;
#                   trainer.runtime.distributed decides)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's rank (default 0; under Slurm: $SLURM_NODEID)
#   MASTER_ADDR / MASTER_PORT   rendezvous host and port, on node 0 (default 127.0.0.1:29500;
#                   under Slurm the first host of $SLURM_JOB_NODELIST)
#   RDZV_ENDPOINT   host:port of a c10d rendezvous instead of MASTER_ADDR/PORT
#   RDZV_ID         job id for the rendezvous (default: $SLURM_JOB_ID or "mqsa-ted")
#   RDZV_TIMEOUT    seconds the nodes wait for each other (default 60 on one node, 600 on several)
# The config is checked before torchrun starts (a bad setting: one "error:" line, exit 2), and a
# rendezvous port already in use on node 0 is refused at once. A rank that fails makes torchrun stop
# the others and exit non-zero with that rank's error; killing this script (torchrun) ends the ranks.
set -euo pipefail
cd "$(dirname "$0")"
if [ $# -lt 1 ]; then
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0" >&2
  exit 2
fi
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

# Checks every setting (light imports only) and reads the process count in one go.
CONFIG_NPROC=$("$PY" -m mqsa_core.config "$1" distributed.nproc_per_node --set "${@:2}") || exit 2

if [ -n "${SLURM_JOB_ID:-}" ]; then
  NNODES=${NNODES:-${SLURM_NNODES:-1}}
  NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-$MASTER_ADDR:$MASTER_PORT}
if [ "$NNODES" -gt 1 ]; then RDZV_TIMEOUT=${RDZV_TIMEOUT:-600}; else RDZV_TIMEOUT=${RDZV_TIMEOUT:-60}; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# Node 0 hosts the rendezvous store when the endpoint is on this machine (the other nodes only
# connect). If its port is taken (another job?), torchrun would join that job's store and wait
# silently: refuse at once, before anything imports torch (mqsa_ted/rendezvous.py, shared with
# `mqsa-ted train --nproc`). An endpoint elsewhere is left to torchrun's own host choice.
HOST_CONF=$("$PY" -m mqsa_ted.rendezvous "$RDZV_ENDPOINT" "$NODE_RANK") || exit 2

if [ -z "${NPROC_PER_NODE:-}" ]; then
  # One process per GPU that torch sees (what trainer.runtime.distributed.accelerator trains
  # on), unless DS_ACCELERATOR=cpu; else the config's distributed.nproc_per_node.
  GPUS=0
  if [ "${DS_ACCELERATOR:-}" != cpu ]; then
    GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  fi
  if [ "${GPUS:-0}" -gt 0 ]; then NPROC_PER_NODE=$GPUS; else NPROC_PER_NODE=$CONFIG_NPROC; fi
fi

exec "$PY" -m mqsa_ted.torchrun \
  --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --node_rank="$NODE_RANK" \
  --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-mqsa-ted}}" \
  --rdzv_conf="${HOST_CONF}join_timeout=$RDZV_TIMEOUT" \
  -m trainer.train "$@"
