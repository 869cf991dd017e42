#!/usr/bin/env bash
# Distributed training on one or more machines, with or without GPUs (gloo on CPU-only machines).
#   tools/dist_train.sh CONFIG NPROC [tools/train.py options ...]
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), PORT (29500).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG NPROC [tools/train.py options ...]" >&2
    exit 2
fi
CONFIG=$1
NPROC=$2
shift 2
exec python -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$NPROC" \
    "$(dirname "$0")/train.py" "$CONFIG" --launcher pytorch "$@"
