"""`orch finetune` of the demo's tiny workflow on a GPU, through the CLI a user types (section `gpu-cli`).

    python bench/gpu_cli_finetune.py run --out OUT      # on the GPU machine: OUT/cli.json + OUT/cli.log
    python bench/gpu_cli_finetune.py render OUT/cli.json  # here: rewrite the gpu-cli section of bench/RESULTS.md

`run` builds what `orch demo` builds (the 400-row tone-classification data set and the tiny Phi-3, with the demo's
own scripts), then runs, in a child process, exactly

    orch finetune --model_name_or_path MODEL --data_name json --data_files DATA \\
        --text_template "### Text: {phrase}\\n### The tone is:\\n{tone}" --max_seq_len 128 \\
        --per_device_train_batch_size 16 --max_steps 60 --output_path OUT/ft

(the demo workflow's data template and length; LoRA r=64 on every linear layer, Olive's defaults) with MLflow
tracking into a local sqlite store, and records the exit status, wall time, the LoRA pass's CUDA choices (its
`cuda:` log lines), its metrics from the output's manifest.json, and what the output folder holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import harness

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEMO = REPO / "jobs" / "tone-classification"
SECTION = "gpu-cli"
TEMPLATE = "### Text: {phrase}\\n### The tone is:\\n{tone}"  # backslash-n, as a shell passes it
FLAGS = ["--max_seq_len", "128", "--per_device_train_batch_size", "16", "--max_steps", "60"]


def run(out: Path, work: Path, max_steps: int | None = None) -> dict[str, Any]:
    """max_steps: another --max_steps than the demo's 60 (the CPU test's 2)."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(DEMO))
    from make_dataset import make_rows, write_jsonl

    from orchestrator.passes.models.tiny_model import build_tiny_phi3

    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "dataset-classification.json"
    write_jsonl(make_rows(400), data)
    model = work / "tiny-phi3"
    if not (model / "config.json").exists():
        texts = [" ".join(json.loads(line).values()) for line in data.read_text().splitlines()]
        build_tiny_phi3(model, texts=texts)
    ft = work / "ft"
    for stale in (ft, work / ".orch", work / "mlruns.db"):  # a warm machine's earlier run: train again, not cached
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    cmd = [
        sys.executable,
        "-c",
        "import sys; from orchestrator.cli import main; sys.argv[0] = 'orch'; sys.exit(main())",
        "finetune",
        "--model_name_or_path",
        str(model),
        "--data_name",
        "json",
        "--data_files",
        str(data),
        "--text_template",
        TEMPLATE,
        *(FLAGS if max_steps is None else _with_max_steps(FLAGS, max_steps)),
        "--output_path",
        str(ft),
    ]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlruns.db'}", PYTHONUNBUFFERED="1")
    done = harness.run_row(cmd, out / "cli.log", cwd=work, env=env, timeout=900)
    rc, wall = done.rc, done.wall_s
    text = (out / "cli.log").read_text(errors="replace")
    result: dict[str, Any] = {
        "command": "orch " + " ".join(c if " " not in c else repr(c) for c in cmd[3:]),
        "rc": rc,
        "wall_s": wall,
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import torch

        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        result["torch"] = torch.__version__
    except ImportError:
        pass
    manifests = sorted(ft.rglob("manifest.json"))
    if manifests:
        result["manifest"] = json.loads(manifests[-1].read_text())
    job_logs = "\n".join(f.read_text(errors="replace") for f in sorted(work.glob(".orch/cache/runs/*/job.log")))
    cuda_lines = {line.split("cuda: ", 1)[1].strip() for line in (text + job_logs).splitlines() if "cuda: " in line}
    result["pass_log"] = [line for line in job_logs.splitlines() if "LoRA" in line or "cuda" in line][-30:]
    result["cuda_lines"] = sorted(cuda_lines)
    result["outputs"] = sorted(str(p.relative_to(ft)) for p in ft.rglob("*") if p.is_file())[:60] if ft.exists() else []
    result["log_tail"] = text.strip().splitlines()[-25:]
    harness.write_json(out / "cli.json", result)
    return result


def _with_max_steps(flags: list[str], steps: int) -> list[str]:
    out = list(flags)
    out[out.index("--max_steps") + 1] = str(steps)
    return out


def _find(obj: Any, key: str) -> Any:
    """The first value under `key` anywhere in a nested manifest."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find(v, key)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = _find(v, key)
            if found is not None:
                return found
    return None


def render(res: dict[str, Any]) -> str:
    lines = [
        "## `orch finetune` on the GPU through the CLI (bench/gpu_cli_finetune.py)",
        "",
        f"Run {res.get('date', '')} on {res.get('device', '?')} (torch {res.get('torch', '?')}): the demo's tiny "
        "Phi-3 and 400-row tone data set, built by the demo's own scripts, trained by",
        "",
        f"```\n{res['command']}\n```",
        "",
        f"- exit status {res['rc']}, {res['wall_s']:.0f} s wall (process start, imports, data, training, adapter "
        "written, MLflow run logged into a local sqlite store)",
    ]
    m = res.get("manifest") or {}
    for key in ("train_loss", "tokens_per_s", "train_steps", "train_runtime_s", "trainable_params"):
        value = _find(m, key)
        if isinstance(value, (int, float)):
            lines.append(f"- {key}: {value:,.0f}" if abs(value) >= 100 else f"- {key}: {value:.4g}")
        elif value is not None:
            lines.append(f"- {key}: {value}")
    if res.get("cuda_lines"):
        lines.append("- the LoRA pass's CUDA choices (its log):")
        lines += [f"  - {c}" for c in res["cuda_lines"]]
    if res.get("outputs"):
        # the output's entries link into .orch-versions/<version>/ (orch publishes each run as a new version)
        parts = [o.split("/") for o in res["outputs"]]
        names = {q[2] if q[0] == ".orch-versions" and len(q) > 2 else q[0] for q in parts}
        top = sorted(names - {".orch-publish.lock"})
        lines.append(f"- output folder: {', '.join(top)}")
    if res["rc"] != 0:
        lines.append("- log tail: " + " | ".join(res.get("log_tail", [])[-6:]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--work", type=Path, default=Path("/tmp/orch_gpu_cli"))
    r.add_argument("--max-steps", type=int, help="instead of the demo's 60 (a quick check on CPU)")
    g = sub.add_parser("render")
    g.add_argument("cli_json", type=Path)
    g.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "run":
        res = run(args.out, args.work, args.max_steps)
        print(json.dumps({k: res[k] for k in ("rc", "wall_s", "cuda_lines")}, indent=1))
        return 0
    md = render(json.loads(args.cli_json.read_text()))
    if args.no_write:
        print(md)
    else:
        harness.write_section(BENCH / "RESULTS.md", SECTION, md.rstrip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
