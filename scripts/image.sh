#!/usr/bin/env bash
# Build the kernel image (what `make image` runs), only when its inputs changed.
#   ENGINE=docker|podman scripts/image.sh [BASE_IMAGE]
#
# The image is tagged by a hash of everything that goes into it (the Dockerfile, the lock file, the library,
# the notebooks, the params, the model folder, the base image): `helical-workflow-kernels:<hash>`, and
# `helical-workflow-kernels:latest` points at it. An image of the same inputs is reused, not rebuilt; older
# builds of this image are removed.
# With Podman, the host's CA bundle and uv cache are mounted into the build (a TLS-inspecting proxy, fast
# rebuilds); `localhost/bookworm-base` is built with debootstrap when it is the base and missing.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ENGINE="${ENGINE:-docker}"
BASE_IMAGE="${1:-${BASE_IMAGE:-nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04}}"
MODEL_DIR="${MODEL_DIR:-kernels_image/models}"
NAME="${HELICAL_IMAGE_NAME:-helical-workflow-kernels}"

cd "$ROOT"
inputs_hash() {
  {
    echo "base=$BASE_IMAGE model_dir=$MODEL_DIR"
    find kernels_image/Dockerfile requirements/kernel.lock pyproject.toml src notebooks params "$MODEL_DIR" \
      -type f ! -name '*.pyc' ! -path '*/__pycache__/*' ! -path '*.egg-info/*' -print0 2>/dev/null \
      | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-12
}
TAG="$(inputs_hash)"

if [ "$ENGINE" = podman ]; then
  bash scripts/podman.sh conf
  export CONTAINERS_CONF="${HELICAL_PODMAN_STATE:-$ROOT/.venv/podman}/containers.conf"
  [ "$BASE_IMAGE" = localhost/bookworm-base ] && bash scripts/podman.sh base
fi

if "$ENGINE" image inspect "$NAME:$TAG" >/dev/null 2>&1; then
  echo "$NAME:$TAG is up to date (same inputs): not rebuilt"
else
  extra=()
  if [ "$ENGINE" = podman ]; then
    mkdir -p "${UV_CACHE_DIR:-$HOME/.cache/uv}"
    extra+=(--build-arg PIP_CERT=/host-ca.crt --build-arg UV_CACHE_DIR=/uvcache
            -v /etc/ssl/certs/ca-certificates.crt:/host-ca.crt:ro -v "${UV_CACHE_DIR:-$HOME/.cache/uv}:/uvcache")
  fi
  "$ENGINE" build --network host -f kernels_image/Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg MODEL_DIR="$MODEL_DIR" "${extra[@]}" -t "$NAME:$TAG" .
  echo "built $NAME:$TAG"
fi
"$ENGINE" tag "$NAME:$TAG" "$NAME:latest"
# earlier builds of this image (other input hashes) are pruned
for old in $("$ENGINE" images --format '{{.Repository}}:{{.Tag}}' | grep -E "(^|/)$NAME:[0-9a-f]{12}$" || true); do
  case "$old" in *":$TAG") ;; *) "$ENGINE" rmi "$old" >/dev/null 2>&1 && echo "removed the earlier build $old" ;; esac
done
echo "$NAME:latest = $NAME:$TAG"
