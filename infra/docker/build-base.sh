#!/usr/bin/env bash
# Build orch's default base image (orch/base:bookworm-py311) from Debian with debootstrap + docker import:
# no registry is reachable, so nothing can be pulled. Idempotent: skipped when the image exists.
# Needs: root, a running dockerd, debootstrap, and http://deb.debian.org reachable.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" -m orchestrator.systems.docker.images base
