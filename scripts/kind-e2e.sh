#!/usr/bin/env bash
# The real-cluster suite, tests/cluster, on a throwaway kind cluster: the recipe for a CI job.
# It builds the operator image and the CPU worker and GPT example images, loads them into the
# cluster, points KUBECONFIG, SALAMANDER_E2E_IMAGE and SALAMANDER_E2E_OPERATOR_IMAGE at them and
# runs pytest, which installs the Helm chart (through helm-python-sdk: no helm binary needed),
# trains the example, deletes a worker pod and checks the recovery.
#
# Needs docker, kind and Python 3.11 or newer (./scripts/setup.sh makes .venv if it is missing).
#
#   ./scripts/kind-e2e.sh                        # creates kind cluster salamander-e2e, deletes it after
#   KIND_CLUSTER=dev KEEP_CLUSTER=1 ./scripts/kind-e2e.sh -k helm    # an existing or kept cluster;
#                                                                    # the arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

cluster=${KIND_CLUSTER:-salamander-e2e}
tag=${SALAMANDER_E2E_TAG:-e2e}
operator_image="salamander-operator:$tag"
worker_image="salamander-worker:$tag-cpu"
gpt_image="salamander-gpt:$tag-cpu"
cpu_index=https://download.pytorch.org/whl/cpu

for tool in docker kind; do
  command -v "$tool" >/dev/null 2>&1 || { echo "kind-e2e: $tool is not on PATH" >&2; exit 1; }
done
[ -x .venv/bin/python ] || ./scripts/setup.sh
# Without it the test would only be skipped, and the job would pass having tested nothing.
.venv/bin/python -c "import helm_python" \
  || { echo "kind-e2e: helm-python-sdk is missing from .venv (run ./scripts/setup.sh)" >&2; exit 1; }

created=0
kubeconfig=$(mktemp "${TMPDIR:-/tmp}/kind-e2e-kubeconfig.XXXXXX")
cleanup() {
  rm -f "$kubeconfig"
  if [ "$created" -eq 1 ] && [ -z "${KEEP_CLUSTER:-}" ]; then
    kind delete cluster --name "$cluster"
  fi
}
trap cleanup EXIT

if ! kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  kind create cluster --name "$cluster" --wait 120s
  created=1
fi
kind get kubeconfig --name "$cluster" >"$kubeconfig"

docker build -f docker/operator.Dockerfile -t "$operator_image" .
docker build -f docker/worker.Dockerfile --build-arg TORCH_INDEX="$cpu_index" -t "$worker_image" .
docker build --build-arg BASE="$worker_image" -t "$gpt_image" examples/gpt
# Not pulled: the tags are not `latest`, and the test sets imagePullPolicy IfNotPresent.
kind load docker-image --name "$cluster" "$operator_image" "$gpt_image"

export KUBECONFIG="$kubeconfig"
export SALAMANDER_E2E_IMAGE="$gpt_image"
export SALAMANDER_E2E_OPERATOR_IMAGE="$operator_image"
.venv/bin/python -m pytest tests/cluster -v -rs -p no:cacheprovider "$@"
