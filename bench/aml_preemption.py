"""What a preemption costs a fine-tune on Azure ML: LoRA steps trained again after a low-priority node is taken back,
before orch resumed training (a requeued attempt started from step 0) and now (it resumes from the newest
checkpoint in the workspace cache), measured on the local Azure stand-in with the real SDK and real jobs.

    .venv/bin/python bench/aml_preemption.py [--steps 60] [--every 10] [--preempt-at 35] [--out bench_out/aml] \
        [--write-results]

One job: the tiny Phi-3, LoRA only, on the stand-in's low-priority cluster (cpu-lowpri), checkpoints every
`--every` steps, logging every step. When its log shows step `--preempt-at` and a checkpoint saved to the workspace
cache, the stand-in preempts it (Azure ML's requeue: attempt 2 runs the command again from the top); a preemption
before the first upload finishes restarts from step 0, which is not what this measures. The row "from step 0" is
what the same preemption cost before: attempt 2 trains every step again. Prints a table and writes per-row JSON
into --out; --write-results also writes the table between <!-- aml-preemption:start/end --> in bench/RESULTS.md
(tests/test_aml_cache.py runs the script tiny without it). Needs what tests/test_aml_cache.py needs (Azurite, dockerd,
`orch env base`); the first run builds the job image (minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "jobs" / "tone-classification"))
import harness  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "aml-preemption"
LOSS_LINE = re.compile(r"^\[lora\] \{'loss'", re.M)
SAVED_LINE = re.compile(r"orch: checkpoint-\d+ saved to the workspace cache")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    ap.add_argument("--preempt-at", type=int, default=35, help="preempt once the log shows this step")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "aml")
    ap.add_argument("--write-results", action="store_true", help="rewrite the aml-preemption section of RESULTS.md")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from make_dataset import make_rows, write_jsonl

    from orchestrator.engine.aml_driver import submit_workflow
    from orchestrator.passes.models.tiny_model import build_tiny_phi3
    from tests.azure_standin import start_standin

    with tempfile.TemporaryDirectory(prefix="orch-bench-aml-") as tmp_s:
        tmp = Path(tmp_s)
        rows = make_rows(240, seed=42)
        data = write_jsonl(rows, tmp / "tone.jsonl")
        model = build_tiny_phi3(tmp / "tiny-phi3", texts=[f"{r['phrase']} {r['tone']}" for r in rows])
        with start_standin(tmp / "standin") as s:
            os.environ.update(s.settings["env"])
            os.environ["MLFLOW_TRACKING_TOKEN"] = s.mlflow_token()
            os.environ["ORCH_AZURE_CLOUD"] = s.cloud_name
            os.environ["ORCH_AZURE_CLOUD_METADATA"] = json.dumps(s.cloud_metadata())
            os.environ["ORCH_PROFILE"] = str(tmp / "profile.json")
            wf = json.loads((REPO / "jobs" / "tone-classification" / "config.json").read_text())
            wf["workflow_id"] = "bench-preempt"
            wf["input_model"]["config"] = {"model_path": s.seed_registry_model("reg", "tiny", "1", model)}
            wf["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = s.seed_datastore_files(
                data, "datasets/tone/tone.jsonl"
            )
            wf["passes"] = {"lora": wf["passes"]["lora"]}
            wf["passes"]["lora"]["config"]["checkpoint_every_steps"] = args.every
            wf["passes"]["lora"]["config"]["training_args"].update(
                max_steps=args.steps, logging_steps=1, eval_steps=10_000, per_device_train_batch_size=2
            )
            aml = wf["systems"]["aml"]["config"]
            aml.update(aml_compute="cpu-lowpri", accelerators=["cpu"], hf_token=False)
            aml["aml_docker_config"]["conda_file_path"] = str(REPO / "environments" / "aml-cpu.conda.yaml")
            wf["engine"].pop("evaluator", None)
            wf["engine"].update(host="aml", target="aml", cache_dir=str(tmp / "cache"), output_dir=str(tmp / "out"))
            (tmp / "wf.json").write_text(json.dumps(wf))
            started = time.monotonic()
            name = submit_workflow(tmp / "wf.json")["name"]
            job = s.state.jobs[name]
            while True:
                log = Path(job.log_path).read_text() if job.log_path and Path(job.log_path).exists() else ""
                # the checkpoints upload in the background (ORCH_CHECKPOINT_SYNC_S): wait for one to be there
                trained = len(LOSS_LINE.findall(log))
                if (trained >= args.preempt_at and SAVED_LINE.search(log)) or job.status in ("Completed", "Failed"):
                    break
                time.sleep(0.2)
            if job.status in ("Completed", "Failed"):
                raise SystemExit(
                    f"job {name} ended {job.status} before a checkpoint reached the workspace after step "
                    f"{args.preempt_at}: nothing to preempt (raise --steps)"
                )
            import requests

            r = requests.post(f"{s.base_url}/_standin/jobs/{name}/preempt", timeout=30,
                              verify=s.settings["env"]["REQUESTS_CA_BUNDLE"])  # fmt: skip
            r.raise_for_status()
            status = s.wait_job(name, 3600)
            elapsed = time.monotonic() - started
            log = Path(job.log_path).read_text()
            (args.out / "job_log.txt").write_text(log)  # what the counts below come from, kept beside them
            first, _, second = log.partition("low-priority node preempted")
            done_before = len(LOSS_LINE.findall(first))  # logging every step: one loss line per step trained
            m = re.search(r"orch: lora resumed from step (\d+)", second)
            resumed = int(m[1]) if m else 0
            trained_again = len(LOSS_LINE.findall(second))
    if status != "Completed":
        raise SystemExit(f"job {name} ended {status}")
    rows_out = [
        {"row": "requeued attempt from step 0 (before)", "steps_done_before_preemption": done_before,
         "resumed_from_step": 0, "steps_trained_again": done_before, "steps_trained_in_all": done_before + args.steps},
        {"row": "resumed from the workspace checkpoint (orch)", "steps_done_before_preemption": done_before,
         "resumed_from_step": resumed, "steps_trained_again": done_before - resumed,
         "steps_trained_in_all": done_before + trained_again},
    ]  # fmt: skip
    for row in rows_out:
        row.update(steps=args.steps, checkpoint_every=args.every, job=name, job_seconds=round(elapsed, 1))
        harness.write_json(args.out / (re.sub(r"\W+", "-", row["row"]).strip("-") + ".json"), row)
    cols = ("steps_done_before_preemption", "resumed_from_step", "steps_trained_again", "steps_trained_in_all")
    lines = harness.table(
        ["", "steps done when preempted", "resumed from", "steps trained again", "steps trained in all"],
        "lrrrr",
        [[r["row"], *(r[c] for c in cols)] for r in rows_out],
    )
    note = (f"\nLoRA of {args.steps} steps on the tiny Phi-3, checkpoints every {args.every}, preempted after step "
            f"{args.preempt_at} on the stand-in's low-priority cluster; measured "
            f"{time.strftime('%Y-%m-%d')} on {platform.node()} ({os.cpu_count()} CPUs): the orch row's steps come "
            f"from the job's own log (one loss line per step), the 'before' row is the same preemption with the "
            f"requeued attempt starting from step 0. `bench/aml_preemption.py`.\n")  # fmt: skip
    table = "".join(line + "\n" for line in lines)
    print(table + note)
    if args.write_results:
        title = "## What a preemption costs a fine-tune on Azure ML\n\n"
        harness.write_section(RESULTS, SECTION, title + table + note)


if __name__ == "__main__":
    main()
