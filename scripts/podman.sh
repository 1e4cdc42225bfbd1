#!/usr/bin/env bash
# Podman as a Docker-API engine on a machine without Docker Engine (what the tests use).
#   scripts/podman.sh conf                 write the containers.conf this machine needs (runc, cgroupfs)
#   scripts/podman.sh base                 build localhost/bookworm-base with debootstrap (no registry needed)
#   scripts/podman.sh service SOCKET       serve the Docker Engine API on a unix socket (foreground)
#   scripts/podman.sh build [BASE_IMAGE]   build the kernel image (helical-workflow-kernels:latest)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="${HELICAL_PODMAN_STATE:-$ROOT/.venv/podman}"
export CONTAINERS_CONF="$STATE/containers.conf"

conf() {
  mkdir -p "$STATE"
  cat > "$CONTAINERS_CONF" <<'CONF'
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=20000:20000"]
CONF
}

base() {
  conf
  if podman image exists localhost/bookworm-base; then return; fi
  local rootfs="$STATE/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
  tar -C "$rootfs" -c . | podman import - localhost/bookworm-base >/dev/null
  rm -rf "$rootfs"
}

service() {
  conf
  exec podman system service --time=0 "unix://$1"
}

build() {
  conf
  local base_image="${1:-localhost/bookworm-base}"
  [ "$base_image" = localhost/bookworm-base ] && base
  # the host's uv cache and CA bundle make the build fast and work behind a TLS-inspecting proxy
  mkdir -p "${UV_CACHE_DIR:-$HOME/.cache/uv}"
  podman build --network host -f "$ROOT/kernels_image/Dockerfile" \
    --build-arg BASE_IMAGE="$base_image" --build-arg PIP_CERT=/host-ca.crt --build-arg UV_CACHE_DIR=/uvcache \
    -v /etc/ssl/certs/ca-certificates.crt:/host-ca.crt:ro -v "${UV_CACHE_DIR:-$HOME/.cache/uv}:/uvcache" \
    ${MODEL_DIR:+--build-arg MODEL_DIR="$MODEL_DIR"} -t helical-workflow-kernels:latest "$ROOT"
}

"$@"
