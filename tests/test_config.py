"""The workflow reader on the seeds' Olive configs, and one test per kind of config error (messages asserted)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.olive import load_workflow
from orchestrator.passes import registry
from orchestrator.passes.training.lora.training_args import (
    SFT_CONFIG_FIELDS,
    TRAINING_ARGUMENTS_FIELDS,
    TrainingArgsError,
    normalize_training_args,
)
from orchestrator.schema import (
    AzureMLDatastore,
    AzureMLModel,
    AzureMLRegistryModel,
    ConfigError,
    HfHubModel,
    LocalFile,
    LocalFolder,
    parse_resource,
)

# The seed 001 snippets (Olive's Phi-3 fine-tuning tutorial), assembled as a user would.
SEED_INPUT_LOCAL = {
    "type": "PyTorchModel",
    "config": {
        "hf_config": {
            "model_name": "model-cache/microsoft/phi-3-mini",
            "task": "text-generation",
            "model_loading_args": {"trust_remote_code": True},
        }
    },
}
SEED_INPUT_REGISTRY = {
    "type": "PyTorchModel",
    "config": {
        "model_path": {
            "type": "azureml_registry_model",
            "config": {"name": "microsoft/Phi-3-mini-4k-instruct", "registry_name": "azureml-msr", "version": "11"},
        },
        "model_file_format": "PyTorch.MLflow",
        "hf_config": {
            "model_name": "microsoft/Phi-3-mini-4k-instruct",
            "task": "text-generation",
            "from_pretrained_args": {"trust_remote_code": True},
        },
    },
}
SEED_DATA_LOCAL = {
    "name": "dataset_default_train",
    "type": "HuggingfaceContainer",
    "load_dataset_config": {
        "params": {"data_name": "json", "data_files": "dataset/dataset-classification.json", "split": "train"}
    },
    "pre_process_data_config": {
        "params": {
            "dataset_type": "corpus",
            "text_cols": ["phrase", "tone"],
            "text_template": "### Text: {phrase}\n### The tone is:\n{tone}",
            "corpus_strategy": "join",
            "source_max_len": 2048,
            "pad_to_max_len": False,
            "use_attention_mask": False,
        }
    },
}
SEED_DATA_DATASTORE = {
    "name": "dataset_cloud_train",
    "type": "HuggingfaceContainer",
    "load_dataset_config": {
        "params": {
            "data_name": "json",
            "data_files": {
                "type": "azureml_datastore",
                "config": {
                    "azureml_client": {
                        "subscription_id": "Your Azure Subscrition ID",
                        "resource_group": "Your Azure Resource Group",
                        "workspace_name": "Your Azure ML Workspaces name",
                    },
                    "datastore_name": "workspaceblobstore",
                    "relative_path": "Your train_data.json Azure ML Location",
                },
            },
            "split": "train",
        }
    },
    "pre_process_data_config": {
        "params": {
            "dataset_type": "corpus",
            "text_cols": ["Question", "Best Answer"],
            "text_template": "<|user|>\n{Question}<|end|>\n<|assistant|>\n{Best Answer}\n<|end|>",
            "corpus_strategy": "join",
            "source_max_len": 2048,
            "pad_to_max_len": False,
            "use_attention_mask": False,
        }
    },
}
SEED_SYSTEMS = {
    "aml": {
        "type": "AzureML",
        "config": {
            "accelerators": ["gpu"],
            "hf_token": True,
            "aml_compute": "Your Azure AI Studio / Azure Machine Learning Service Compute Name",
            "aml_docker_config": {
                "base_image": "Your Azure AI Studio / Azure Machine Learning Service docker",
                "conda_file_path": "conda.yaml",
            },
        },
    },
    "azure_arc": {
        "type": "AzureML",
        "config": {
            "accelerators": ["gpu"],
            "aml_compute": "Your Azure AI Studio / Azure Machine Learning Service Compute Name",
            "aml_docker_config": {
                "base_image": "Your Azure AI Studio / Azure Machine Learning Service docker",
                "conda_file_path": "conda.yaml",
            },
        },
    },
}
SEED_PASSES = {
    "lora": {
        "type": "LoRA",
        "config": {
            "target_modules": ["o_proj", "qkv_proj"],
            "double_quant": True,
            "lora_r": 64,
            "lora_alpha": 64,
            "lora_dropout": 0.1,
            "train_data_config": "dataset_default_train",
            "eval_dataset_size": 0.3,
            "training_args": {
                "seed": 0,
                "data_seed": 42,
                "per_device_train_batch_size": 1,
                "per_device_eval_batch_size": 1,
                "gradient_accumulation_steps": 4,
                "gradient_checkpointing": False,
                "learning_rate": 0.0001,
                "num_train_epochs": 3,
                "max_steps": 10,
                "logging_steps": 10,
                "evaluation_strategy": "steps",
                "eval_steps": 187,
                "group_by_length": True,
                "adam_beta2": 0.999,
                "max_grad_norm": 0.3,
            },
        },
    },
    "merge_adapter_weights": {"type": "MergeAdapterWeights"},
    "builder": {"type": "ModelBuilder", "config": {"precision": "int4"}},
}
SEED_ENGINE = {
    "log_severity_level": 0,
    "host": "aml",
    "target": "aml",
    "search_strategy": False,
    "execution_providers": ["CUDAExecutionProvider"],
    "cache_dir": "../model-cache/models/phi3-finetuned/cache",
    "output_dir": "../model-cache/models/phi3-finetuned",
}


def seed_workflow(**override: Any) -> dict[str, Any]:
    wf = {
        "input_model": SEED_INPUT_LOCAL,
        "systems": SEED_SYSTEMS,
        "data_configs": [SEED_DATA_LOCAL, SEED_DATA_DATASTORE],
        "passes": SEED_PASSES,
        "engine": SEED_ENGINE,
    }
    wf.update(override)
    return copy.deepcopy(wf)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder laid out like the tutorial's: olive-config.json next to dataset/ and conda.yaml."""
    proj = tmp_path / "proj"
    (proj / "dataset").mkdir(parents=True)
    (proj / "dataset" / "dataset-classification.json").write_text('{"phrase": "I won", "tone": "Joy"}\n')
    (proj / "conda.yaml").write_text("name: project_environment\n")
    (proj / "olive-config.json").write_text(json.dumps(seed_workflow(), indent=4))
    return proj


