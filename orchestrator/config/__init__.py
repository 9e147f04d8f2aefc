"""Workflow configuration: Olive's JSON/YAML format read into checked pydantic models.

`load_workflow(path_or_dict)` is the one entry point; every problem in a file comes back at once in a
ConfigError, each as `json.path: what is wrong; did you mean ...`.
"""

from __future__ import annotations

from orchestrator.config.errors import ConfigError
from orchestrator.config.models import (
    DataConfig,
    EngineConfig,
    EvaluatorConfig,
    HfConfig,
    InputModel,
    LoadDatasetConfig,
    Metric,
    MlflowConfig,
    PassEntry,
    PreProcessDataConfig,
)
from orchestrator.config.resources import (
    AzureMLClient,
    AzureMLDatastore,
    AzureMLModel,
    AzureMLRegistryModel,
    HfHubModel,
    LocalFile,
    LocalFolder,
    Resource,
    parse_resource,
)
from orchestrator.config.systems import (
    Accelerator,
    AzureMLSystemConfig,
    DockerSystemConfig,
    ImageConfig,
    LocalSystemConfig,
    SystemConfig,
)
from orchestrator.config.training_args import normalize_training_args
from orchestrator.config.workflow import WorkflowConfig, load_workflow

__all__ = [
    "Accelerator",
    "AzureMLClient",
    "AzureMLDatastore",
    "AzureMLModel",
    "AzureMLRegistryModel",
    "AzureMLSystemConfig",
    "ConfigError",
    "DataConfig",
    "DockerSystemConfig",
    "EngineConfig",
    "EvaluatorConfig",
    "HfConfig",
    "HfHubModel",
    "ImageConfig",
    "InputModel",
    "LoadDatasetConfig",
    "LocalFile",
    "LocalFolder",
    "LocalSystemConfig",
    "Metric",
    "MlflowConfig",
    "PassEntry",
    "PreProcessDataConfig",
    "Resource",
    "SystemConfig",
    "WorkflowConfig",
    "load_workflow",
    "normalize_training_args",
    "parse_resource",
]
