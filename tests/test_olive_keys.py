"""Keys real Olive configs carry (0.7-0.13), by class: each is honoured, accepted with a note that says why it
changes nothing, or refused in one line naming what to use. Read with the workflow reader, no compute."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.olive import load_workflow
from orchestrator.schema import ConfigError


def _wf(**extra: Any) -> dict[str, Any]:
    wf: dict[str, Any] = {"input_model": {"type": "HfModel", "model_path": "m"},
                          "passes": {"mb": {"type": "ModelBuilder", "precision": "int4"}}}  # fmt: skip
    wf.update(extra)
    return wf


def _notes(raw: dict[str, Any], tmp: Path) -> list[str]:
    return load_workflow(raw, base_dir=tmp).notes


def _refused(raw: dict[str, Any], tmp: Path, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_workflow(raw, base_dir=tmp)
    assert needle in str(err.value), str(err.value)


def test_external_data_keys_are_noted_on_every_onnx_pass(tmp_path: Path) -> None:
    raw = _wf(passes={
        "c": {"type": "OnnxConversion", "save_as_external_data": True, "external_data_name": "x.data",
              "size_threshold": 1024, "convert_attribute": False},
        "g": {"type": "GraphSurgeries", "surgeries": [{"surgeon": "TieWordEmbeddings"}],
              "save_as_external_data": True, "all_tensors_to_one_file": True},
    })  # fmt: skip
    wf = load_workflow(raw, base_dir=tmp_path)
    assert any(n.startswith("passes.c: external_data_name, size_threshold, convert_attribute: accepted, no effect")
               for n in wf.notes), wf.notes  # fmt: skip
    assert any(n.startswith("passes.g: save_as_external_data, all_tensors_to_one_file") for n in wf.notes)
    assert "external_data_name" not in wf.passes["c"].config


def test_pass_run_keys_and_renamed_or_moved_pass_keys(tmp_path: Path) -> None:
    raw = _wf(passes={
        "q": {"type": "OnnxDynamicQuantization", "MatMulConstBOnly": True, "per_channel": False,
              "evaluator": "common_evaluator"},
        "t": {"type": "OrtSessionParamsTuning", "execution_providers_list": ["CPUExecutionProvider"]},
        "c": {"type": "OnnxConversion", "past_key_value_name": "past_key_values", "dynamic": True},
    })  # fmt: skip
    wf = load_workflow(raw, base_dir=tmp_path)
    assert wf.passes["q"].config["extra_options"] == {"MatMulConstBOnly": True}
    assert wf.passes["t"].config["providers_list"] == ["CPUExecutionProvider"]
    assert any("passes.q.evaluator: accepted, not run per pass" in n for n in wf.notes)
    assert any("passes.c.past_key_value_name: accepted, no effect" in n for n in wf.notes)
    _refused(_wf(passes={"mb": {"type": "ModelBuilder", "host": "elsewhere"}}), tmp_path, "per-pass hosts")
    _refused(_wf(passes={"s": {"type": "SplitModel", "split_assignments": {"a": 0}}}), tmp_path, "give num_splits")


def test_input_model_engine_top_level_and_data_config_keys(tmp_path: Path) -> None:
    raw = _wf(
        input_model={"type": "HfModel", "model_path": "m", "generative": True, "io_config": {"input_names": ["x"]}},
        data_configs=[{"name": "d", "load_dataset_config": {"data_name": "json", "data_files": "d.jsonl",
                                                            "trust_remote_code": True},
                       "pre_process_data_config": {"joiner": "\n"},
                       "dataloader_config": {"batch_size": 8}, "post_process_data_config": {}}],
        engine={"ort_log_severity_level": 3, "clean_evaluation_cache": True},
        plot_pareto_frontier=True,
        auto_optimizer_config={"opt_level": 0},
    )  # fmt: skip
    notes = _notes(raw, tmp_path)
    for needle in ("input_model.generative: accepted", "input_model.io_config: accepted, no effect",
                   "load_dataset_config.trust_remote_code True: accepted", "pre_process_data_config.joiner",
                   "dataloader_config (batch_size=8): accepted, no effect", "engine.ort_log_severity_level: accepted",
                   "engine.clean_evaluation_cache: accepted", "engine.plot_pareto_frontier: accepted",
                   "auto_optimizer_config: accepted"):  # fmt: skip
        assert any(needle in n for n in notes), (needle, notes)
    assert not any("post_process_data_config" in n for n in notes)  # empty: nothing to say
    _refused(_wf(input_model={"type": "HfModel", "model_path": "m", "generative": False}), tmp_path, "generative")
    _refused(_wf(engine={"cache_config": {"enable_shared_cache": True}}), tmp_path, "shared cache")
    _refused(_wf(workflow_host={"type": "AzureML"}), tmp_path, "orch submit")


def test_inline_target_system_list_form_passes_and_docker_keys(tmp_path: Path) -> None:
    gpu = {"type": "LocalSystem", "accelerators": [{"device": "gpu", "execution_providers": ["CUDAExecutionProvider"]}]}
    wf = load_workflow(_wf(engine={"target": gpu}), base_dir=tmp_path)
    assert wf.engine.target == "target_system" and "target_system" in wf.systems
    wf = load_workflow(_wf(passes={"mb": [{"type": "ModelBuilder", "precision": "fp32"}]}), base_dir=tmp_path)
    assert wf.passes["mb"].config == {"precision": "fp32"}
    _refused(_wf(passes={"mb": [{"type": "ModelBuilder"}, {"type": "ModelBuilder", "precision": "fp16"}]}),
             tmp_path, "2 alternative configs")  # fmt: skip
    docker = {"d": {"type": "Docker", "image_name": "olive", "dockerfile": "Dockerfile", "build_context_path": "."}}
    wf = load_workflow(_wf(systems=docker), base_dir=tmp_path)
    image = wf.systems["d"].model_dump(mode="json")["docker_config"]
    assert image["image_name"] == "olive" and image["dockerfile"] == "Dockerfile"


def test_metric_user_config_keys_and_relative_goals(tmp_path: Path) -> None:
    """io_bind / shared_kv_buffer are noted; Olive's improvement/degradation goals turn the input model's
    evaluation on and are compared once both evaluations are in."""
    from orchestrator.passes.evaluation.evaluate import EvaluatePass

    metrics = [{"name": "latency", "type": "latency", "user_config": {"io_bind": True, "shared_kv_buffer": True},
                "sub_types": [{"name": "avg", "goal": {"type": "percent-min-improvement", "value": 5}}]},
               {"name": "ppl", "type": "perplexity", "data_config": "d",
                "sub_types": [{"name": "perplexity", "goal": {"type": "max-degradation", "value": 1.0}}]}]  # fmt: skip
    raw = _wf(data_configs=[{"name": "d", "load_dataset_config": {"data_name": "json", "data_files": "d.jsonl"}}],
              evaluators={"e": {"metrics": metrics}}, engine={"evaluator": "e"})  # fmt: skip
    wf = load_workflow(raw, base_dir=tmp_path)
    assert wf.engine.evaluate_input_model is True
    assert any("io_bind accepted" in n for n in wf.notes) and any("shared_kv_buffer" in n for n in wf.notes)
    assert any("compare with the input model" in n for n in wf.notes)
    config = {"metrics": [m for m in metrics]}
    base = {"latency-avg": 10.0, "ppl-perplexity": 5.0}
    results, lines = EvaluatePass.compare_with_baseline(config, base, {"latency-avg": 9.0, "ppl-perplexity": 6.5})
    assert results == {"latency-avg-goal_met": 1.0, "ppl-perplexity-goal_met": 0.0}, lines
    results, lines = EvaluatePass.compare_with_baseline(config, {"ppl-perplexity": 5.0}, {"ppl-perplexity": 5.5})
    assert results == {"ppl-perplexity-goal_met": 1.0} and any("not compared" in line for line in lines)


def test_olive_passes_orch_does_not_run_are_refused_with_a_reason(tmp_path: Path) -> None:
    for kind, needle in {"OpenVINOConversion": "OpenVINO toolchain", "QNNConversion": "NPU toolchains",
                         "MobiusBuilder": "use ModelBuilder", "NVModelOptQuantization": "vendor quantizers",
                         "OnnxFloatToFloat16": "precision fp16", "LoftQ": "use LoRA"}.items():  # fmt: skip
        _refused(_wf(passes={"p": {"type": kind}}), tmp_path, f"Olive pass {kind} is not supported by orch: ")
        _refused(_wf(passes={"p": {"type": kind}}), tmp_path, needle)


def test_model_builder_olive_switches_reach_the_builder(tmp_path: Path) -> None:
    from orchestrator.core.job import ModelArtifact
    from orchestrator.passes.onnx.model_builder import ModelBuilderConfig, ModelBuilderPass

    config = ModelBuilderConfig(precision="int4", int4_algo_config="k_quant_mixed", exclude_embeds=True,
                                enable_cuda_graph=True, int4_nodes_to_exclude=["/lm_head/MatMul"])  # fmt: skip
    opts = ModelBuilderPass().builder_options(config, "cpu", ModelArtifact(format="hf", path=str(tmp_path)))
    assert opts["int4_algo_config"] == "k_quant_mixed" and opts["exclude_embeds"] == "true"
    assert opts["enable_cuda_graph"] == "true" and opts["nodes_to_exclude"] == "/lm_head/MatMul"
    assert not config.checkable  # no text in: the parity and generation checks are skipped, said in the log
    config = ModelBuilderConfig(precision="int4", use_cuda_bf16=True, use_qdq=True)
    opts = ModelBuilderPass().builder_options(config, "gpu", ModelArtifact(format="hf", path=str(tmp_path)))
    assert opts["use_cuda_bf16"] == "true" and opts["use_qdq"] == "true"


def test_test_model_path_stands_in_for_the_model(tmp_path: Path, tiny_model: Path) -> None:
    """Olive 0.13's --test writes test_model_config / test_model_path into the saved config: run from it, the
    2-layer copy is built once and used."""
    raw = _wf(input_model={"type": "HfModel", "model_path": str(tiny_model),
                           "test_model_config": {"hidden_layers": 2}, "test_model_path": "tm"})  # fmt: skip
    wf = load_workflow(raw, base_dir=tmp_path)
    assert json.loads((tmp_path / "tm" / "config.json").read_text())["num_hidden_layers"] == 2
    assert any("a random 2-layer copy" in n for n in wf.notes)


def test_optimum_conversion_and_merging_run_as_the_one_decoder_export(tmp_path: Path, tiny_model: Path) -> None:
    """Olive 0.7-0.9's OptimumConversion (+ OptimumMerging): the same KV-cache decoder graph from torch.onnx;
    fp16 is read as torch_dtype, Optimum's own keys are noted; OptimumMerging passes the one graph through."""
    from orchestrator.core.job import Job, ModelArtifact
    from orchestrator.passes.base import PassContext
    from orchestrator.passes.onnx.onnx_conversion import OnnxConversionPass, OptimumMergingPass

    raw = _wf(passes={
        "c": {"type": "OptimumConversion", "target_opset": 14, "fp16": True, "components": ["decoder_model"],
              "extra_args": {"legacy": False}},
        "m": {"type": "OptimumMerging", "save_as_external_data": True},
    })  # fmt: skip
    wf = load_workflow(raw, base_dir=tmp_path)
    assert wf.passes["c"].config == {"target_opset": 14, "torch_dtype": "float16"}
    assert any("OptimumConversion exported by torch.onnx" in n for n in wf.notes)
    assert any("passes.c.components: accepted, no effect" in n for n in wf.notes)

    def run(p: Any, out: Path, model: ModelArtifact) -> Any:
        job = Job(job_id="j", pass_name="p", pass_type=p.type_name, output_dir=str(out))
        return p.run(p.Config(), model, PassContext(job=job, out_dir=out, emit=lambda e: None))

    conv = run(OnnxConversionPass(), tmp_path / "c", ModelArtifact(format="hf", path=str(tiny_model)))
    onnx_dir = ModelArtifact(format="onnx", path=str(tmp_path / "c" / conv.model.path))
    merged = run(OptimumMergingPass(), tmp_path / "m", onnx_dir)
    files = sorted(f.name for f in (tmp_path / "m" / merged.model.path).iterdir())
    assert files == sorted(f.name for f in Path(onnx_dir.path).iterdir()) and "model.onnx" in files
