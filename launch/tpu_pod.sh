#!/usr/bin/env bash
# Runs jmm on every worker of a Cloud TPU VM (a single host or a pod slice): copies this checkout, sets up a
# venv on each worker, then starts the same command on all workers at once. jax.distributed finds the other
# workers itself on Cloud TPU (JMM_DISTRIBUTED=auto), so no addresses are needed.
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--setup] [--dry_run] -- JMM_FLAGS...
#   launch/tpu_pod.sh --tpu=v5p-128-a --zone=us-east5-a --setup -- \
#       --config=configs/siglip.py:img=B/16,txt=B,res=224,batch=32768,data=webdataset \
#       --config.mesh=data=-1,fsdp=16,tensor=1 --workdir=gs://BUCKET/runs/b16
#
# Options:
#   --tpu=NAME       TPU VM name (required)      --zone=ZONE     its zone (required)
#   --project=P      GCP project (default: gcloud's)
#   --setup          copy the code and (re)create the venv with jax[tpu] on every worker before running
#   --dry_run        print the gcloud commands instead of running them
# The workdir should be a gs:// path (Orbax and the metrics writer go through fsspec/tensorstore) so every worker
# sees the same checkpoints. Stop a run with Ctrl-C: SIGTERM reaches each worker, which saves a checkpoint.
set -euo pipefail
usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
TPU= ZONE= PROJECT= SETUP=0 DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --tpu=*) TPU="${1#*=}" ;; --zone=*) ZONE="${1#*=}" ;; --project=*) PROJECT="${1#*=}" ;;
    --setup) SETUP=1 ;; --dry_run) DRY=1 ;;
    --) shift; break ;;
    *) echo "error: unknown option '$1' (jmm flags go after --); see --help" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$TPU" && -n "$ZONE" ]] || { echo "error: --tpu and --zone are required; see --help" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "error: no jmm flags after --; see --help" >&2; exit 2; }
cd "$(dirname "$0")/.."
GC=(gcloud compute tpus tpu-vm --zone="$ZONE"); [[ -n "$PROJECT" ]] && GC+=(--project="$PROJECT")
run() { if (( DRY )); then printf '%q ' "$@"; echo; else "$@"; fi; }

if (( SETUP )); then
  TAR=$(mktemp /tmp/jmm-XXXX.tar.gz)
  git ls-files -z | tar --null -czf "$TAR" -T -   # Tracked files only: no venv, no workdirs.
  run "${GC[@]}" scp "$TAR" "$TPU":/tmp/jmm.tar.gz --worker=all
  run "${GC[@]}" ssh "$TPU" --worker=all --command \
    'rm -rf ~/jmm && mkdir -p ~/jmm && tar -xzf /tmp/jmm.tar.gz -C ~/jmm && cd ~/jmm &&
     python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . "jax[tpu]"'
fi
printf -v FLAGS '%q ' "$@"
run "${GC[@]}" ssh "$TPU" --worker=all --command "cd ~/jmm && JMM_DISTRIBUTED=auto .venv/bin/python -m jmm.main $FLAGS"
