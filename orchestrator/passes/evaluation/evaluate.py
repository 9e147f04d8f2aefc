"""Evaluate (Olive's name): perplexity, accuracy, latency and throughput of a model, on the target system.

Olive-like metric configs: {name, type, data_config, sub_types: [{name}], user_config: {...}}; metric names
are emitted as "<name>-<sub_type>" (Olive's joint names). Works on onnx_genai models through onnxruntime-genai
and on hf / hf_adapter models through transformers (perplexity and accuracy), so the input and the output of
a workflow are measured the same way. Accuracy scores each candidate label by its log-likelihood after the
prompt (deterministic and meaningful even for tiny random models); `method: generate` compares greedy output.
The model passes through unchanged.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import HeldOut, Pass, PassConfig, PassContext, PassError, PassOutput, Requirements

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

DEFAULT_LATENCY_TEXT = "the quick brown fox jumps over the lazy dog. I feel happy, sad, afraid and surprised today. "


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


def relative_goals(config: dict[str, Any], baseline: dict[str, float], final: dict[str, float]) -> tuple[
        dict[str, float], list[str]]:  # fmt: skip
    """Olive's improvement/degradation goals of an Evaluate config, compared once both the input model's and the
    final model's metrics are known: ({metric-sub-goal_met: 0/1}, one line each)."""
    checked = EvaluateConfig.model_validate(config)
    out: dict[str, float] = {}
    lines: list[str] = []
    for metric in checked.metrics:
        for sub in metric.sub_types:
            if sub.goal is None or sub.goal["type"] == "threshold":
                continue
            key = f"{metric.name}-{sub.name}"
            higher = sub.higher_is_better if sub.higher_is_better is not None else _higher_is_better(sub.name)
            target = goal_target(sub.goal, higher, baseline.get(key))
            if target is None or key not in final:
                lines.append(f"goal {key} ({sub.goal['type']} {sub.goal['value']:g}) not compared: the input model "
                             "has no value for it (an HF model has no ONNX session to time)")  # fmt: skip
                continue
            met = final[key] >= target if higher else final[key] <= target
            out[f"{key}-goal_met"] = float(met)
            verdict = "met" if met else "NOT met"
            lines.append(f"goal {key} ({sub.goal['type']} {sub.goal['value']:g} from {baseline[key]:.4g}): "
                         f"{'>=' if higher else '<='} {target:.4g}: {final[key]:.4g} -> {verdict}")  # fmt: skip
    return out, lines


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


# ---------------------------------------------------------------------------------------------- scorers


def unknown_sub_types(metric: MetricConfig) -> str | None:
    """The one-line problem of a metric whose sub_types this pass does not compute, else None."""
    known = set(SUB_TYPES[metric.type]) | {k for k, v in ALIASES.items() if v in SUB_TYPES[metric.type]}
    if metric.type == "latency":
        known |= set(OLIVE_LATENCY)
    unknown = [s.name for s in metric.sub_types if s.name not in known]
    if not unknown:
        return None
    return f"metric {metric.name!r} ({metric.type}) has unknown sub_types {unknown}; known: {sorted(known)}"


def _higher_is_better(sub_type: str) -> bool:
    """Olive's defaults: accuracy and throughput up, perplexity / loss / latency down."""
    key = ALIASES.get(sub_type, sub_type)
    return key in ("accuracy", "decode_tokens_per_s", "e2e_tokens_per_s", "n_samples", "n_tokens")


class Scorer(Protocol):
    """What the metrics need from a model, whatever runs it."""

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def logits(self, ids: Sequence[int]) -> Any: ...  # (len(ids), vocab) float32
    def generate_ids(self, ids: Sequence[int], max_new_tokens: int) -> list[int]: ...
    def chat_prompt(self, text: str) -> str: ...


