#!/usr/bin/env bash
# One call on the lent GPU machine (`run` tool), phases picked by name; everything lands under $OUT.
#
#   WHL=.whl bash bench/gpu_call.sh setup kernels@correctness rows@phi3-mini@ROWS[@PROFILE] bundle
#
# setup    installs the carried wheels ($WHL, default .whl: bench/gpu_wheels.py) into /tmp/site, once per machine
# check    versions + varlen attention vs SDPA (gpu_finetune.py check)
# kernels[@PARTS]  bench/gpu_kernels.py (correctness and timings of orch's kernels); PARTS: its --steps, '+' between
# rows@SHAPE@ROWS[@PROFILE]  bench/gpu_finetune.py on SHAPE, ROWS with '%' between row specs (row specs hold ':'
#          and their options '/'), PROFILE a row spec to profile; its run folder (run.json, row_*.json, logs,
#          profiles) is $BOUT/<shape>
# cli      bench/gpu_cli_finetune.py run (orch finetune through the CLI; needs .whl_cli, see bench/README.md)
# quant    bench/gpu_quantize.py run (AWQ + GPTQ; needs .whl_awq)
# bundle   packs $BOUT and every small file under $OUT into $OUT/bundle.tgz (the tool returns at most 8 files)
# LAUNCH   a kernels.json whose tune picks the orch rows run the Philox kernels at (e.g. $BOUT/kernels/kernels.json)
# Budgets: BUDGET_S (rows of one shape, default 420 s), ROW_TIMEOUT_S (one row, default 150 s), STEPS (20), WARMUP (5).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export UNSLOTH_DISABLE_STATISTICS=1
OUT=${OUT:-/tmp/out}
WHL=${WHL:-.whl}
PY=${PYTHON:-python3}  # the GPU image's python3 holds torch
BOUT=${BOUT:-/tmp/bout}  # run folders
SITE=${SITE:-/tmp/site}  # the installed wheels
REPO=$(pwd)
mkdir -p "$OUT" "$BOUT"
for phase in "$@"; do
  t0=$(date +%s)
  echo "=== $phase $(date +%T)"
  case "$phase" in
    setup)
      if [ ! -d "$SITE/trl" ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl
      fi
      if [ -d .whl_cli ] && [ ! -d /tmp/site_cli/mlflow ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_cli .whl_cli/*.whl
      fi
      if [ -d .whl_awq ] && [ ! -d /tmp/siteq/llmcompressor ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/siteq .whl_awq/*.whl
      fi
      nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || echo "no nvidia-smi here"
      ;;
    check)
      PYTHONPATH=$SITE:$REPO timeout 120 $PY bench/gpu_finetune.py check 2>&1 | tail -20
      ;;
    kernels*)
      parts=${phase#kernels}; parts=${parts#@}; parts=${parts//+/,}
      mkdir -p $BOUT/kernels && PYTHONPATH=$SITE:$REPO timeout 240 $PY bench/gpu_kernels.py \
        --out $BOUT/kernels --steps "${parts:-ceilings,correctness,splits,timings}" 2>&1 | tail -60
      ;;
    rows@*)
      IFS=@ read -r _ shape rows profile <<<"$phase"
      rows=${rows//%/,}
      budget=${BUDGET_S:-420}
      PYTHONPATH=$SITE:$REPO timeout $((budget + 240)) $PY bench/gpu_finetune.py --shape "$shape" \
        --work "${WORK:-/tmp}/ob_$shape" --out "$BOUT/$shape" --steps "${STEPS:-20}" --warmup "${WARMUP:-5}" \
        --budget-s "$budget" --row-timeout-s "${ROW_TIMEOUT_S:-150}" --rows "$rows" --profile "${profile:-}" \
        ${LAUNCH:+--launch "$LAUNCH"} 2>&1 \
        | grep -v '^|' | tail -30
      $PY - "$BOUT/$shape" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
for name in json.loads((run / "run.json").read_text())["row_files"]:
    r = json.loads((run / name).read_text())
    if r.get("ok"):
        print(f"{r['row']:40s} {r['tokens_per_s_median']:9.0f} tok/s {r['peak_mem_allocated_gib']:5.1f} GiB "
              f"loss@{r['steps']} {r['losses'].get(str(r['steps']), float('nan')):.4f} step1 {r['step_times'][0]:.1f}s")
    else:
        print(f"{r['row']:40s} FAILED {r.get('error', '')[:300]}")
EOF
      for f in $BOUT/$shape/profile_*/profile.txt; do [ -f "$f" ] && head -25 "$f"; done
      for f in $BOUT/$shape/profile_*/host_profile.txt; do [ -f "$f" ] && head -40 "$f"; done
      ;;
    cli)
      PYTHONPATH=$SITE:/tmp/site_cli:$REPO timeout 300 $PY bench/gpu_cli_finetune.py run --out /tmp/cli 2>&1 | tail -30
      cp /tmp/cli/cli.json "$OUT/" 2>/dev/null
      ;;
    quant)
      PYTHONPATH=/tmp/siteq:$REPO timeout 240 $PY bench/gpu_quantize.py run --out "$OUT/quant" 2>&1 | tail -25
      ;;
    bundle)
      (cd $BOUT && tar czf "$OUT/bundle.tgz" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' \
        --exclude='*_out' --exclude='baseline_ckpt' .) || true
      ;;
    *)
      echo "unknown phase $phase"
      ;;
  esac
  echo "=== $phase done in $(($(date +%s) - t0)) s"
done
ls -la "$OUT" 2>/dev/null | head -20
