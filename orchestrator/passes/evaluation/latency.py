"""Latency and throughput: Olive's timed runs (warmup_num, repeat_test_num, sleep_num) and their statistics.

Why apart: timing is its own job with its own rules (untimed warm-up, percentiles in ms), shared by the Evaluate
pass (an ONNX graph's session on dummy inputs, onnx_genai prefill and decode) and OrtSessionParamsTuning (each
candidate session's runs).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import PassContext, PassError
from orchestrator.passes.evaluation.metric_config import UserConfig

T = TypeVar("T")

DEFAULT_LATENCY_TEXT = "the quick brown fox jumps over the lazy dog. I feel happy, sad, afraid and surprised today. "


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


def repeated(run: Callable[[], T], warmup: int, repeat: int, sleep: float = 0.0) -> list[T]:
    """Olive's timing protocol: `warmup` calls of run() whose results are dropped, then the results of `repeat`
    calls (at least one), sleeping `sleep` s between them."""
    for _ in range(warmup):
        run()
    results: list[T] = []
    for _ in range(max(1, repeat)):
        if sleep and results:
            time.sleep(sleep)
        results.append(run())
    return results


def timed_runs(run: Callable[[], Any], warmup: int, repeat: int, sleep: float = 0.0) -> list[float]:
    """Seconds of `repeat` calls of run() after `warmup` untimed ones (sleep s between timed calls)."""

    def timed() -> float:
        t0 = time.perf_counter()
        run()
        return time.perf_counter() - t0

    return repeated(timed, warmup, repeat, sleep)


def session_latency(session: Any, feed: dict[str, Any], uc: UserConfig) -> dict[str, float]:
    """Olive's ONNX latency: warmup_num runs, then repeat_test_num timed runs of session.run on one input
    (sleep_num s between them)."""
    return latency_stats(timed_runs(lambda: session.run(None, feed), uc.warmup_num, uc.repeats, uc.sleep_num or 0.0))


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
    runs = repeated(lambda: scorer.timed_generation(ids, uc.max_new_tokens), uc.warmup_num, uc.repeats, uc.sleep_num)
    prefill = [p for p, _ in runs]
    steps = [t for _, s in runs for t in s]
    e2e = [(len(s) + 1) / (p + sum(s)) for p, s in runs]
    decode_s = sum(steps) / len(steps)
    stats = latency_stats(prefill)
    return {
        **stats,
        "prefill_p50_ms": stats["p50"],  # Olive's names for the same statistics (ALIASES)
        "prefill_p90_ms": stats["p90"],
        "prefill_avg_ms": stats["avg"],
        "decode_ms_per_token": decode_s * 1000,
        "decode_tokens_per_s": 1.0 / decode_s,
        "e2e_tokens_per_s": statistics.fmean(e2e),
        "prompt_tokens": float(len(ids)),
    }


def graph_latency(
    model: ModelArtifact, dummy: dict[str, Any], ep: str, uc: UserConfig, ctx: PassContext
) -> dict[str, float]:
    """Time the model's ONNX graph on the dummy container's inputs (plain ONNX or onnx_genai folders), in
    one InferenceSession on the target's execution provider (never a silent fallback to another EP)."""
    import onnxruntime as ort

    from orchestrator.passes.common import onnx_tools
    from orchestrator.passes.common.dummy_data import dummy_inputs, session_inputs

    if model.format not in ("onnx", "onnx_genai"):
        raise PassError(f"Evaluate: {dummy['type']} feeds ONNX graphs; this model is {model.format} (add an ONNX pass)")
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