class HfScorer:
    """transformers fp32 on CPU; hf_adapter = base model + PEFT adapter (not merged)."""

    def __init__(self, model: ModelArtifact) -> None:
        from transformers import AutoTokenizer

        from orchestrator.passes.common import onnx_tools

        self.net = onnx_tools.load_hf_model(model.path, model.trust_remote_code)
        tok_dir = model.path
        if model.format == "hf_adapter":
            from peft import PeftModel

            if not model.adapter_path:
                raise PassError("Evaluate: an hf_adapter model needs adapter_path")
            self.net = PeftModel.from_pretrained(self.net, model.adapter_path).eval()
            if (Path(model.adapter_path) / "tokenizer_config.json").exists():
                tok_dir = model.adapter_path
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=model.trust_remote_code)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def logits(self, ids: Sequence[int]) -> Any:
        from orchestrator.passes.common import onnx_tools

        return onnx_tools.hf_logits(self.net, ids)

    def generate_ids(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        import torch

        with torch.no_grad():
            out = self.net.generate(
                torch.tensor([list(ids)]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return [int(i) for i in out[0, len(ids) :]]

    def chat_prompt(self, text: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )


def make_scorer(model: ModelArtifact, execution_provider: str) -> Any:
    """onnx_genai -> onnxruntime-genai; hf/hf_adapter -> transformers."""
    if model.format == "onnx_genai":
        from orchestrator.passes.common import onnx_tools

        return onnx_tools.GenaiModel(model.path, execution_provider)
    if model.format in ("hf", "hf_adapter"):
        return HfScorer(model)
    raise PassError(
        f"Evaluate: format {model.format!r} is not supported; evaluate an onnx_genai folder (ModelBuilder output) "
        "or an HF checkpoint"
    )


# ---------------------------------------------------------------------------------------------- metrics


def _log_softmax(x: Any) -> Any:
    import numpy as np

    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def perplexity(scorer: Scorer, texts: Sequence[str], max_length: int = 512) -> dict[str, float]:
    """Token-level perplexity = exp(mean next-token NLL) over all texts (each truncated to max_length)."""
    total_nll, total = 0.0, 0
    for text in texts:
        ids = scorer.encode(text)[:max_length]
        if len(ids) < 2:
            continue
        logp = _log_softmax(scorer.logits(ids)[:-1])
        total_nll -= float(sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1)))
        total += len(ids) - 1
    if total == 0:
        raise PassError("Evaluate: perplexity needs texts of at least 2 tokens; the data gave none")
    loss = total_nll / total
    return {"perplexity": math.exp(loss), "eval_loss": loss, "n_tokens": float(total)}


def continuation_logprob(scorer: Scorer, prompt: str, continuation: str) -> float:
    """log p(continuation | prompt), over the tokens of encode(prompt + continuation) past the common prefix,
    so BPE merges across the boundary are scored as the model saw them in training."""
    p_ids = scorer.encode(prompt)
    ids = scorer.encode(prompt + continuation)
    k = 0
    while k < min(len(p_ids), len(ids)) and p_ids[k] == ids[k]:
        k += 1
    k = max(k, 1)
    if k >= len(ids):
        return 0.0
    logp = _log_softmax(scorer.logits(ids)[k - 1 : -1])
    return float(sum(logp[j, ids[k + j]] for j in range(len(ids) - k)))


def prompt_prefix(template: str, label_col: str) -> str:
    """The template up to the label's placeholder: what the model sees before it should say the label."""
    from orchestrator.passes.common.data import template_columns

    fields = template_columns(template)
    if label_col not in fields:
        raise PassError(
            f"Evaluate: the prompt template has no {{{label_col}}} placeholder (fields: {fields}); set "
            "user_config.prompt_template or user_config.label_col"
        )
    return template[: template.index("{" + label_col + "}")]


def accuracy(
    scorer: Scorer,
    rows: Sequence[dict[str, Any]],
    *,
    template: str,
    label_col: str,
    labels: Sequence[str] | None = None,
    method: str = "loglik",
    max_new_tokens: int = 8,
    chat: bool = False,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Fraction of rows whose label the model picks: the most likely candidate (loglik) or greedy output."""

    def label_of(row: dict[str, Any]) -> str:
        value = row[label_col]
        return str(labels[value]) if labels is not None and isinstance(value, int) else str(value)

    from orchestrator.passes.common.data import _render

    if not rows:
        raise PassError("Evaluate: accuracy needs labelled rows; the data gave none")
    prefix = prompt_prefix(template, label_col)
    if label_col not in rows[0]:
        raise PassError(
            f"Evaluate: label_col {label_col!r} is not a column of the data (columns: {', '.join(rows[0])}); "
            "set user_config.label_col"
        )
    candidates = list(labels) if labels else sorted({label_of(r) for r in rows})
    if num_classes is not None and len(candidates) != num_classes:
        raise PassError(
            f"Evaluate: num_classes {num_classes} but the candidate labels are {len(candidates)} ({candidates}); "
            "fix num_classes or set user_config.labels"
        )
    correct = 0
    for row in rows:
        prompt = _render(prefix, {k: v for k, v in row.items() if k != label_col})
        if chat:
            prompt = scorer.chat_prompt(prompt)
        gold = label_of(row)
        if method == "loglik":
            scores = [continuation_logprob(scorer, prompt, c) for c in candidates]
            pred = candidates[max(range(len(candidates)), key=scores.__getitem__)]
        else:
            out = scorer.decode(scorer.generate_ids(scorer.encode(prompt), max_new_tokens)).strip().lower()
            pred = next((c for c in candidates if out.startswith(c.lower())), None)
        correct += pred == gold
    return {"accuracy": correct / len(rows), "n_samples": float(len(rows))}


def _percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """Olive's latency sub-types (ms) of timed runs."""
    ms = [x * 1000 for x in seconds]
    quantiles = {"p50": 0.5, "p75": 0.75, "p90": 0.9, "p95": 0.95, "p99": 0.99, "p999": 0.999}
    return {
        "avg": statistics.fmean(ms), "max": max(ms), "min": min(ms),
        **{name: _percentile(ms, q) for name, q in quantiles.items()},
    }  # fmt: skip


def timed_runs(run: Callable[[], Any], warmup: int, repeat: int, sleep: float = 0.0) -> list[float]:
    """Seconds of `repeat` calls of run() after `warmup` untimed ones (sleep s between timed calls)."""
    for _ in range(warmup):
        run()
    times: list[float] = []
    for _ in range(max(1, repeat)):
        if sleep and times:
            time.sleep(sleep)
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def session_latency(session: Any, feed: dict[str, Any], uc: UserConfig) -> dict[str, float]:
    """Olive's ONNX latency: warmup_num runs, then repeat_test_num timed runs of session.run on one input
    (sleep_num s between them)."""
    repeat = uc.runs if uc.runs is not None else uc.repeat_test_num
    return latency_stats(timed_runs(lambda: session.run(None, feed), uc.warmup_num, repeat, uc.sleep_num or 0.0))


def speed(scorer: Any, uc: UserConfig) -> dict[str, float]:
    """Prefill (time to first token) and decode timings of greedy generation, after warmup runs."""
    if not hasattr(scorer, "timed_generation"):
        raise PassError("Evaluate: latency/throughput are measured on onnx_genai models; add a ModelBuilder pass")
    if uc.prompt is not None:
        text = scorer.chat_prompt(uc.prompt) if uc.chat else uc.prompt
        ids = scorer.encode(text)
    else:
        base = scorer.encode(DEFAULT_LATENCY_TEXT)
        ids = (base * (uc.prompt_tokens // len(base) + 1))[: uc.prompt_tokens]
    if uc.max_new_tokens < 2:
        raise PassError("Evaluate: latency/throughput need user_config.max_new_tokens >= 2")
    for _ in range(uc.warmup_num):
        scorer.timed_generation(ids, uc.max_new_tokens)
    prefill, steps, e2e = [], [], []
    for _ in range(max(1, uc.runs if uc.runs is not None else uc.repeat_test_num)):
        if uc.sleep_num and prefill:
            time.sleep(uc.sleep_num)
        p, s = scorer.timed_generation(ids, uc.max_new_tokens)
        prefill.append(p)
        steps.extend(s)
        e2e.append((len(s) + 1) / (p + sum(s)))
    decode_s = sum(steps) / len(steps)
    return {
        **latency_stats(prefill),
        "prefill_p50_ms": _percentile(prefill, 0.5) * 1000,
        "prefill_p90_ms": _percentile(prefill, 0.9) * 1000,
        "prefill_avg_ms": statistics.fmean(prefill) * 1000,
        "decode_ms_per_token": decode_s * 1000,
        "decode_tokens_per_s": 1.0 / decode_s,
        "e2e_tokens_per_s": statistics.fmean(e2e),
        "prompt_tokens": float(len(ids)),
    }


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
        return relative_goals(config, baseline, final)

    @classmethod
    def baseline_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Olive's baseline (engine.evaluate_input_model): the same metrics on the same rows for the input model;
        an HF input has no ONNX runtime to time, so its speed metrics are skipped."""
        return {**config, "skip_speed_unless_onnx": True}

    def _data_config(self, ctx: PassContext, name: str) -> dict[str, Any]:
        if name not in ctx.job.data_configs:
            known = ", ".join(sorted(ctx.job.data_configs)) or "none"
            raise PassError(f"Evaluate: data config {name!r} is not in the workflow's data_configs (known: {known})")
        return ctx.job.data_configs[name]

    def load_texts(self, ctx: PassContext, name: str, config: EvaluateConfig) -> list[str]:
        """Templated texts of the evaluated rows (passes.common.data loads and templates them, as for LoRA)."""
        from orchestrator.passes.common.data import load_splits

        train, eval_ = load_splits(
            self._data_config(ctx, name),
            base_dir=None,  # relative data paths resolve against the working directory, as in LoRA
            eval_dataset_size=None if config.split else config.eval_dataset_size,
            train_split=config.split,
            seed=config.seed,
            data_files_override=ctx.job.data_files.get(name),
        )
        ds = eval_ if eval_ is not None else train
        return [str(t) for t in ds["text"]]

    def load_labelled(self, ctx: PassContext, name: str, config: EvaluateConfig) -> tuple[list[dict[str, Any]], str]:
        """Raw rows (label column kept) of the same rows load_texts evaluates, and the data's text_template.

        load_splits keeps only "text", so this mirrors it without the templating: same split, max_samples and
        eval carve-out (train_test_split with the same seed picks the same rows).
        """
        from orchestrator.passes.common import data

        dc = data._parse(self._data_config(ctx, name), None)
        override = ctx.job.data_files.get(name)
        ds = data._load(dc, config.split or dc.load_dataset_config.split or "train", None, override)
        pre = dc.pre_process_data_config
        if pre is not None and pre.max_samples is not None:
            ds = ds.select(range(min(pre.max_samples, len(ds))))
        if not config.split and config.eval_dataset_size:
            _, ds = data._carve(ds, config.eval_dataset_size, config.seed, dc.name)
        template = (pre.text_template if pre is not None else None) or ""
        return [dict(r) for r in ds], template

    def _dummy_config(self, ctx: PassContext, name: str | None) -> dict[str, Any] | None:
        from orchestrator.schema.models import DUMMY_CONTAINERS

        if not name:
            return None
        dc = self._data_config(ctx, name)
        return dc if dc.get("type") in DUMMY_CONTAINERS else None

    def _padded_text_shape(self, ctx: PassContext, name: str) -> dict[str, Any] | None:
        """Latency of a plain ONNX graph on a text data config, as Olive times it: each sample is padded to
        max_seq_len (pad_to_max_len, Olive's default) and only its shape reaches the timing, so the graph is timed
        on [1, max_seq_len] token inputs with an empty KV cache. None when samples are not padded (their lengths
        need the tokenizer: refused by the caller)."""
        from orchestrator.passes.common.data import text_spec

        dc = self._data_config(ctx, name)
        spec = text_spec(dc)
        if not spec.pad_to_max_len:
            return None
        ctx.info(f"latency on {name!r}: samples padded to max_seq_len {spec.max_len} (Olive's pad_to_max_len), "
                 f"timed as [1, {spec.max_len}] token inputs with an empty KV cache")  # fmt: skip
        params = {"seq_len": spec.max_len, "past_seq_len": 0, "max_seq_len": spec.max_len, "max_samples": 1}
        return {"name": name, "type": "TransformersPromptDummyDataContainer", "load_dataset_config": params}

    def _session_latency(
        self, model: ModelArtifact, dummy: dict[str, Any], ep: str, uc: UserConfig, ctx: PassContext
    ) -> dict[str, float]:
        """Time the model's ONNX graph on the dummy container's inputs (plain ONNX or onnx_genai folders), in
        one InferenceSession on the target's execution provider (never a silent fallback to another EP)."""
        import onnxruntime as ort

        from orchestrator.passes.common import onnx_tools
        from orchestrator.passes.common.dummy_data import dummy_inputs, session_inputs

        if model.format not in ("onnx", "onnx_genai"):
            raise PassError(
                f"Evaluate: {dummy['type']} feeds ONNX graphs; this model is {model.format} (add an ONNX pass)"
            )
        if ep not in ort.get_available_providers():
            raise PassError(
                f"Evaluate: latency on {ep} needs an onnxruntime build with it (this one has "
                f"{', '.join(ort.get_available_providers())}); run the evaluator on a system that has it"
            )
        model_file = onnx_tools.onnx_model_file(model.path)
        session, tuned = onnx_tools.tuned_session(model_file, ep, uc.inference_settings)
        if tuned is not None:
            ctx.info(f"session settings from {onnx_tools.SETTINGS_FILE}: {tuned.get('session_options')}")
        feeds = dummy_inputs(dummy, session_inputs(session), Path(model.path))
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in list(feeds[0].items())[:4])
        ctx.info(f"latency on {dummy['type']} {dummy['name']!r} ({shapes}, ...) with {ep}")
        return session_latency(session, feeds[0], uc)

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
            for sub in metric.sub_types:  # Olive's threshold goals: compared and reported, 1 = met
                if sub.goal is not None and sub.goal["type"] == "threshold":
                    value, target = results[f"{metric.name}-{sub.name}"], float(sub.goal["value"])
                    higher = sub.higher_is_better if sub.higher_is_better is not None else _higher_is_better(sub.name)
                    met = value >= target if higher else value <= target
                    results[f"{metric.name}-{sub.name}-goal_met"] = float(met)
                    ctx.info(
                        f"goal {metric.name}-{sub.name} {'>=' if higher else '<='} {target:g}: "
                        f"{value:.4g} -> {'met' if met else 'NOT met'}"
                    )
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
        dummy = self._dummy_config(ctx, metric.data_config)
        if dummy is not None:
            if metric.type != "latency":
                raise PassError(
                    f"Evaluate: metric {metric.name!r} ({metric.type}) on {dummy['type']} {metric.data_config!r}: "
                    "random token ids only serve latency; name a HuggingfaceContainer"
                )
            return self._session_latency(model, dummy, ep, uc, ctx)
        if model.format == "onnx" and metric.type == "latency" and metric.data_config:
            padded = self._padded_text_shape(ctx, metric.data_config)
            if padded is not None:
                return self._session_latency(model, padded, ep, uc, ctx)
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
            texts = self.load_texts(ctx, metric.data_config, config)
            return perplexity(scorer(), texts[: uc.max_samples], uc.max_length)
        scorer = scorer()  # type: ignore[assignment]
        rows, data_template = self.load_labelled(ctx, metric.data_config, config)
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
