#!/usr/bin/env bash
# What the test suite needs besides Python packages, installed and started idempotently:
#   docker.io + a running dockerd, debootstrap (orch's base image), Azurite (npm, pinned, telemetry off),
#   and the storage host name of the local Azure stand-in. The MLflow servers are started by the test fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

need_apt=()
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
# headless Chromium for tests/test_ui.py (the MLflow UI of a run, screenshot + DOM); Debian's package, no downloads
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "services: apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  echo "services: starting dockerd"
  $SUDO mkdir -p /var/log
  $SUDO setsid nohup dockerd >/tmp/orch-dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "services: dockerd did not start; see /tmp/orch-dockerd.log"; tail -20 /tmp/orch-dockerd.log; exit 1; }
fi

bash infra/install-azurite.sh
