"""Evaluate (Olive's name): perplexity, accuracy, latency and throughput of a model, on the target system.

Olive-like metric configs: {name, type, data_config, sub_types: [{name}], user_config: {...}}; metric names
are emitted as "<name>-<sub_type>" (Olive's joint names). Works on onnx_genai models through onnxruntime-genai
and on hf / hf_adapter models through transformers (perplexity and accuracy), so the input and the output of
a workflow are measured the same way. The model passes through unchanged.

This module is the pass: its config, which measurement each metric gets, the names its values are emitted
under. The parts live beside it: metric_config (Olive's metric models), metric_inputs (the rows and shapes a
metric reads), scorers, quality (perplexity, accuracy), latency (timings), goals.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import HeldOut, Pass, PassConfig, PassContext, PassError, PassOutput, Requirements
from orchestrator.passes.evaluation import metric_inputs
from orchestrator.passes.evaluation.goals import relative_goals, threshold_goals
from orchestrator.passes.evaluation.latency import graph_latency, speed
from orchestrator.passes.evaluation.metric_config import (
    ALIASES,
    OLIVE_LATENCY,
    SUB_TYPES,
    MetricConfig,
    olive_notes,
    unknown_sub_types,
)
from orchestrator.passes.evaluation.quality import accuracy, perplexity
from orchestrator.passes.evaluation.scorers import make_scorer


class EvaluateConfig(PassConfig):
    """Which rows: `split` (datasets syntax, e.g. "test" or "train[80%:]") if set; else the rows that
    eval_dataset_size carves off the data config's split (seed 42 = LoRA's data_seed: its held-out rows);
    else the whole split."""

    metrics: list[MetricConfig]
    split: str | None = None
    eval_dataset_size: float | int | None = Field(None, gt=0)
    seed: int = 42
    # set by the engine for engine.evaluate_input_model: an HF input model has no ONNX runtime to time, so its
    # latency/throughput metrics are skipped (with a line in the log) instead of failing the run
    skip_speed_unless_onnx: bool = False


class EvaluatePass(Pass):
    """Measure a model; emit metrics; hand the model on unchanged."""

    type_name = "Evaluate"
    Config = EvaluateConfig
    version = "1"
    libraries = ("onnxruntime-genai", "onnxruntime", "transformers", "torch")

    def requirements(self, config: PassConfig) -> Requirements:
        return Requirements(cuda=False, environment="cpu-export")

    @classmethod
    def evaluator_config(cls, metrics: list[dict[str, Any]], held_out: HeldOut | None) -> dict[str, Any]:
        """The config of the run's evaluation step: the workflow evaluator's metrics, scored on the rows a
        fine-tune held out (its eval_dataset_size and seed) when it trained on the metrics' data."""
        config: dict[str, Any] = {"metrics": metrics}
        if held_out is not None:
            config["eval_dataset_size"] = held_out.size
            config["seed"] = held_out.seed
        return config

    @classmethod
    def compare_with_baseline(
        cls, config: dict[str, Any], baseline: dict[str, float], final: dict[str, float]
    ) -> tuple[dict[str, float], list[str]]:
        """The engine's call once the input model's and the final model's metrics are in: relative goals."""
        return relative_goals(EvaluateConfig.model_validate(config).metrics, baseline, final)

    @classmethod
    def metric_checks(cls, metric: MetricConfig) -> tuple[list[str], str | None]:
        """The workflow reader's call before any pass runs: (notes on the Olive metric, its problem or None)."""
        return olive_notes(metric), unknown_sub_types(metric)

    @classmethod
    def baseline_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Olive's baseline (engine.evaluate_input_model): the same metrics on the same rows for the input model;
        an HF input has no ONNX runtime to time, so its speed metrics are skipped."""
        return {**config, "skip_speed_unless_onnx": True}

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, EvaluateConfig)
        if model is None:
            raise PassError("Evaluate needs an input model")
        for metric in config.metrics:
            problem = unknown_sub_types(metric)
            if problem:
                raise PassError(f"Evaluate: {problem}")
            if metric.type in ("perplexity", "accuracy") and not metric.data_config:
                raise PassError(f"Evaluate: metric {metric.name!r} ({metric.type}) needs a data_config")

        ep = ctx.job.execution_providers[0] if ctx.job.execution_providers else "CPUExecutionProvider"
        scorers: list[Any] = []

        def scorer() -> Any:  # loaded once, only for metrics that need it (dummy-data latency does not)
            if not scorers:
                t0 = time.perf_counter()
                scorers.append(make_scorer(model, ep))
                ctx.info(f"loaded {model.format} model from {model.path} in {time.perf_counter() - t0:.2f} s")
            return scorers[0]

        results: dict[str, float] = {}
        for i, metric in enumerate(config.metrics):
            ctx.progress(i, len(config.metrics), metric.name)
            timed = metric.type in ("latency", "throughput")
            if timed and config.skip_speed_unless_onnx and model.format not in ("onnx_genai", "onnx"):
                ctx.info(f"{metric.name} ({metric.type}) skipped: measured on ONNX models only, this is {model.format}")
                continue
            values = self._measure(metric, scorer, ctx, config, model, ep)
            names = (
                [s.name for s in metric.sub_types]
                or [k for k in SUB_TYPES[metric.type] if k in values]
                or [k for k in OLIVE_LATENCY if k in values]
            )
            for name in names:
                key = name if name in values else ALIASES.get(name, name)
                if key not in values:
                    raise PassError(
                        f"Evaluate: metric {metric.name!r} sub_type {name!r} is not measured on this model "
                        f"({model.format}); measured: {', '.join(sorted(values))}"
                    )
                results[f"{metric.name}-{name}"] = float(values[key])
                ctx.log_metric(f"{metric.name}-{name}", values[key])
            goals, lines = threshold_goals(metric, results)  # Olive's threshold goals: compared and reported, 1 = met
            results.update(goals)
            for line in lines:
                ctx.info(line)
        ctx.progress(len(config.metrics), len(config.metrics), "done")
        passthrough = model.with_root(Path.cwd())
        return PassOutput(model=passthrough, metrics=results)

    def _measure(
        self,
        metric: MetricConfig,
        scorer: Callable[[], Any],
        ctx: PassContext,
        config: EvaluateConfig,
        model: ModelArtifact,
        ep: str,
    ) -> dict[str, float]:
        uc = metric.user_config
        dummy = metric_inputs.dummy_config(ctx, metric.data_config)
        if dummy is not None:
            if metric.type != "latency":
                raise PassError(
                    f"Evaluate: metric {metric.name!r} ({metric.type}) on {dummy['type']} {metric.data_config!r}: "
                    "random token ids only serve latency; name a HuggingfaceContainer"
                )
            return graph_latency(model, dummy, ep, uc, ctx)
        if model.format == "onnx" and metric.type == "latency" and metric.data_config:
            padded = metric_inputs.padded_text_shape(ctx, metric.data_config)
            if padded is not None:
                return graph_latency(model, padded, ep, uc, ctx)
        if model.format == "onnx":
            raise PassError(
                f"Evaluate: metric {metric.name!r} ({metric.type}) on a plain ONNX graph: orch measures these on "
                "onnx_genai models (add ModelBuilder, or ModelBuilder metadata_only); a latency metric can time "
                "the graph on a TransformersPromptDummyDataContainer / TransformersTokenDummyDataContainer, or on a "
                "text data config whose samples are padded (pre_process_data_config.pad_to_max_len true)"
            )
        if metric.type in ("latency", "throughput"):
            return speed(scorer(), uc)
        assert metric.data_config is not None
        if metric.type == "perplexity":
            texts = metric_inputs.load_texts(ctx, metric.data_config, config)
            return perplexity(scorer(), texts[: uc.max_samples], uc.max_length)
        scorer = scorer()  # type: ignore[assignment]
        rows, data_template = metric_inputs.load_labelled(ctx, metric.data_config, config)
        rows = rows[: uc.max_samples]
        template = uc.prompt_template or data_template
        if not template:
            raise PassError(
                f"Evaluate: accuracy metric {metric.name!r} needs user_config.prompt_template (e.g. "
                f"'{{text}} ### The tone is: {{{uc.label_col}}}') or a data config with a text_template"
            )
        return accuracy(
            scorer,
            rows,
            template=template,
            label_col=uc.label_col,
            labels=uc.labels,
            method=uc.method,
            max_new_tokens=min(uc.max_new_tokens, 8),
            chat=uc.chat,
            num_classes=uc.num_classes,
        )
