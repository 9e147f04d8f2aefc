"""What a run works out from its steps' results for its summary: the relative goals (the final evaluation against
the input model's), what a step cost, and the prompt format the final model was last fine-tuned with. Each reads
the records the steps left; none runs anything.
"""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.core.job import JobResult, ModelArtifact, is_uri
from orchestrator.core.prompt import PromptFormat, read_prompt_format
from orchestrator.engine.steps import INPUT_EVAL_STEP, Step, StepRecord
from orchestrator.engine.tracking import Tracker
from orchestrator.passes.registry import load_pass
from orchestrator.systems.base import NodePrice


def baseline_comparison(
    steps: list[Step], records: list[StepRecord], tracker: Tracker, note: Callable[[str], None]
) -> dict[str, float]:
    """Olive's relative goals: the final evaluation against the input model's (engine.evaluate_input_model),
    compared by the Evaluate pass once both are known; each result is a note and a metric."""
    by_name = {r.name: r for r in records}
    final = next((s for s in steps if s.role == "target" and s.name != INPUT_EVAL_STEP), None)
    if final is None or INPUT_EVAL_STEP not in by_name or final.name not in by_name:
        return {}
    compare = getattr(load_pass(final.pass_type), "compare_with_baseline", None)
    if compare is None:
        return {}
    results, lines = compare(final.config, by_name[INPUT_EVAL_STEP].metrics, by_name[final.name].metrics)
    for line in lines:
        note(line)
    out = {f"{final.name}/{k}": v for k, v in results.items()}
    for k, v in out.items():
        tracker.log_metric(k, v)
    return out


def final_prompt_format(start: ModelArtifact, steps: list[Step], records: list[StepRecord]) -> PromptFormat | None:
    """The prompt format the final model was last fine-tuned with: the latest one recorded along the chain
    (the input model's folder, then each pass's output; an adapter before the model it sits on)."""
    host = {s.name for s in steps if s.role == "host"}
    artifacts = [start.model_dump()] + [r.output for r in records if r.name in host and r.output]
    found = None
    for art in artifacts:
        for path in (art.get("adapter_path"), art.get("path")):
            fmt = read_prompt_format(path) if path and not is_uri(path) else None
            if fmt is not None:
                found = fmt
                break
    return found


def step_cost(price: NodePrice | None, result: JobResult) -> dict[str, float] | None:
    """cost_usd = nodes x hours x price per node-hour, and tokens_per_usd for a pass that counts the tokens
    it trained on (train_tokens). `price`: the compute the step ran on (None: unknown, no cost)."""
    if price is None:
        return None
    usd = price.nodes * result.duration_s / 3600.0 * price.usd_per_hour
    out = {"cost_usd": usd}
    tokens = result.metrics.get("train_tokens")
    if tokens and usd > 0:
        out["tokens_per_usd"] = float(tokens) / usd
    return out
