"""The Olive-format models, defined once: input model, data configs, systems, resources, evaluators.

Pure pydantic (no passes, no systems imported): every other room reads these shapes. Reading a workflow file
into them (`orchestrator.olive.load_workflow`) lives in olive/, because it also checks pass configs.
"""

from __future__ import annotations

from orchestrator.schema.errors import ConfigError
from orchestrator.schema.models import (
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
from orchestrator.schema.resources import (
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
from orchestrator.schema.systems import (
    Accelerator,
    AzureMLSystemConfig,
    DockerSystemConfig,
    ImageConfig,
    LocalSystemConfig,
    SystemConfig,
)

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
    "parse_resource",
]
