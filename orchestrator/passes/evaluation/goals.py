"""Olive's metric goals: which way a sub-type is better, and whether a measured value meets its goal.

Why apart: a threshold goal is compared as soon as the Evaluate pass measured the value, an improvement or
degradation goal only once the engine has both the input model's and the final model's metrics; both read the
same rule (the sub-type's direction, the goal's target), written once here.
"""

from __future__ import annotations

from typing import Any

from orchestrator.passes.evaluation.metric_config import ALIASES, MetricConfig, SubType


def higher_is_better(sub: SubType) -> bool:
    """The sub-type's own higher_is_better, else Olive's defaults: accuracy and throughput up, perplexity / loss /
    latency down."""
    if sub.higher_is_better is not None:
        return sub.higher_is_better
    key = ALIASES.get(sub.name, sub.name)
    return key in ("accuracy", "decode_tokens_per_s", "e2e_tokens_per_s", "n_samples", "n_tokens")


def goal_target(goal: dict[str, Any], higher: bool, baseline: float | None) -> float | None:
    """The value a goal asks for: the threshold itself, or the input model's value moved by the allowed change
    (None when a relative goal has no baseline)."""
    kind, value = goal["type"], float(goal["value"])
    if kind == "threshold":
        return value
    if baseline is None:
        return None
    step = value if not kind.startswith("percent") else abs(baseline) * value / 100
    better = kind.endswith("improvement")
    return baseline + step if higher == better else baseline - step


def _met(value: float, target: float, higher: bool) -> bool:
    return value >= target if higher else value <= target


def threshold_goals(metric: MetricConfig, results: dict[str, float]) -> tuple[dict[str, float], list[str]]:
    """Olive's threshold goals of one measured metric, compared at once: ({metric-sub-goal_met: 0/1}, one line
    each)."""
    out: dict[str, float] = {}
    lines: list[str] = []
    for sub in metric.sub_types:
        if sub.goal is not None and sub.goal["type"] == "threshold":
            value, target = results[f"{metric.name}-{sub.name}"], float(sub.goal["value"])
            higher = higher_is_better(sub)
            met = _met(value, target, higher)
            out[f"{metric.name}-{sub.name}-goal_met"] = float(met)
            lines.append(
                f"goal {metric.name}-{sub.name} {'>=' if higher else '<='} {target:g}: "
                f"{value:.4g} -> {'met' if met else 'NOT met'}"
            )
    return out, lines


def relative_goals(metrics: list[MetricConfig], baseline: dict[str, float], final: dict[str, float]) -> tuple[
        dict[str, float], list[str]]:  # fmt: skip
    """Olive's improvement/degradation goals of checked metrics, compared once both the input model's and the
    final model's metrics are known: ({metric-sub-goal_met: 0/1}, one line each)."""
    out: dict[str, float] = {}
    lines: list[str] = []
    for metric in metrics:
        for sub in metric.sub_types:
            if sub.goal is None or sub.goal["type"] == "threshold":
                continue
            key = f"{metric.name}-{sub.name}"
            higher = higher_is_better(sub)
            target = goal_target(sub.goal, higher, baseline.get(key))
            if target is None or key not in final:
                lines.append(f"goal {key} ({sub.goal['type']} {sub.goal['value']:g}) not compared: the input model "
                             "has no value for it (an HF model has no ONNX session to time)")  # fmt: skip
                continue
            met = _met(final[key], target, higher)
            out[f"{key}-goal_met"] = float(met)
            verdict = "met" if met else "NOT met"
            lines.append(f"goal {key} ({sub.goal['type']} {sub.goal['value']:g} from {baseline[key]:.4g}): "
                         f"{'>=' if higher else '<='} {target:.4g}: {final[key]:.4g} -> {verdict}")  # fmt: skip
    return out, lines
