"""OrtSessionParamsTuning (Olive's name; OrtPerfTuning before): pick the onnxruntime session settings under
which the model runs fastest here, and write them beside the model as Olive's `inference_settings`.

Why a pass: the best thread count and execution mode depend on the model and the machine, and a user would
rather measure than guess. Measured: a baseline session with onnxruntime's defaults, then every combination
of the config's lists (execution providers x execution modes x graph optimization levels x intra-/inter-op
thread counts), each on the same inputs (the data_config's dummy container, or DummyDataContainer-like inputs
derived from the graph), median of timed runs after warm-up. The model is passed on unchanged (copied), with
inference_settings.json (execution_provider, provider_options, session_options, io_bind) that
`orchestrator.passes.common.onnx_tools.tuned_session` applies.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from orchestrator.core.fs import commit_dir, copy_tree, fresh_dir
from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput, Requirements
from orchestrator.passes.common.onnx_tools import SETTINGS_FILE, session_options
from orchestrator.passes.evaluation.latency import timed_runs

OUTPUT_DIR = "model"
EXECUTION_MODES = {0: "ORT_SEQUENTIAL", 1: "ORT_PARALLEL"}
OPT_LEVELS = {0: "ORT_DISABLE_ALL", 1: "ORT_ENABLE_BASIC", 2: "ORT_ENABLE_EXTENDED", 99: "ORT_ENABLE_ALL"}
DEFAULT_DUMMY = {"name": "session_tuning_inputs", "type": "TransformersTokenDummyDataContainer"}


def _as_list(value: Any) -> Any:
    return value if value is None or isinstance(value, list) else [value]


class SessionTuningConfig(PassConfig):
    """Olive's OrtSessionParamsTuning fields; each *_list takes one value or a list of candidates."""

    data_config: str | None = None
    device: str | None = None
    cpu_cores: int | None = Field(None, gt=0)
    io_bind: bool = False
    enable_cuda_graph: bool = False
    providers_list: list[str] | None = None
    provider_options_list: list[dict[str, Any]] | None = None
    execution_mode_list: list[int] | None = None
    opt_level_list: list[int] | None = None
    trt_fp16_enable: bool = False
    intra_thread_num_list: list[int] | None = None
    inter_thread_num_list: list[int] | None = None
    extra_session_config: dict[str, Any] | None = None
    force_evaluate_other_eps: bool = False
    enable_profiling: bool = False
    warmup_num: int = Field(3, ge=0)
    repeat_test_num: int = Field(20, gt=0)

    _lists = field_validator(
        "providers_list", "provider_options_list", "execution_mode_list", "opt_level_list",
        "intra_thread_num_list", "inter_thread_num_list", mode="before",
    )(_as_list)  # fmt: skip

    @field_validator("execution_mode_list", mode="after")
    @classmethod
    def _modes(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(m not in EXECUTION_MODES for m in v):
            raise ValueError(f"execution modes are {EXECUTION_MODES} (onnxruntime.ExecutionMode values)")
        return v

    @field_validator("opt_level_list", mode="after")
    @classmethod
    def _levels(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(m not in OPT_LEVELS for m in v):
            raise ValueError(f"optimization levels are {OPT_LEVELS} (onnxruntime.GraphOptimizationLevel values)")
        return v


def physical_cores() -> int:
    """Cores this process may use (affinity), the candidate thread count when the config gives none."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class OrtSessionParamsTuningPass(Pass):
    type_name = "OrtSessionParamsTuning"
    Config = SessionTuningConfig
    version = "1"
    libraries = ("onnxruntime", "onnx", "numpy")
    runs_model_on_provider = True

    def requirements(self, config: PassConfig) -> Requirements:
        return Requirements(cuda=False, environment="cpu-export")

    def candidates(self, config: SessionTuningConfig, providers: list[str]) -> list[dict[str, Any]]:
        """Every combination to time, in Olive's inference_settings shape."""
        cores = config.cpu_cores or physical_cores()
        modes = config.execution_mode_list or [0, 1]
        levels = config.opt_level_list or [99]
        intra = config.intra_thread_num_list or sorted({1, max(1, cores // 2), cores})
        out = []
        for ep, mode, level, n_intra in itertools.product(providers, modes, levels, intra):
            inters = (config.inter_thread_num_list or sorted({1, cores})) if mode == 1 else [None]
            for n_inter in inters:
                so: dict[str, Any] = {"execution_mode": mode, "graph_optimization_level": level,
                                      "intra_op_num_threads": n_intra}  # fmt: skip
                if n_inter is not None:
                    so["inter_op_num_threads"] = n_inter
                if config.extra_session_config:
                    so["extra_session_config"] = config.extra_session_config
                out.append({"execution_provider": [ep], "provider_options": [self._options(config, ep)],
                            "session_options": so, "io_bind": self._io_bind(config, ep)})  # fmt: skip
        return out

    def _options(self, config: SessionTuningConfig, ep: str) -> dict[str, Any]:
        opts = dict((config.provider_options_list or [{}])[0])
        if ep == "CUDAExecutionProvider" and config.enable_cuda_graph:
            opts["enable_cuda_graph"] = True
        if ep == "TensorrtExecutionProvider" and config.trt_fp16_enable:
            opts["trt_fp16_enable"] = True
        return opts

    def _io_bind(self, config: SessionTuningConfig, ep: str) -> bool:
        return config.io_bind and ep != "CPUExecutionProvider"

    def _providers(self, config: SessionTuningConfig, ctx: PassContext) -> list[str]:
        import onnxruntime as ort

        target = ctx.job.execution_providers or ["CPUExecutionProvider"]
        asked = config.providers_list or target[:1]
        if not config.force_evaluate_other_eps:
            skipped = [ep for ep in asked if ep not in target]
            if skipped:
                ctx.info(f"providers_list: {', '.join(skipped)} not timed: the target runs {', '.join(target)} "
                         "(force_evaluate_other_eps true times them too)")  # fmt: skip
            asked = [ep for ep in asked if ep in target]
        missing = [ep for ep in asked if ep not in ort.get_available_providers()]
        if missing or not asked:
            raise PassError(
                f"OrtSessionParamsTuning: {', '.join(missing) or 'no provider'} not in this onnxruntime "
                f"({', '.join(ort.get_available_providers())}); tune on a system whose onnxruntime has it"
            )
        return asked

    def _inputs(self, config: SessionTuningConfig, model_file: Path, ctx: PassContext) -> dict[str, Any]:
        import onnxruntime as ort

        from orchestrator.passes.common.dummy_data import dummy_inputs, session_inputs

        dc = DEFAULT_DUMMY
        if config.data_config is not None:
            if config.data_config not in ctx.job.data_configs:
                known = ", ".join(sorted(ctx.job.data_configs)) or "none"
                raise PassError(f"OrtSessionParamsTuning: data config {config.data_config!r} unknown (known: {known})")
            dc = ctx.job.data_configs[config.data_config]
        probe = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        feeds = dummy_inputs(dc, session_inputs(probe), model_file.parent)
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in list(feeds[0].items())[:3])
        ctx.info(f"timing on {dc['type']} {dc['name']!r}: {shapes}, ...")
        return feeds[0]

    def _time(self, model_file: Path, settings: dict[str, Any], feed: dict[str, Any], config: SessionTuningConfig,
              profile_dir: Path) -> float:  # fmt: skip
        """Median ms of repeat_test_num runs after warmup_num, in a fresh session with these settings."""
        import onnxruntime as ort

        so = session_options({**settings.get("session_options", {}), "enable_profiling": config.enable_profiling})
        if config.enable_profiling:
            so.profile_file_prefix = str(profile_dir / "ort_profile")
        sess = ort.InferenceSession(
            str(model_file), so, providers=settings["execution_provider"], provider_options=settings["provider_options"]
        )
        run = self._runner(sess, feed, settings.get("io_bind", False))
        times = timed_runs(run, config.warmup_num, config.repeat_test_num)
        if config.enable_profiling:
            sess.end_profiling()
        return statistics.median(times) * 1000

    def _runner(self, sess: Any, feed: dict[str, Any], io_bind: bool) -> Any:
        if not io_bind:
            return lambda: sess.run(None, feed)
        binding = sess.io_binding()
        device = "cuda" if "CUDAExecutionProvider" in sess.get_providers() else "cpu"
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        for out in sess.get_outputs():
            binding.bind_output(out.name, device)
        return lambda: sess.run_with_iobinding(binding)

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, SessionTuningConfig)
        from orchestrator.passes.common import onnx_tools

        if model is None or model.format not in ("onnx", "onnx_genai"):
            got = "no model" if model is None else f"format {model.format!r}"
            raise PassError(f"OrtSessionParamsTuning times ONNX models, got {got}: add an ONNX pass before it")
        src_dir = Path(model.path)
        model_file = onnx_tools.onnx_model_file(src_dir)
        providers = self._providers(config, ctx)
        if config.io_bind and "CPUExecutionProvider" in providers:
            ctx.info("io_bind: CPUExecutionProvider keeps tensors in host memory, so binding changes nothing there "
                     "(Olive skips it too); io_bind is timed on the other providers only")  # fmt: skip
        feed = self._inputs(config, model_file, ctx)
        final = ctx.out_dir / OUTPUT_DIR
        tmp = fresh_dir(final)
        copy_tree(src_dir, tmp)  # reflinks where the fs has them; never follows a link out of the model folder
        baseline = {"execution_provider": providers[:1], "provider_options": [{}], "session_options": {},
                    "io_bind": False}  # fmt: skip
        trials = [baseline, *self.candidates(config, providers)]
        results: list[tuple[float, dict[str, Any]]] = []
        for i, settings in enumerate(trials):
            ms = self._time(model_file, settings, feed, config, ctx.out_dir)
            results.append((ms, settings))
            ctx.progress(i + 1, len(trials), "session settings")
            so = settings["session_options"]
            ctx.info(f"{ms:8.3f} ms  {json.dumps(so) if so else 'onnxruntime defaults'} "
                     f"{settings['execution_provider'][0]} io_bind={settings['io_bind']}")  # fmt: skip
        best_ms, best = min(results, key=lambda r: r[0])
        base_ms = results[0][0]
        (tmp / SETTINGS_FILE).write_text(json.dumps(best, indent=2) + "\n")
        commit_dir(tmp, final)
        metrics = {
            "latency_ms_baseline": base_ms,
            "latency_ms_tuned": best_ms,
            "speedup_vs_baseline": base_ms / best_ms if best_ms > 0 else 1.0,
            "settings_tried": float(len(trials)),
        }
        ctx.info(f"best: {best_ms:.3f} ms vs {base_ms:.3f} ms with onnxruntime's defaults: {best['session_options']}")
        ctx.log_metrics(metrics)
        return PassOutput(model=model.model_copy(update={"path": OUTPUT_DIR}), metrics=metrics)
