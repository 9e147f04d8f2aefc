"""Olive's metric configs, checked when a workflow is read: what an evaluator's metrics may ask for.

Why apart from the pass: the workflow reader checks the evaluator's metrics (sub_types, goals, Olive's
metric_config and backend keys) before any pass runs, and the scorers, metrics and goals read the same models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MetricType = Literal["perplexity", "accuracy", "latency", "throughput"]

# Olive's latency sub-types: statistics of timed session runs, in ms. On a dummy data container they time one
# forward pass of the graph on its inputs (as Olive does); on an onnx_genai model without one, the prompt's prefill.
OLIVE_LATENCY = ("avg", "max", "min", "p50", "p75", "p90", "p95", "p99", "p999")
SUB_TYPES: dict[str, tuple[str, ...]] = {
    "perplexity": ("perplexity", "eval_loss", "n_tokens"),
    "accuracy": ("accuracy", "n_samples"),
    "latency": ("prefill_p50_ms", "prefill_p90_ms", "prefill_avg_ms", "decode_ms_per_token"),
    "throughput": ("decode_tokens_per_s", "e2e_tokens_per_s"),
}
# Olive's sub-type names, mapped onto ours (latency sub-types are about the prompt's prefill).
ALIASES = {
    "accuracy_score": "accuracy",
    "avg": "prefill_avg_ms",
    "p50": "prefill_p50_ms",
    "p90": "prefill_p90_ms",
    "loss": "eval_loss",
}


class SubType(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    priority: int | None = None
    higher_is_better: bool | None = None
    goal: dict[str, Any] | None = None
    # Olive's per-sub-type library options: MetricConfig maps the keys orch's evaluator has onto user_config
    # and refuses the rest, so none is ignored
    metric_config: dict[str, Any] | None = None


class UserConfig(BaseModel):
    """Per-metric knobs; Olive names where Olive has one (max_samples, warmup_num, repeat_test_num)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_samples: int | None = None
    max_length: int = 512  # tokens per text for perplexity (longer texts are truncated)
    label_col: str = "label"
    labels: list[str] | None = None  # candidate labels; default: the distinct values of label_col
    prompt_template: str | None = None  # "{text} ### The tone is: {tone}"; default: the data config's template
    method: Literal["loglik", "generate"] = "loglik"
    max_new_tokens: int = 32  # latency/throughput decode length; generate-accuracy uses 8 unless set lower
    prompt: str | None = None  # latency prompt; default: prompt_tokens tokens of a fixed English text
    prompt_tokens: int = 32
    warmup_num: int = 2
    repeat_test_num: int = 10
    sleep_num: float = Field(0, ge=0)  # seconds slept between timed runs (Olive's LatencyMetricConfig)
    num_classes: int | None = Field(None, gt=0)  # checked against the candidate labels (Olive's torchmetrics arg)
    batch_size: int = Field(1, gt=0)  # rows are scored one by one: a batch changes no perplexity/accuracy value
    runs: int | None = None  # same as repeat_test_num (wins when set)
    chat: bool = False  # wrap prompts in the tokenizer's chat template (latency, generate-accuracy)
    # Olive's session options for the timed graph (an OrtSessionParamsTuning result's shape); latency on a dummy
    # data container runs with them
    inference_settings: dict[str, Any] | None = None
    io_bind: bool = False  # Olive's I/O binding: noted (olive_notes)
    shared_kv_buffer: bool = False  # Olive's DirectML KV buffer sharing: noted
    run_kwargs: dict[str, Any] | None = None  # Olive's extra session.run kwargs: noted

    @property
    def repeats(self) -> int:
        """Timed runs: `runs` when set, else Olive's repeat_test_num."""
        return self.runs if self.runs is not None else self.repeat_test_num


class MetricConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    type: MetricType
    data_config: str | None = None
    sub_types: list[SubType] = Field(default_factory=list)
    user_config: UserConfig = Field(default_factory=UserConfig)
    backend: Literal["torch_metrics"] | None = None  # Olive's default backend: what orch computes natively

    @model_validator(mode="before")
    @classmethod
    def _olive_perplexity(cls, data: Any) -> Any:
        """Olive writes perplexity as type accuracy with sub_type perplexity: the same metric here."""
        if isinstance(data, dict) and data.get("type") == "accuracy":
            subs = [s.get("name") if isinstance(s, dict) else s for s in data.get("sub_types") or []]
            if subs and all(s == "perplexity" for s in subs):
                return {**data, "type": "perplexity"}
        return data

    @model_validator(mode="before")
    @classmethod
    def _olive_metric_config(cls, data: Any) -> Any:
        """Olive's backend and sub_types[].metric_config: what orch's evaluator has is mapped onto user_config,
        the rest refused (a one-line error when the config is read), so nothing is ignored."""
        if not isinstance(data, dict):
            return data
        if data.get("backend") not in (None, "torch_metrics"):
            raise ValueError(
                f"metric {data.get('name')!r}: backend {data['backend']!r} is not supported: orch computes "
                "perplexity/accuracy/latency itself (as Olive's default torch_metrics backend does); drop backend"
            )
        user = dict(data.get("user_config") or {})
        for sub in data.get("sub_types") or []:
            mc = sub.get("metric_config") if isinstance(sub, dict) else None
            if not mc:
                continue
            for key, value in mc.items():
                mapped = _map_metric_config(str(data.get("type")), key, value, data.get("name"))
                if mapped is None:
                    continue
                ukey, uvalue = mapped
                if ukey in user and user[ukey] != uvalue:
                    raise ValueError(
                        f"metric {data.get('name')!r}: metric_config {key}={value!r} disagrees with "
                        f"user_config.{ukey}={user[ukey]!r}; keep one"
                    )
                user[ukey] = uvalue
        if user.get("batch_size", 1) != 1 and data.get("type") in ("latency", "throughput"):
            raise ValueError(
                f"metric {data.get('name')!r}: batch_size {user['batch_size']} is not supported for "
                f"{data.get('type')}: orch times batch-1 generation (tokens/s of one stream)"
            )
        return {**data, "user_config": user} if user or "user_config" in data else data

    @model_validator(mode="after")
    def _known_sub_types_and_goals(self) -> MetricConfig:
        """Checked when the config is read, not after every pass ran (sub_types: unknown_sub_types)."""
        for s in self.sub_types:
            kind = (s.goal or {}).get("type")
            if s.goal is not None and (kind not in GOAL_TYPES or not isinstance(s.goal.get("value"), int | float)):
                raise ValueError(
                    f"metric {self.name!r} sub_type {s.name!r}: goal {s.goal} is not supported: give "
                    f'{{"type": one of {", ".join(GOAL_TYPES)}, "value": N}}'
                )
        return self


# Olive's goal types: a fixed value, or a change from the input model's value (engine.evaluate_input_model)
GOAL_TYPES = ("threshold", "min-improvement", "max-degradation", "percent-min-improvement", "percent-max-degradation")


def _map_metric_config(kind: str, key: str, value: Any, name: Any) -> tuple[str, Any] | None:
    """One Olive metric_config key -> (user_config key, value), None when it is Olive's default (a no-op),
    ValueError when orch's evaluator cannot do it."""
    if kind in ("latency", "throughput") and key in ("warmup_num", "repeat_test_num", "sleep_num"):
        return key, value
    if kind == "accuracy":
        if key == "num_classes":
            return key, value
        if (key, value) in (("task", "multiclass"), ("task", "binary"), ("top_k", 1), ("average", "micro")):
            return None  # exact match over the candidate labels is torchmetrics' multiclass micro top-1
    if kind == "perplexity" and key == "ignore_index" and value in (None, -100):
        return None  # no padded tokens are scored
    raise ValueError(
        f"metric {name!r} ({kind}): metric_config {key}={value!r} is not supported: orch's {kind} takes "
        + {
            "latency": "warmup_num, repeat_test_num, sleep_num",
            "throughput": "warmup_num, repeat_test_num, sleep_num",
            "accuracy": "num_classes, task multiclass/binary, top_k 1, average micro (exact label match)",
            "perplexity": "no options (ignore_index -100 only)",
        }.get(kind, "none")
    )


def olive_notes(metric: MetricConfig) -> list[str]:
    """What the reader says about a checked metric's Olive keys that are accepted without changing a value."""
    notes = []
    if metric.backend:
        notes.append(f"metric {metric.name!r}: backend {metric.backend} accepted (orch computes it natively)")
    uc = metric.user_config
    if uc.io_bind:
        notes.append(f"metric {metric.name!r}: io_bind accepted, no effect on the values (CPU tensors are already "
                     "where the session runs; onnxruntime-genai binds its own buffers)")  # fmt: skip
    if uc.shared_kv_buffer:
        notes.append(f"metric {metric.name!r}: shared_kv_buffer accepted, no effect (onnxruntime-genai manages "
                     "the KV cache buffers)")  # fmt: skip
    if uc.inference_settings:
        notes.append(f"metric {metric.name!r}: inference_settings apply to latency timed on a dummy data container's "
                     "graph; onnxruntime-genai generation runs with genai_config.json's session options")  # fmt: skip
    if uc.run_kwargs:
        notes.append(f"metric {metric.name!r}: run_kwargs accepted, no effect (sessions run with their defaults)")
    if metric.user_config.batch_size != 1:
        notes.append(
            f"metric {metric.name!r}: batch_size {metric.user_config.batch_size} accepted, changes no value "
            f"(rows are scored one by one)"
        )
    return notes


def unknown_sub_types(metric: MetricConfig) -> str | None:
    """The one-line problem of a metric whose sub_types the Evaluate pass does not compute, else None."""
    known = set(SUB_TYPES[metric.type]) | {k for k, v in ALIASES.items() if v in SUB_TYPES[metric.type]}
    if metric.type == "latency":
        known |= set(OLIVE_LATENCY)
    unknown = [s.name for s in metric.sub_types if s.name not in known]
    if not unknown:
        return None
    return f"metric {metric.name!r} ({metric.type}) has unknown sub_types {unknown}; known: {sorted(known)}"
