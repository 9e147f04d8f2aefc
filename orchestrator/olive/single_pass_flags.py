"""Olive's flags of the commands that run one pass, flag for flag: `tune-session-params` (OrtSessionParamsTuning,
0.7-0.13) and `run-pass` (0.10+: any pass by name). Their builders: olive.tune_session_params, olive.run_pass.
"""

from __future__ import annotations

from orchestrator.olive.flag_spec import ACCEL, EXPORT, Command, Flag
from orchestrator.olive.shared_flags import (
    accelerator_flags,
    model_flags,
    output_flags,
    remote_flags,
    shared_cache_flags,
    telemetry_flags,
)

TUNE_SESSION_PARAMS = Command(
    "tune-session-params",
    "Olive's `tune-session-params`: time onnxruntime session settings for an ONNX model (OrtSessionParamsTuning) "
    "and write the fastest as <output_path>/<device>-<provider>.json (Olive's inference settings).",
    (
        *model_flags(hf=False, output_default="tuned-inference-settings"),
        Flag("--cpu_cores", "CPU cores the tuned session may use", kind="int", group=ACCEL),
        Flag("--io_bind", "bind inputs and outputs on the device (I/O binding)", kind="flag", group=ACCEL),
        Flag("--enable_cuda_graph", "CUDA graph capture (CUDA provider)", kind="flag", group=ACCEL),
        Flag("--execution_mode_list", "execution modes to try (0 sequential, 1 parallel)", kind="list", group=ACCEL),
        Flag("--opt_level_list", "graph optimization levels to try (0, 1, 2, 99)", kind="list", group=ACCEL),
        Flag("--trt_fp16_enable", "TensorRT fp16 (TensorRT provider)", kind="flag", group=ACCEL),
        Flag("--intra_thread_num_list", "intra-op thread counts to try", kind="list", group=ACCEL),
        Flag("--inter_thread_num_list", "inter-op thread counts to try", kind="list", group=ACCEL),
        Flag("--extra_session_config", "extra session config entries as JSON", group=ACCEL),
        Flag(
            "--disable_force_evaluate_other_eps",
            "do not evaluate the other providers when the first fails",
            kind="flag",
            group=ACCEL,
        ),
        Flag("--enable_profiling", "onnxruntime profiling while tuning", kind="flag", group=ACCEL),
        Flag(
            "--predict_with_kv_cache",
            "time one decode step with a KV cache instead of a prompt",
            kind="flag",
            group=ACCEL,
        ),
        *accelerator_flags(single=False),
        *output_flags(),
        *shared_cache_flags(),
        *telemetry_flags(),
        *remote_flags(),
    ),
)

RUN_PASS = Command(
    "run-pass",
    "Olive's `run-pass` (0.10+): run one pass on a model (--pass-name, --pass-config JSON); --list-passes lists "
    "the pass types orch runs.",
    (
        *model_flags(adapter=True, pt=True, required=False, output_default="run-pass-output"),
        Flag("--pass-name", "the pass type, e.g. OnnxDynamicQuantization", group=EXPORT),
        Flag("--pass-config", "the pass's config as JSON", group=EXPORT),
        Flag("--list-passes", "list the pass types and exit", kind="flag", group=EXPORT),
        *accelerator_flags(single=True),
        *output_flags(),
        *telemetry_flags(),
    ),
    versions="0.10-0.13",
)
