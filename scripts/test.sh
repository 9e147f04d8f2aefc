#!/usr/bin/env bash
# The whole test suite on real parts. Runs after scripts/setup.sh and scripts/services.sh (see Makefile).
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OLIVE_DISABLE_TELEMETRY=1
bash scripts/setup-infra.sh   # checkov + pycep-parser in .venv-infra (tests/test_infra_bicep.py); reused when pinned
.venv/bin/orch env base   # orch's default Docker base image (debootstrap + docker import); reused when present
.venv/bin/ruff check orchestrator tests bench
exec .venv/bin/python -m pytest tests -ra -q --durations=15 "$@"