def problems_of(source: Any, **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_workflow(source, **kw)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


# ---- the seeds load ---------------------------------------------------------------------------------------


def test_seed_workflow_loads_with_olive_names(project: Path) -> None:
    cfg = load_workflow(project / "olive-config.json")
    assert cfg.base_dir == project.resolve()
    # input model (hf_config form): a local folder relative to the config file, trust_remote_code found
    assert cfg.input_model.type == "PyTorchModel"
    assert cfg.input_model.model_ref == LocalFolder(path=project / "model-cache/microsoft/phi-3-mini")
    assert cfg.input_model.trust_remote_code is True
    assert cfg.input_model.task == "text-generation"
    # data: local file resolved, datastore file parsed into a resource with its workspace
    local, cloud = cfg.data_configs
    assert local.load_dataset_config.data_files == str(project / "dataset/dataset-classification.json")
    assert local.pre_process_data_config.text_cols == ["phrase", "tone"]
    assert local.pre_process_data_config.source_max_len == 2048
    assert isinstance(cloud.load_dataset_config.data_files, AzureMLDatastore)
    assert cloud.load_dataset_config.data_files.datastore_name == "workspaceblobstore"
    assert cloud.load_dataset_config.data_files.azureml_client.workspace_name == "Your Azure ML Workspaces name"
    # systems: Olive's "config" level and ["gpu"] accelerators normalized; the image under docker_config
    aml = cfg.systems["aml"]
    assert aml.type == "AzureML" and aml.hf_token is True
    assert [a.device for a in aml.accelerators] == ["gpu"]
    assert aml.docker_config.conda_file_path == project / "conda.yaml"
    assert cfg.systems["azure_arc"].hf_token is False
    # passes keep the file's order; the training args carry today's transformers names
    assert list(cfg.passes) == ["lora", "merge_adapter_weights", "builder"]
    args = cfg.passes["lora"].config["training_args"]
    assert args["eval_strategy"] == "steps" and "evaluation_strategy" not in args
    assert args["train_sampling_strategy"] == "group_by_length" and "group_by_length" not in args
    assert any("evaluation_strategy -> eval_strategy" in n and n.startswith("passes.lora.config") for n in cfg.notes)
    assert cfg.passes["builder"].config == {"precision": "int4"}
    # engine: relative cache/output dirs resolve against the config's folder
    assert cfg.engine.host == "aml" and cfg.engine.target == "aml"
    assert cfg.engine.cache_dir == project.parent / "model-cache/models/phi3-finetuned/cache"
    assert cfg.engine.output_dir == project.parent / "model-cache/models/phi3-finetuned"
    assert cfg.engine.log_severity_level == 0


def test_seed_registry_model_form(project: Path) -> None:
    cfg = load_workflow(seed_workflow(input_model=SEED_INPUT_REGISTRY), base_dir=project)
    ref = cfg.input_model.model_ref
    assert ref == AzureMLRegistryModel(
        name="microsoft/Phi-3-mini-4k-instruct", registry_name="azureml-msr", version="11"
    )
    assert ref.uri == "azureml://registries/azureml-msr/models/microsoft/Phi-3-mini-4k-instruct/versions/11"
    assert cfg.input_model.model_file_format == "PyTorch.MLflow"
    assert cfg.input_model.trust_remote_code is True  # from hf_config.from_pretrained_args


def test_json_and_yaml_read_the_same(project: Path) -> None:
    (project / "olive-config.yaml").write_text(yaml.safe_dump(seed_workflow()))
    from_json = load_workflow(project / "olive-config.json")
    from_yaml = load_workflow(project / "olive-config.yaml")
    assert from_yaml.to_json_dict() == from_json.to_json_dict()


def test_json_dict_round_trips(project: Path) -> None:
    cfg = load_workflow(project / "olive-config.json")
    dumped = cfg.to_json_dict()
    json.dumps(dumped)  # plain JSON
    again = load_workflow(dumped, base_dir=project)
    assert again.to_json_dict() == dumped
    assert again.passes["lora"].config == cfg.passes["lora"].config
    assert not [n for n in again.notes if "training_args" in n]  # already normalized: nothing left to rename


def test_newer_olive_flat_forms(tmp_path: Path) -> None:
    """Olive >= 0.6: flat HfModel, flat systems/passes/common/data params, engine keys at the top level."""
    venv = tmp_path / "venv"
    venv.mkdir()
    wf = {
        "input_model": {
            "type": "hfmodel",
            "model_path": "azureml://registries/azureml/models/Phi-4-mini-instruct/versions/1",
            "task": "text-generation",
            "load_kwargs": {"trust_remote_code": True},
            "adapter_path": "models/ft/adapter",
        },
        "systems": {
            "local_system": {
                "type": "LocalSystem",
                "accelerators": [{"device": "GPU", "execution_providers": ["CUDAExecutionProvider"]}],
                "python_environment_path": "venv",
            },
            "dock": {"type": "docker", "local_docker_config": {"dockerfile": "Dockerfile", "build_context_path": "."}},
        },
        "data_configs": [
            {
                "name": "train",
                "load_dataset_config": {"data_name": "json", "data_files": "data/train.jsonl", "split": "train[:80%]"},
                "pre_process_data_config": {"text_template": "<|user|>{Question}<|end|><|assistant|>{Answer}<|end|>"},
            }
        ],
        "passes": {
            "builder": {"type": "ModelBuilder", "precision": "int4"},
            "lora": {"type": "LoRA", "train_data_config": "train", "training_args": {"max_steps": 100}},
        },
        "host": "local_system",
        "target": "local",
        "cache_dir": "cache",
    }
    cfg = load_workflow(wf, base_dir=tmp_path)
    im = cfg.input_model
    assert im.type == "HfModel" and im.trust_remote_code is True
    assert im.model_ref.uri == "azureml://registries/azureml/models/Phi-4-mini-instruct/versions/1"
    assert im.adapter_path == str(tmp_path / "models/ft/adapter")
    acc = cfg.systems["local_system"].accelerators[0]
    assert (acc.device, acc.execution_providers) == ("gpu", ["CUDAExecutionProvider"])
    assert cfg.systems["local_system"].python_environment_path == venv
    assert cfg.systems["dock"].type == "Docker"
    assert cfg.systems["dock"].docker_config.build_context_path == tmp_path
    assert list(cfg.passes) == ["builder", "lora"]
    assert cfg.passes["builder"].config == {"precision": "int4"}
    assert cfg.engine.host == "local_system" and cfg.engine.cache_dir == tmp_path / "cache"
    assert cfg.data_configs[0].load_dataset_config.split == "train[:80%]"


def test_hub_id_and_local_names(tmp_path: Path) -> None:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    wf = {"input_model": {"type": "HfModel", "model_path": "microsoft/Phi-3-mini-4k-instruct"}}
    assert load_workflow(wf, base_dir=tmp_path).input_model.model_ref == HfHubModel(
        name="microsoft/Phi-3-mini-4k-instruct"
    )
    wf = {"input_model": {"type": "HfModel", "model_path": "models/tiny"}}  # exists locally: a folder, not a hub id
    assert load_workflow(wf, base_dir=tmp_path).input_model.model_ref == LocalFolder(path=tmp_path / "models/tiny")


def test_parse_resource_strings(tmp_path: Path) -> None:
    reg = parse_resource("azureml://registries/azureml/models/Phi-4-mini-instruct/versions/1")
    assert reg == AzureMLRegistryModel(registry_name="azureml", name="Phi-4-mini-instruct", version="1")
    ds = parse_resource("azureml://datastores/workspaceblobstore/paths/data/train.jsonl")
    assert ds == AzureMLDatastore(datastore_name="workspaceblobstore", relative_path="data/train.jsonl")
    long = parse_resource("azureml://subscriptions/sub/resourcegroups/rg/workspaces/ws/datastores/store/paths/a/b.json")
    assert long.azureml_client.workspace_name == "ws" and long.relative_path == "a/b.json"
    assert long.uri == "azureml://subscriptions/sub/resourcegroups/rg/workspaces/ws/datastores/store/paths/a/b.json"
    assert parse_resource("azureml:phi-ft:3") == AzureMLModel(name="phi-ft", version="3")
    assert parse_resource("azureml:phi-ft@latest").label == "latest"
    assert parse_resource("data/train.jsonl", base_dir=tmp_path) == LocalFile(path=tmp_path / "data/train.jsonl")
    assert parse_resource("models/x", base_dir=tmp_path) == LocalFolder(path=tmp_path / "models/x")
    nested = parse_resource({"type": "azureml_model", "config": {"name": "m", "version": 2}})
    assert nested == AzureMLModel(name="m", version="2")
    with pytest.raises(ValueError, match="expected azureml://registries/<registry>/models/<name>/versions"):
        parse_resource("azureml://registries/azureml/models/Phi-4")
    with pytest.raises(ValueError, match="give a version"):
        parse_resource("azureml:phi-ft")
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        parse_resource("s3://bucket/key")


def test_unimportable_pass_module_keeps_raw_config(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered pass whose module is not there yet: the config is kept as written, with a note."""
    monkeypatch.setitem(registry.PASSES, "LoRA", "orchestrator.passes.not_written_yet:LoRAPass")
    wf = seed_workflow()
    wf["passes"]["lora"]["config"]["some_future_option"] = 1
    cfg = load_workflow(wf, base_dir=project)
    assert cfg.passes["lora"].config["some_future_option"] == 1
    assert cfg.passes["lora"].config["training_args"]["eval_strategy"] == "steps"  # still normalized
    assert any(n.startswith("passes.lora: config not checked here") for n in cfg.notes)


# ---- training_args --------------------------------------------------------------------------------------


def test_training_args_snapshot_matches_installed_libraries() -> None:
    """The names config validation accepts are exactly what transformers / TRL in the venv define."""
    import dataclasses

    from transformers import TrainingArguments
    from trl import SFTConfig

    ta = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert ta == TRAINING_ARGUMENTS_FIELDS
    assert {f.name for f in dataclasses.fields(SFTConfig)} - ta == SFT_CONFIG_FIELDS


def test_normalize_training_args_renames_and_reports() -> None:
    args, notes = normalize_training_args(
        {
            "evaluation_strategy": "steps",
            "per_gpu_train_batch_size": 4,
            "no_cuda": True,
            "warmup_ratio": 0.03,
            "overwrite_output_dir": True,
            "include_inputs_for_metrics": True,
            "dispatch_batches": False,
            "extra_args": {"push_to_hub_token": "name-of-secret"},
        }
    )
    assert args == {
        "eval_strategy": "steps",
        "per_device_train_batch_size": 4,
        "use_cpu": True,
        "warmup_steps": 0.03,
        "include_for_metrics": ["inputs"],
        "accelerator_config": {"dispatch_batches": False},
        "hub_token": "name-of-secret",
    }
    assert any("overwrite_output_dir dropped" in n for n in notes)
    assert normalize_training_args(args) == (args, [])  # idempotent
    # the new name accepted by transformers 5.23 constructs for real
    from transformers import TrainingArguments

    kept = {k: v for k, v in args.items() if k not in ("hub_token", "use_cpu")}
    assert TrainingArguments(output_dir="/tmp/orch-ta", use_cpu=True, **kept).eval_strategy == "steps"

    with pytest.raises(TrainingArgsError) as info:
        normalize_training_args({"learning_rat": 1e-4, "evaluation_strategy": "no", "eval_strategy": "steps"})
    assert ("learning_rat", "unknown key; did you mean 'learning_rate'?") in info.value.problems
    assert any(k == "evaluation_strategy" and "both are set" in m for k, m in info.value.problems)


# ---- errors ---------------------------------------------------------------------------------------------


def test_unknown_pass_config_key_suggests(project: Path) -> None:
    wf = seed_workflow()
    wf["passes"]["lora"]["config"]["lora_rr"] = 8
    assert "passes.lora.config.lora_rr: unknown key; did you mean 'lora_r'?" in problems_of(wf, base_dir=project)


def test_unknown_training_arg_suggests(project: Path) -> None:
    wf = seed_workflow()
    wf["passes"]["lora"]["config"]["training_args"]["evaluation_strateg"] = "steps"
    assert problems_of(wf, base_dir=project) == [
        "passes.lora.config.training_args.evaluation_strateg: unknown key; did you mean 'eval_strategy'?"
    ]


def test_bad_value_type_and_precision(project: Path) -> None:
    wf = seed_workflow()
    wf["passes"]["lora"]["config"]["lora_r"] = "sixty-four"
    wf["passes"]["builder"]["config"]["precision"] = "int3"
    wf["engine"]["log_severity_level"] = 7
    problems = problems_of(wf, base_dir=project)
    lora_r = [p for p in problems if p.startswith("passes.lora.config.lora_r:")]
    assert lora_r and "valid integer" in lora_r[0] and "'sixty-four'" in lora_r[0]
    precision = [p for p in problems if p.startswith("passes.builder.config.precision:")]
    assert precision and "'int4'" in precision[0] and "(got 'int3')" in precision[0]
    assert any(p.startswith("engine.log_severity_level:") and "less than or equal to 4" in p for p in problems)
    assert len(problems) == 3  # all collected, none twice


def test_unknown_keys_in_nested_olive_sections_keep_user_paths(project: Path) -> None:
    wf = seed_workflow()
    wf["systems"]["aml"]["config"]["aml_computee"] = "x"
    wf["input_model"]["config"]["hf_config"]["model_nam"] = "x"
    wf["data_configs"][0]["pre_process_data_config"]["params"]["text_col"] = ["x"]
    wf["engine"]["cache_dirr"] = "x"
    wf["evaluators"] = {"ev": {"metrics": [{"name": "acc", "type": "accuracyy"}]}}
    problems = problems_of(wf, base_dir=project)
    assert "systems.aml.config.aml_computee: unknown key; did you mean 'aml_compute'?" in problems
    assert "input_model.config.hf_config.model_nam: unknown key; did you mean 'model_name'?" in problems
    assert "data_configs[0].pre_process_data_config.params.text_col: unknown key; did you mean 'text_cols'?" in problems
    assert "engine.cache_dirr: unknown key; did you mean 'cache_dir'?" in problems
    assert any(p.startswith("evaluators.ev.metrics[0].type: Input should be 'accuracy'") for p in problems)


def test_resource_and_system_type_errors(project: Path) -> None:
    wf = seed_workflow(input_model=SEED_INPUT_REGISTRY)
    wf["input_model"]["config"]["model_path"]["type"] = "azureml_regstry_model"
    wf["data_configs"][1]["load_dataset_config"]["params"]["data_files"]["config"]["datastore_nam"] = "x"
    wf["systems"]["azure_arc"]["type"] = "AzureMl2"
    wf["systems"]["aml"]["config"]["accelerators"] = [{"device": "tpu"}]
    problems = problems_of(wf, base_dir=project)
    assert problems[0].startswith(
        "input_model.config.model_path.type: unknown type 'azureml_regstry_model'; did you mean "
        "'azureml_registry_model'? (known: local_folder, "
    )
    assert (
        "data_configs[1].load_dataset_config.params.data_files.config.datastore_nam: unknown key; "
        "did you mean 'datastore_name'?" in problems
    )
    assert (
        "systems.azure_arc.type: unknown type 'AzureMl2'; did you mean 'AzureML'? (known: LocalSystem, Docker, "
        "AzureML)" in problems
    )
    assert "systems.aml.config.accelerators[0].device: Input should be 'cpu' or 'gpu' (got 'tpu')" in problems
    assert len(problems) == 4


def test_unknown_pass_type_names_nearest(project: Path) -> None:
    wf = seed_workflow()
    wf["passes"]["builder"]["type"] = "ModelBuildr"
    (problem,) = problems_of(wf, base_dir=project)
    assert problem.startswith("passes.builder.type: unknown pass type 'ModelBuildr'; did you mean 'ModelBuilder'?")


def test_dangling_train_data_config(project: Path) -> None:
    wf = seed_workflow()
    wf["passes"]["lora"]["config"]["train_data_config"] = "dataset_default_trian"
    problems = problems_of(wf, base_dir=project)
    assert (
        "passes.lora.config.train_data_config: 'dataset_default_trian' is not a data config; did you mean "
        "'dataset_default_train'? (known: dataset_default_train, dataset_cloud_train)" in problems
    )


def test_unknown_host_and_target(project: Path) -> None:
    wf = seed_workflow(systems={"aml": SEED_SYSTEMS["aml"], "local": {"type": "LocalSystem"}})
    wf["engine"].update(host="amll", target="gpu-box")
    problems = problems_of(wf, base_dir=project)
    assert (
        "engine.host: 'amll' is not a system in 'systems' (known: aml, local) or one of local, docker, aml; "
        "did you mean 'aml'?" in problems
    )
    assert any(p.startswith("engine.target: 'gpu-box' is not a system") for p in problems)


def test_keywords_and_missing_evaluator(project: Path) -> None:
    wf = seed_workflow(systems={})
    wf["engine"].update(host="docker", target="local", evaluator="tone_eval")
    assert problems_of(wf, base_dir=project) == ["engine.evaluator: 'tone_eval' is not in 'evaluators' (known: none)"]
    wf["evaluators"] = {"tone_eval": {"metrics": [{"name": "ppl", "type": "perplexity", "data_config": "nope"}]}}
    assert problems_of(wf, base_dir=project) == [
        "evaluators.tone_eval.metrics[0].data_config: 'nope' is not a data config "
        "(known: dataset_default_train, dataset_cloud_train)"
    ]


def test_duplicate_data_config_and_missing_fields(project: Path) -> None:
    wf = seed_workflow(data_configs=[SEED_DATA_LOCAL, SEED_DATA_LOCAL, {"name": "x", "load_dataset_config": {}}])
    wf["systems"]["aml"]["config"].pop("aml_compute")
    problems = problems_of(wf, base_dir=project)
    assert "data_configs: data config name 'dataset_default_train' is used more than once" in problems
    assert "data_configs[2].load_dataset_config.data_name: required key missing" in problems
    assert "systems.aml.config.aml_compute: required key missing" in problems


def test_bad_resource_string(project: Path) -> None:
    wf = seed_workflow(input_model={"type": "HfModel", "model_path": "azureml://registries/azureml/models/x"})
    (problem,) = problems_of(wf, base_dir=project)
    assert problem.startswith("input_model.model_path: 'azureml://registries/azureml/models/x': expected")


def test_malformed_json_says_where(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "input_model": {"type": "HfModel",}\n}\n')
    (problem,) = problems_of(path)
    assert problem.startswith(f"config file {path}: invalid JSON at line 2, column 37:")


def test_malformed_yaml_says_where(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("input_model:\n  type: HfModel\n model_path: x\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"config file {path}: invalid YAML at line 3, column 2:")


def test_missing_file(tmp_path: Path) -> None:
    assert problems_of(tmp_path / "nope.json") == [f"config file {tmp_path / 'nope.json'} not found"]


def test_duplicate_json_key(tmp_path: Path) -> None:
    path = tmp_path / "dup.json"
    path.write_text('{"passes": {"lora": {"type": "LoRA"}, "lora": {"type": "LoRA"}}}')
    assert problems_of(path) == [f"config file {path}: key 'lora' appears twice in one object (line 1); keep one"]


def test_evaluator_metrics_checked_by_the_evaluate_pass(project: Path) -> None:
    wf = seed_workflow()
    wf["engine"]["evaluator"] = "ev"
    metric = {"name": "ppl", "type": "perplexity", "data_config": "dataset_default_train"}
    wf["evaluators"] = {"ev": {"metrics": [{**metric, "user_config": {"max_samples": 8}}]}}
    assert load_workflow(wf, base_dir=project).evaluators["ev"].metrics[0].user_config == {"max_samples": 8}
    wf["evaluators"]["ev"]["metrics"][0]["user_config"] = {"max_sample": 8}
    assert problems_of(wf, base_dir=project) == [
        "evaluators.ev.metrics[0].user_config.max_sample: unknown key; did you mean 'max_samples'?"
    ]
