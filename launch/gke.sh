#!/usr/bin/env bash
# jmm on GKE TPU node pools: with xpk (if installed) or as a JobSet applied with kubectl.
#
#   launch/gke.sh --cluster=C --tpu_type=v5p-128 --image=IMAGE [--num_slices=1] [--name=jmm-run] \
#       [--render] -- JMM_FLAGS...
#   launch/gke.sh --cluster=tpu-c --tpu_type=v5p-128 --image=us-docker.pkg.dev/P/jmm/jmm:latest -- \
#       --config=configs/siglip.py:img=B/16,txt=B,res=224,batch=32768 --workdir=gs://BUCKET/runs/b16
#
# The image must hold this checkout at /jmm with its dependencies and jax[tpu] installed (e.g. FROM python:3.11,
# COPY . /jmm, pip install -e /jmm "jax[tpu]"). --render prints the JobSet YAML instead of submitting it
# (without xpk). Hosts per slice are derived from the TPU type (4 chips per host on v4/v5p, 8 on v5e/v6e
# slices bigger than 8 chips). Pods get JMM_DISTRIBUTED=auto: jax.distributed finds the other hosts itself.
set -euo pipefail
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
CLUSTER= TPU_TYPE= IMAGE= SLICES=1 NAME="jmm-$(date +%m%d-%H%M)" RENDER=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --cluster=*) CLUSTER="${1#*=}" ;; --tpu_type=*) TPU_TYPE="${1#*=}" ;; --image=*) IMAGE="${1#*=}" ;;
    --num_slices=*) SLICES="${1#*=}" ;; --name=*) NAME="${1#*=}" ;; --render) RENDER=1 ;;
    --) shift; break ;;
    *) echo "error: unknown option '$1' (jmm flags go after --); see --help" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$TPU_TYPE" && -n "$IMAGE" ]] || { echo "error: --tpu_type and --image are required; see --help" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "error: no jmm flags after --; see --help" >&2; exit 2; }
printf -v FLAGS '%q ' "$@"
CMD="cd /jmm && JMM_DISTRIBUTED=auto python -m jmm.main $FLAGS"

if (( ! RENDER )) && command -v xpk >/dev/null; then
  [[ -n "$CLUSTER" ]] || { echo "error: --cluster is required with xpk" >&2; exit 2; }
  exec xpk workload create --cluster "$CLUSTER" --workload "$NAME" --tpu-type "$TPU_TYPE" \
      --num-slices "$SLICES" --docker-image "$IMAGE" --command "$CMD"
fi

CHIPS="${TPU_TYPE##*-}"; GEN="${TPU_TYPE%-*}"
case "$GEN" in v5e|v5litepod|v6e) PER_HOST=$(( CHIPS > 8 ? 4 : CHIPS )) ;; *) PER_HOST=4; CHIPS=$(( CHIPS / 2 )) ;; esac
HOSTS=$(( (CHIPS + PER_HOST - 1) / PER_HOST ))
YAML=$(cat <<YAML
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata: {name: ${NAME}, annotations: {alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool}}
spec:
  failurePolicy: {maxRestarts: 3}   # A preempted slice restarts; jmm resumes from its newest checkpoint.
  replicatedJobs:
  - name: slice
    replicas: ${SLICES}
    template:
      spec:
        parallelism: ${HOSTS}
        completions: ${HOSTS}
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
            terminationGracePeriodSeconds: 120   # SIGTERM -> jmm saves a checkpoint.
            nodeSelector: {cloud.google.com/gke-tpu-accelerator: tpu-${GEN}-slice, cloud.google.com/gke-tpu-topology: AUTO}
            containers:
            - name: jmm
              image: ${IMAGE}
              command: [bash, -c, $(printf '%q' "$CMD")]
              resources: {limits: {google.com/tpu: ${PER_HOST}}}
YAML
)
if (( RENDER )); then echo "$YAML"; echo "# note: set gke-tpu-topology to your slice's topology (e.g. 4x4x4)" >&2; exit 0; fi
echo "$YAML" | kubectl apply -f -
