#!/usr/bin/env bash
# Debian packages the test suite runs for real: Prometheus, Pushgateway, node-exporter, Podman (+runc),
# Redis (the Celery broker of tests/test_celery.py).
# Idempotent; needs root (CI and the dev machines run as root).
set -euo pipefail
need=()
command -v prometheus >/dev/null || need+=(prometheus)
command -v prometheus-pushgateway >/dev/null || need+=(prometheus-pushgateway)
command -v prometheus-node-exporter >/dev/null || need+=(prometheus-node-exporter)
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
