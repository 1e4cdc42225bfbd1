#!/usr/bin/env bash
# Podman as a Docker-API engine on a machine without Docker Engine (what the tests use).
#   scripts/podman.sh conf                 write the containers.conf this machine needs (runc, cgroupfs)
#   scripts/podman.sh base                 build localhost/bookworm-base with debootstrap (no registry needed)
#   scripts/podman.sh service SOCKET       serve the Docker Engine API on a unix socket (foreground)
#   scripts/podman.sh build [BASE_IMAGE]   the kernel image (scripts/image.sh: only when its inputs changed)
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

# The Debian mirror this machine's apt uses (deb822 sources first, then sources.list), so the base
# image follows whatever mirror the machine is set up with. DEBIAN_MIRROR overrides it.
mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local m=""
  m=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
  [ -n "$m" ] || m=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
        /etc/apt/sources.list 2>/dev/null | head -n1)
  [ -n "$m" ] || { echo "no Debian mirror found in /etc/apt/sources.list(.d); set DEBIAN_MIRROR" >&2; return 1; }
  echo "$m"
}

base() {
  conf
  if podman image exists localhost/bookworm-base; then return; fi
  local rootfs="$STATE/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$(mirror)" >/dev/null
  tar -C "$rootfs" -c . | podman import - localhost/bookworm-base >/dev/null
  rm -rf "$rootfs"
}

service() {
  conf
  exec podman system service --time=0 "unix://$1"
}

build() {
  ENGINE=podman bash "$ROOT/scripts/image.sh" "${1:-localhost/bookworm-base}"
}

"$@"
