#!/usr/bin/env bash
# One call on the lent GPU machine (`run` tool), phases picked by name; everything lands under $OUT.
#
#   bash bench/gpu_call.sh setup check kernels rows@phi3-mini@ROWS[@PROFILE] cli quant bundle
#
# setup    installs the carried wheels: .whl -> /tmp/site (fine-tuning stack, transformers 5.23), .whl_cli ->
#          /tmp/site_cli (MLflow for the CLI run), .whl_awq + the shared ones -> /tmp/siteq (llm-compressor, on the
#          image's transformers 5.17 as bench/README describes); skipped when already there (a warm machine)
# check    versions + varlen attention vs SDPA (gpu_finetune.py check)
# kernels  bench/gpu_kernels.py (correctness and timings of orch's kernels)
# rows@SHAPE@ROWS[@PROFILE]  bench/gpu_finetune.py on SHAPE, ROWS with '%' between row specs (row specs hold
#          ':', their options '/' and '+name'), PROFILE a row spec to profile
# kernels[@PARTS]  PARTS: gpu_kernels.py --steps, '+' between them
# bundle   packs every small file under $OUT (not quant/) into $OUT/bundle.tgz: the tool returns at most 8 files
# cli      bench/gpu_cli_finetune.py run (orch finetune through the CLI)
# quant    bench/gpu_quantize.py run (AWQ + GPTQ)
# Logs and small files are packed into $OUT/logs_<phase>.tgz (the tool returns at most 8 files).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
REPO=$(pwd)
mkdir -p "$OUT"
pack() {  # pack DIR NAME: the folder's small files into one tgz under $OUT
  (cd "$1" && tar czf "$OUT/$2.tgz" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' . 2>/dev/null) || true
}
for phase in "$@"; do
  t0=$(date +%s)
  echo "=== $phase $(date +%T)"
  case "$phase" in
    setup)
      if [ ! -d /tmp/site/transformers ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      fi
      if [ -d .whl_cli ] && [ ! -d /tmp/site_cli/mlflow ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_cli .whl_cli/*.whl
      fi
      if [ -d .whl_awq ] && [ ! -d /tmp/siteq/llmcompressor ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/siteq \
          .whl_awq/*.whl .whl/datasets-*.whl .whl/dill-*.whl .whl/multiprocess-*.whl .whl/pydantic-*.whl \
          .whl/pydantic_core-*.whl .whl/typing_*.whl .whl/annotated_types-*.whl
      fi
      nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
      ;;
    check)
      PYTHONPATH=/tmp/site:$REPO timeout 120 python3 bench/gpu_finetune.py check 2>&1 | tail -20
      ;;
    kernels*)
      parts=${phase#kernels}; parts=${parts#@}; parts=${parts//+/,}
      mkdir -p /tmp/k && PYTHONPATH=/tmp/site:$REPO timeout 240 python3 bench/gpu_kernels.py --out /tmp/k \
        --steps "${parts:-ceilings,correctness,splits,timings}" 2>&1 | tail -90
      cp /tmp/k/kernels.json "$OUT/" 2>/dev/null
      ;;
    rows@*)
      IFS=@ read -r _ shape rows profile <<<"$phase"
      rows=${rows//%/,}
      budget=${BUDGET_S:-420}
      PYTHONPATH=/tmp/site:$REPO timeout $((budget + 240)) python3 bench/gpu_finetune.py --shape "$shape" \
        --work "/tmp/ob_$shape" --out "/tmp/bout_$shape" --steps 20 --warmup 5 --budget-s "$budget" \
        --row-timeout-s "${ROW_TIMEOUT_S:-150}" --rows "$rows" --profile "${profile:-}" 2>&1 | tail -45
      cp "/tmp/bout_$shape/results.json" "$OUT/results_$shape.json" 2>/dev/null
      for f in /tmp/bout_$shape/profile_*/profile.txt; do [ -f "$f" ] && head -45 "$f"; done
      pack "/tmp/bout_$shape" "logs_$shape"
      ;;
    cli)
      PYTHONPATH=/tmp/site:/tmp/site_cli:$REPO timeout 300 python3 bench/gpu_cli_finetune.py run --out /tmp/cli 2>&1 | tail -30
      cp /tmp/cli/cli.json "$OUT/" 2>/dev/null
      pack /tmp/cli logs_cli
      ;;
    quant)
      PYTHONPATH=/tmp/siteq:$REPO timeout 240 python3 bench/gpu_quantize.py run --out "$OUT/quant" 2>&1 | tail -25
      ;;
    bundle)
      (cd "$OUT" && find . -maxdepth 1 -type f ! -name call.log ! -name bundle.tgz -printf '%f\n' \
        | tar czf bundle.tgz -T - && find . -maxdepth 1 -type f ! -name call.log ! -name bundle.tgz -delete)
      ;;
    *)
      echo "unknown phase $phase"
      ;;
  esac
  echo "=== $phase done in $(($(date +%s) - t0)) s"
done
ls -la "$OUT" "$OUT"/* 2>/dev/null | head -30
