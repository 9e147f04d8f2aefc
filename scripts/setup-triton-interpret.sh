#!/usr/bin/env bash
# Triton for the CPU tests of orch's Triton kernels (tests/test_lora_philox.py), run through Triton's interpreter
# (TRITON_INTERPRET=1) in a subprocess with this folder on PYTHONPATH. It lives in its own --target folder, never
# in .venv: a triton importable from the venv would change what torch, Liger and the other libraries do on CPU.
# The interpreter runs the same triton.language code (tl.rand's Philox included) that the GPU compiles. Pinned to
# 3.9.0: 3.6's interpreter (the GPU image's Triton) cannot run a loop with a runtime bound under numpy 2 (int() of
# a one-element array). Neither interprets bf16 (a bf16 tl.dot multiplies the raw bits, fp32 -> bf16 truncates):
# the interpreter tests use fp16 and fp32, bench/gpu_kernels.py checks bf16 on the GPU. Cache-friendly: skipped
# when the pinned version is present; an unreachable index fails within seconds and names it.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=3.9.0
DEST=.cache/triton-interpret
if [ -f "$DEST/.orch-version" ] && [ "$(cat "$DEST/.orch-version")" = "$VERSION" ]; then
  echo "setup: triton $VERSION (interpreter, $DEST) is present"
  exit 0
fi
mkdir -p .cache
index=${PIP_INDEX_URL:-$(.venv/bin/python -m pip config get global.index-url 2>/dev/null || echo "https://pypi.org/simple")}
extra=${PIP_EXTRA_INDEX_URL:-$(.venv/bin/python -m pip config get global.extra-index-url 2>/dev/null || true)}
tmp=$(mktemp -d .cache/triton-interpret.tmp.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
if ! .venv/bin/python -m pip install -q --no-deps --only-binary=:all: --timeout 5 --retries 0 \
    --target "$tmp" "triton==$VERSION" >"$tmp.log" 2>&1; then
  echo "setup: error: could not install triton==$VERSION (for the interpreter tests) from $index${extra:+ (extra: $extra)}:" >&2
  tail -n 3 "$tmp.log" >&2
  rm -f "$tmp.log"
  exit 1
fi
rm -f "$tmp.log"
echo "$VERSION" > "$tmp/.orch-version"
rm -rf "$DEST"
mv "$tmp" "$DEST"
trap - EXIT
echo "setup: triton $VERSION (interpreter) installed in $DEST"
