#!/usr/bin/env bash
# Starts N jmm processes on this machine, CPU backend, talking over loopback (gloo collectives): a multi-host run
# in miniature, for testing multi-process code paths (sharded checkpoints, per-process input, collectives)
# without a cluster.
#
#   launch/local_multiprocess.sh N [jmm.main flags ...]
#   launch/local_multiprocess.sh 2 --config=configs/siglip.py --workdir=/tmp/mp
#
# Environment:
#   DEVICES_PER_PROCESS  simulated CPU devices per process (default 4)
#   PORT                 coordinator port on 127.0.0.1 (default: a free one)
#   PYTHON               interpreter (default: python)
#   MODULE               module to run (default: jmm.main)
#   LOGDIR               where process i>0 logs go (default: the workdir, else /tmp); process 0 prints here.
# Exit status: 0 if every process exits 0; otherwise the first failure's status (the others are stopped).
# SIGINT / SIGTERM are forwarded to every process (jmm saves a checkpoint on SIGTERM and exits 0).
set -uo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then usage; exit 0; fi
N="$1"; shift
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then echo "error: N must be a positive integer, got '$N'" >&2; exit 2; fi

PYTHON="${PYTHON:-python}"
MODULE="${MODULE:-jmm.main}"
DEVICES="${DEVICES_PER_PROCESS:-4}"
PORT="${PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
WORKDIR=""
for arg in "$@"; do [[ "$arg" == --workdir=* ]] && WORKDIR="${arg#--workdir=}"; done
LOGDIR="${LOGDIR:-${WORKDIR:-/tmp}}"
mkdir -p "$LOGDIR"
cd "$(dirname "$0")/.."

pids=()
stop_all() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done; }
trap 'stop_all' INT TERM

for ((i = 0; i < N; i++)); do
  env JAX_PLATFORMS=cpu \
      XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES} ${XLA_FLAGS:-}" \
      JMM_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" JMM_NUM_PROCESSES="$N" JMM_PROCESS_ID="$i" \
      "$PYTHON" -m "$MODULE" "$@" \
      > >(if [[ $i == 0 ]]; then cat; else cat > "$LOGDIR/process_$i.log"; fi) 2>&1 &
  pids+=($!)
done
echo "local_multiprocess: $N processes x $DEVICES CPU devices, coordinator 127.0.0.1:$PORT (pids ${pids[*]})" >&2

status=0
remaining=$N
while (( remaining > 0 )); do
  wait -n "${pids[@]}" 2>/dev/null
  rc=$?
  if (( rc == 127 )); then break; fi  # No children left.
  remaining=$((remaining - 1))
  if (( rc != 0 && status == 0 )); then
    status=$rc
    echo "local_multiprocess: a process exited with status $rc; stopping the others" >&2
    stop_all
  fi
done
wait
exit $status
